"""The training graph end to end on simulated data: train, evaluate, gate, register; then a second round."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from recsys_assets.ml.tuning import EMBEDDING_DIMS, warm_values
from recsys_assets.resources import TrainingResource, build_resources
from recsys_cli.runner import add_landed_partitions
from recsys_core.registry import CHALLENGER, CHAMPION, MODEL_NAME
from recsys_core.warehouse import Warehouse
from recsys_sim.simulation import simulate_history

pytestmark = [pytest.mark.slow]

END = datetime(2026, 3, 1, tzinfo=UTC)
FAST_TRAINING = {"embedding_dim": 16, "batch_size": 512, "max_epochs": 4, "patience": 1, "min_train_pairs": 10}


def run(
    settings, instance, gate: dict | None = None, workers: int = 1, tuning_seconds: int = 0
) -> dg.ExecuteInProcessResult:
    """Prepare the partitions not prepared yet, then one run of the ``retrain`` job (what the retrain sensor
    starts), its training on ``workers`` processes after a search of ``tuning_seconds``."""
    from recsys_assets.definitions import defs

    loaded = defs()
    prepare = loaded.resolve_implicit_global_asset_job_def()
    for key in add_landed_partitions(instance, Warehouse(settings.warehouse_uri)):
        selection = [dg.AssetKey("listening_events"), dg.AssetKey("clean_listening_events")]
        assert prepare.execute_in_process(instance=instance, partition_key=key, asset_selection=selection).success
    config = {"ops": {"two_tower_model": {"config": {**FAST_TRAINING, "tuning_budget_seconds": tuning_seconds}}}}
    if gate:
        config["ops"]["model_evaluation"] = {"config": gate}
    resources = build_resources(settings)
    resources["training"] = TrainingResource(**{**resources["training"].model_dump(), "workers": workers})
    return loaded.resolve_job_def("retrain").execute_in_process(
        instance=instance, run_config=config, resources=resources, raise_on_error=False
    )


def nested_trials(client, parent) -> list:
    """The search's trials: the MLflow runs nested under ``parent``, in trial order."""
    found = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=500
    )
    assert found, "no trial was logged under the training's run"
    return sorted(found, key=lambda r: int(r.info.run_name.removeprefix("trial-")))


