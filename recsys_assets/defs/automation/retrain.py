"""Retraining: the ``retrain`` job, the one sensor that decides when it runs, and what keeps both honest.

The sensor gathers what it sees (runs, the registry, alerts, the latest drift report, the prepared
partitions, the calendar) and asks one pure function, :func:`recsys_assets.triggers.decide_retrain`,
whether to retrain and why; it is idempotent through its cursor and one ``run_key`` per reason.
"""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

from datetime import UTC, datetime, timedelta

import dagster as dg

from recsys_assets.automation import running_sensor, sensor_interval_seconds
from recsys_assets.constants import CLEAN_EVENTS_DATASET, RETRAIN_TAG
from recsys_assets.data.features import positive_events_after
from recsys_assets.defs.ingestion.partitions import ingest_batches
from recsys_assets.ml.prometheus import AlertEpisode, PrometheusClient, PrometheusError
from recsys_assets.resources import (
    MLflowResource,
    PreparedDataResource,
    PrometheusResource,
    RetrainPolicyResource,
    WarehouseResource,
)
from recsys_assets.runs import dagster_run_active, run_with_key, running_retrain
from recsys_assets.triggers import (
    NewDataProgress,
    RetrainFacts,
    RetrainState,
    decide_retrain,
    feedback_ctr_episode,
    latest_cron_tick,
)
from recsys_core.registry import CHALLENGER, CHAMPION, RegistryError
from recsys_core.settings import load_settings
from recsys_core.warehouse import WarehouseError

JOB_NAME = "retrain"
# Features, training, evaluation and its gate, registration, the Bento and its deployment: everything
# downstream of the prepared events but the monitoring assets (drift report, canary analysis), which
# run on their own cadence. Extraction and cleaning run per partition as batches land.
RETRAIN_SELECTION = dg.AssetSelection.assets("track_features", "training_interactions").downstream() - (
    dg.AssetSelection.assets("canary_analysis", "drift_report")
)
# A requested run that the daemon has not launched after this long was dropped: look again.
LAUNCH_GRACE = timedelta(minutes=10)


