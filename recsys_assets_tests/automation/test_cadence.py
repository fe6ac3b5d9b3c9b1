"""The cadence condition of the drift report, evaluated by Dagster's own automation evaluator."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import pytest

from recsys_assets import automation

PARTITIONS = dg.DynamicPartitionsDefinition(name="batches")


@dg.asset(partitions_def=PARTITIONS)
def clean_listening_events() -> None: ...


@dg.asset
def track_features() -> None: ...


def _report_requested(partial: dg.AssetSelection | None) -> int:
    @dg.asset(
        deps=[clean_listening_events, track_features],
        automation_condition=automation.on_cadence("* * * * *", "drift_cadence", partial=partial),
    )
    def drift_report() -> None: ...

    defs = dg.Definitions(assets=[clean_listening_events, track_features, drift_report])
    with dg.instance_for_test() as instance:
        # Partition b has landed and is not cleaned yet (with Spark, or behind a queue of runs, there
        # always is such a partition).
        instance.add_dynamic_partitions("batches", ["a", "b"])
        assert dg.materialize([clean_listening_events], partition_key="a", instance=instance).success
        assert dg.materialize([track_features], instance=instance).success
        start = dt.datetime(2026, 12, 4, 1, 0, 30)
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=start)
        tick = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=first.cursor, evaluation_time=start + dt.timedelta(minutes=1)
        )
        return tick.get_num_requested(dg.AssetKey("drift_report"))


@pytest.mark.filterwarnings("ignore::dagster.BetaWarning", "ignore::dagster.PreviewWarning")
def test_a_partition_not_yet_cleaned_does_not_hold_the_report_back() -> None:
    assert _report_requested(dg.AssetSelection.assets("clean_listening_events")) == 1
    # Without `partial`, the one pending partition counts as a missing input: no report, every tick
    # (what starved the drift report when the preparation ran on Spark).
    assert _report_requested(None) == 0