def test_train_evaluate_gate_register_and_a_second_round(recsys_env) -> None:
    warehouse = Warehouse(recsys_env.warehouse_uri)
    simulate_history(warehouse, recsys_env.home, users=150, tracks=500, days=21, seed=4, end=END)
    with dg.instance_for_test() as instance:
        first = run(recsys_env, instance, tuning_seconds=6)
        assert first.success, [e.message for e in first.all_events if e.is_failure]
        model = first.output_for_node("two_tower_model")
        evaluation = first.output_for_node("model_evaluation")
        assert evaluation["decision"]["reference"] == "popularity"
        assert evaluation["decision"]["promote"]
        report = json.loads(Path(evaluation["report_path"]).read_text())
        assert report["dagster_run_id"] == first.run_id
        assert evaluation["report_path"].endswith(f"reports/evaluation/{first.run_id}.json")
        assert set(report["metrics"]) == {"candidate", "popularity", "EASE (reference)"}
        assert report["metrics"]["candidate"]["sim_ctr@10"] > 0  # simulated data: the click model is used
        # EASE is a reference row only: the gate compared the candidate with popularity (no champion yet).
        assert 0 < report["metrics"]["EASE (reference)"]["ndcg@10"] <= 1
        registered = first.output_for_node("registered_model")
        assert registered["aliases"] == [CHAMPION]
        gate = next(e for e in first.get_asset_check_evaluations() if e.check_name == "promotion_gate")
        assert gate.passed

        from mlflow import MlflowClient

        client = MlflowClient(recsys_env.mlflow_tracking_uri)
        mlflow_run = client.get_run(model["mlflow_run_id"])
        # The search chose the tuned knobs on the validation split, starting from the config's values (no
        # champion yet; 16 dimensions moved to the space's nearest, 32); the rest is the config's.
        trials = nested_trials(client, mlflow_run)
        assert trials[0].data.params == {k: str(v) for k, v in warm_values(FAST_TRAINING).items()}
        assert all(t.info.status in ("FINISHED", "KILLED") for t in trials)
        assert mlflow_run.data.params["max_epochs"] == "4"  # not searched: the config's
        assert int(mlflow_run.data.params["embedding_dim"]) in EMBEDDING_DIMS
        trained = next(m for m in first.get_asset_materialization_events() if m.asset_key.path == ["two_tower_model"])
        searched = trained.materialization.metadata["tuning"].value
        best = max((t for t in trials if "val_recall_at_20" in t.data.metrics),
                   key=lambda t: t.data.metrics["val_recall_at_20"])  # fmt: skip
        finalists = searched["finalists"]
        if finalists:  # the best trial was not the warm start: both judged through the ranking stage
            assert [f["trial"] for f in finalists] == [0, trials.index(best)]
            assert all(f["served_val_ndcg@10"] is not None for f in finalists), finalists
            assert searched["chosen_trial"] == max(finalists, key=lambda f: f["served_val_ndcg@10"])["trial"]
        else:  # the warm start was the best, or the best was stopped by the budget (no model to judge)
            assert searched["chosen_trial"] == trials.index(best)
        for name, value in trials[searched["chosen_trial"]].data.params.items():
            assert mlflow_run.data.params[name] == value
        assert mlflow_run.data.metrics["tuning_trials"] == len(trials)
        assert mlflow_run.data.metrics["tuning_chosen_trial"] == searched["chosen_trial"]
        assert searched["chosen"]["embedding_dim"] == int(mlflow_run.data.params["embedding_dim"])
        assert sum(searched["trials"].values()) == len(trials)
        assert "| trial |" in trained.materialization.metadata["tuning_trials"].value
        # The ranking stage was trained on the validation split; the version carries it only if it was kept.
        stage = trained.materialization.metadata["ranking_stage"].value
        assert stage["trained"], stage
        assert stage["kept"] == (Path(model["model_dir"]) / "ranker.npz").exists()
        assert stage["kept"] == (stage["gain_ci"][0] > 0)
        assert mlflow_run.data.metrics["ranker_val_ndcg_at_10"] == stage["val_ndcg@10"]
        assert "eval_ndcg@10".replace("@", "_at_") in mlflow_run.data.metrics
        assert "ease_ndcg@10".replace("@", "_at_") in mlflow_run.data.metrics
        assert mlflow_run.data.tags["recsys.cutoff"] == model["lineage"]["cutoff"]
        experiment = client.get_experiment(mlflow_run.info.experiment_id)
        assert experiment.artifact_location.startswith("file:///")

        # Second round, same data, trained on two worker processes (MultiWorkerMirroredStrategy on
        # 127.0.0.1): the same model is not better than itself -> rejected, nothing registered.
        second = run(recsys_env, instance, gate={"min_improvement": 0.05}, workers=2, tuning_seconds=3)
        assert not second.success
        # Its search started from the champion's values.
        second_run = client.get_run(second.output_for_node("two_tower_model")["mlflow_run_id"])
        champion_values = {k: str(v) for k, v in warm_values(mlflow_run.data.params).items()}
        assert nested_trials(client, second_run)[0].data.params == champion_values
        trained = next(m for m in second.get_asset_materialization_events() if m.asset_key.path == ["two_tower_model"])
        placed = trained.materialization.metadata["training"].value
        assert placed == {"strategy": "multi-worker", "workers": 2, "replicas": 2}
        evaluation = second.output_for_node("model_evaluation")
        assert evaluation["decision"]["reference"] == "champion v1"
        assert not evaluation["decision"]["promote"]
        assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 1

        # Forced: registered as challenger, recorded as forced.
        # A margin no candidate meets (+1000%), so the verdict is the operator's whatever this training
        # scores (its ranking stage may be kept or not).
        third = run(recsys_env, instance, gate={"min_improvement": 10.0, "force": True})
        assert third.success
        trained = next(m for m in third.get_asset_materialization_events() if m.asset_key.path == ["two_tower_model"])
        assert trained.materialization.metadata["tuning"].value == "off (budget 0)"
        assert third.output_for_node("registered_model")["aliases"] == [CHALLENGER]
        version = client.get_model_version(MODEL_NAME, "2")
        assert version.tags["recsys.gate"] == "forced"