def _gate_failed(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Whether ``run`` failed because the promotion gate rejected its candidate."""
    found = instance.fetch_materializations(dg.AssetKey("model_evaluation"), limit=1, ascending=False).records
    if not found or found[0].run_id != run.run_id:
        return False
    promote = found[0].event_log_entry.asset_materialization.metadata.get("promote")
    return promote is not None and promote.value is False


def _record_outcome(instance: dg.DagsterInstance, state: RetrainState, policy: RetrainPolicyResource,
                    now: datetime) -> str | None:  # fmt: skip
    """Record how the retrain requested last ended; while it has not, say what the sensor waits for."""
    if not state.pending_run_key:
        return None
    run = run_with_key(instance, state.pending_run_key)
    if run is None or not run.is_finished:
        requested = datetime.fromisoformat(state.requested_at) if state.requested_at else now
        if run is not None or now - requested < LAUNCH_GRACE:
            return f"waiting for the retrain it requested ({state.pending_run_key})"
        state.pending_run_key = None  # never launched (the request was dropped): look again
        return None
    if run.status == dg.DagsterRunStatus.SUCCESS:
        state.record_success()
    elif _gate_failed(instance, run):
        state.record_gate_failure(now, timedelta(seconds=policy.backoff_seconds))
    elif run.status == dg.DagsterRunStatus.FAILURE:  # a crash, not a verdict: retry, later each time
        state.record_crash(now, timedelta(seconds=policy.crash_backoff_seconds))
    state.history = [*state.history, f"{state.pending_run_key}: {run.status.value}"][-10:]
    state.pending_run_key = None
    return None


def _alert(state: RetrainState, prometheus: PrometheusResource, warehouse: WarehouseResource,
           champion: int | None, policy: RetrainPolicyResource) -> tuple[AlertEpisode | None, str]:  # fmt: skip
    """The first firing alert episode not answered yet (Prometheus's, or the feedback table's without
    it), and where it was read."""
    if prometheus.url:
        try:
            episodes = PrometheusClient(prometheus.url).retrain_episodes()
        except PrometheusError as exc:
            return None, str(exc)
        source = f"Prometheus {prometheus.url}"
    else:
        if champion is None:
            return None, "no champion, no KPI to watch"
        try:
            episode, description = feedback_ctr_episode(warehouse.get_warehouse(), champion, policy.kpi_ctr_drop)
        except WarehouseError as exc:
            return None, f"the feedback table cannot be read: {exc}"
        if episode is None:
            state.feedback_episode = None
            return None, f"feedback table: {description}"
        # The episode lasts as long as the condition holds: keep its first hour as its key.
        state.feedback_episode = state.feedback_episode or episode.started_at
        episodes = [AlertEpisode(episode.name, state.feedback_episode)]
        source = f"feedback table: {description}"
    new = [e for e in episodes if e.key not in state.handled_alerts]
    return (new[0] if new else None), source


def _drift(instance: dg.DagsterInstance, state: RetrainState) -> tuple[int | None, float]:
    """The latest drift report's id and share when it found drift and no retrain answered it yet."""
    found = instance.fetch_materializations(dg.AssetKey("drift_report"), limit=1, ascending=False).records
    if not found or found[0].storage_id <= state.drift_report:
        return None, 0.0
    metadata = found[0].event_log_entry.asset_materialization.metadata
    if not metadata.get("drifted") or not metadata["drifted"].value:
        state.drift_report = found[0].storage_id  # looked at: no drift
        return None, 0.0
    return found[0].storage_id, float(metadata["drift_share"].value)


def _prepared_positives(instance: dg.DagsterInstance, prepared: PreparedDataResource, since: datetime | None) -> int:
    """Training positives played after ``since`` in the partitions of clean events Dagster has materialized."""
    keys = instance.get_dynamic_partitions(ingest_batches.name)
    statuses = instance.get_status_by_partition(dg.AssetKey("clean_listening_events"), keys, ingest_batches) or {}
    done = [k for k, status in statuses.items() if status == dg.AssetPartitionStatus.MATERIALIZED]
    return positive_events_after(prepared.get_store().scan(CLEAN_EVENTS_DATASET, done), since) if done else 0


def retrain_sensor_fn(
    context: dg.SensorEvaluationContext,
    warehouse: WarehouseResource,
    prepared: PreparedDataResource,
    mlflow: MLflowResource,
    prometheus: PrometheusResource,
    retrain_policy: RetrainPolicyResource,
):
    instance, now = context.instance, datetime.now(UTC)
    state = RetrainState.from_cursor(context.cursor)
    waiting = _record_outcome(instance, state, retrain_policy, now)
    context.update_cursor(state.to_cursor())
    if waiting:
        return dg.SkipReason(waiting)
    try:
        registry = mlflow.get_registry()
        champion, challenger = registry.by_alias(CHAMPION), registry.by_alias(CHALLENGER)
    except RegistryError as exc:
        return dg.SkipReason(f"the registry cannot be read: {exc}")
    running = running_retrain(instance)
    alert, alert_source = _alert(state, prometheus, warehouse, champion and champion.version, retrain_policy)
    drift_report, drift_share = _drift(instance, state)
    new_data = monthly = None
    prepared_rows = 0
    if champion is None:
        prepared_rows = _prepared_positives(instance, prepared, None)
    else:
        if cutoff := champion.lineage("max_played_at"):
            since = datetime.fromisoformat(cutoff)
            trained = int(champion.lineage("train_interactions") or 0)
            positives = _prepared_positives(instance, prepared, since)
            new_data = NewDataProgress(positives, trained, retrain_policy.new_data_fraction)
        tick = latest_cron_tick(retrain_policy.retrain_cron, now)
        if champion.created_at < tick and state.monthly_tick != tick.isoformat():
            monthly = tick.isoformat()
    facts = RetrainFacts(
        running=running.run_id if running else None,
        champion=champion.version if champion else None,
        challenger=challenger.version if challenger else None,
        backoff=state.describe_backoff() if state.backing_off(now) else None,
        alert=alert,
        alert_source=alert_source,
        drift_report=drift_report,
        drift_share=drift_share,
        new_data=new_data,
        monthly_tick=monthly,
        prepared_rows=prepared_rows,
    )
    decision = decide_retrain(facts, state.attempts + 1)
    if decision.trigger is None:
        context.update_cursor(state.to_cursor())
        return dg.SkipReason(decision.reason)
    state.attempts += 1
    state.pending_run_key, state.requested_at = decision.run_key, now.isoformat()
    if decision.trigger == "kpi-alert":
        state.handled_alerts = [*state.handled_alerts, alert.key][-50:]
    elif decision.trigger == "drift":
        state.drift_report = drift_report
    elif decision.trigger == "monthly":
        state.monthly_tick = monthly
    context.update_cursor(state.to_cursor())
    return dg.RunRequest(
        run_key=decision.run_key,
        job_name=JOB_NAME,
        tags={
            RETRAIN_TAG: "true",
            "recsys/trigger": decision.trigger,
            "recsys/reason": decision.reason[:200],
            # The run queue starts the more urgent retrain first (alert > drift > new data > monthly).
            "dagster/priority": str(decision.priority),
        },
    )


def abandoned_training_fn(context: dg.RunFailureSensorContext, mlflow: MLflowResource):
    closed = mlflow.get_control_plane().fail_abandoned_runs(lambda owner: dagster_run_active(context.instance, owner))
    for run_id in closed:
        context.log.warning(f"MLflow run {run_id} was left RUNNING by a failed retrain: ended as FAILED")


def _executor(name: str):
    """``k8s`` (RECSYS_EXECUTOR): every step of a retrain in its own Kubernetes Job (dagster-k8s, in the
    production image), the training step with its GPU (``constants.TRAINING_POD``)."""
    if name != "k8s":
        return None
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor


@dg.definitions
def retraining() -> dg.Definitions:
    # The job's executor and default run config, and the sensors' interval, are definition-time values:
    # read when the definitions load, not at import.
    settings = load_settings().automation
    interval = sensor_interval_seconds()
    retrain_job = dg.define_asset_job(
        JOB_NAME,
        selection=RETRAIN_SELECTION,
        tags={RETRAIN_TAG: "true"},
        # RECSYS_RETRAIN_RUN_CONFIG tunes every triggered retrain (hyperparameters, gate, canary fraction).
        config=settings.retrain_run_config or None,
        description="Retrain the two-tower model on the prepared data and, if the gate passes, canary it.",
        executor_def=_executor(settings.executor),
    )
    retrain_sensor = running_sensor(
        retrain_sensor_fn,
        name="retrain_sensor",
        job_name=JOB_NAME,
        description="Retrain for the most urgent reason that holds: a KPI alert, drift, new data (a share of the "
        "champion's training rows), the monthly tick, or no model yet. Never while a retrain runs or a canary "
        "is undecided; backs off after rejected candidates and failed runs.",
    )
    abandoned_training_sensor = dg.run_failure_sensor(
        name="abandoned_training_sensor",
        monitored_jobs=[retrain_job],
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="A retrain run that failed (crashed, killed, stopped by run monitoring) has its MLflow "
        "training run ended as FAILED, so that no run stays RUNNING for ever.",
    )(abandoned_training_fn)
    automation_sensor = dg.AutomationConditionSensorDefinition(
        "recsys_automation",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=interval,
    )
    return dg.Definitions(jobs=[retrain_job], sensors=[retrain_sensor, abandoned_training_sensor, automation_sensor])
