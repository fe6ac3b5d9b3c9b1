"""Sensors: external events that start runs. Each is idempotent (cursor + ``run_key``).

- ``warehouse_sensor``: new batches landed in the warehouse → extract them (``listening_events``; the
  automation conditions carry the change downstream).
- ``new_data_sensor``: positive events since the champion's training data ended reach 20% (configurable)
  of what it was trained on → the ``retrain`` job. Never while a retrain runs or a challenger is in
  canary; backs off after repeated gate failures and failed runs; its skip reason says how close it is.
- ``drift_sensor``: a new ``drift_report`` past the threshold → ``retrain``, once per report.
- ``registry_audit_sensor``: an alias that points elsewhere than the control plane last moved it (a
  person in the MLflow UI, a script with the store's credentials) → the move is recorded in the
  version's history, ``by: unknown``, and logged.
- ``abandoned_training_sensor``: a failed ``retrain`` run (a crash, ``kill -9``, caught by run
  monitoring) → its MLflow training run, if left ``RUNNING``, is ended as ``FAILED``.

- ``kpi_alert_sensor``: a firing Prometheus alert labelled ``retrain="true"`` (or, without Prometheus,
  the champion's CTR falling below its 7-day level in the feedback table) → ``retrain``, once per
  alert episode.

Every retrain trigger waits while another retrain runs, and while a challenger is in canary (its
online decision comes first). When several reasons wait for the one slot, an alert goes first
(production hurts now), then drift, then new data: otherwise whichever sensor ticks first after a
canary decision takes the slot, and with new data landing fast the others starve.
"""

# No `from __future__ import annotations` here (see assets/training.py).

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import httpx

from recsys_assets.assets.training import dagster_run_active
from recsys_assets.constants import RETRAIN_TAG
from recsys_assets.jobs import retrain_job
from recsys_assets.resources import MLflowResource, PrometheusResource, ServingResource, WarehouseResource
from recsys_assets.triggers import (
    AlertEpisode,
    NewDataProgress,
    RetrainState,
    feedback_ctr_episode,
    firing_episodes,
    new_positive_events,
)
from recsys_core.registry import CHALLENGER, CHAMPION, RegistryError
from recsys_core.settings import load_settings
from recsys_core.warehouse import WarehouseError

SETTINGS = load_settings().automation
RUN_KEY_TAG = "dagster/run_key"
ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def running_retrain(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    runs = instance.get_runs(filters=dg.RunsFilter(tags={RETRAIN_TAG: "true"}, statuses=ACTIVE), limit=1)
    return runs[0] if runs else None


def challenger_in_canary(mlflow: MLflowResource) -> int | None:
    """The challenger's version while a canary runs: a retrain waits for its decision first."""
    try:
        challenger = mlflow.get_registry().by_alias(CHALLENGER)
    except RegistryError:
        return None
    return challenger.version if challenger else None


def run_with_key(instance: dg.DagsterInstance, run_key: str) -> dg.DagsterRun | None:
    """The run a sensor requested with ``run_key``, if the daemon launched it."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1)
    return runs[0] if runs else None


def drift_run_key(report_id: int) -> str:
    return f"drift:{report_id}"


def alert_run_key(episode: AlertEpisode) -> str:
    return f"alert:{episode.key}"


def retrain_request(run_key: str, trigger: str, reason: str) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=run_key,
        job_name=retrain_job.name,
        tags={RETRAIN_TAG: "true", "recsys/trigger": trigger, "recsys/reason": reason[:200]},
    )


@dg.sensor(
    minimum_interval_seconds=SETTINGS.sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=["listening_events"],
    description="New batches landed in the warehouse: extract them.",
)
def warehouse_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource):
    try:
        wh = warehouse.get_warehouse()
        wh.init_schema()
        last = wh.scalar("SELECT MAX(batch_id) FROM ingest_batches WHERE landed > 0")
    except WarehouseError as exc:
        return dg.SkipReason(f"the warehouse cannot be read: {exc}")
    cursor = json.loads(context.cursor) if context.cursor else {}
    seen = int(cursor.get("batch", 0))
    if not last or last <= seen:
        return dg.SkipReason(f"no new batch since batch {seen}")
    waiting = f"batches {seen + 1}..{last} wait"
    if running_retrain(context.instance) is not None:
        return dg.SkipReason(f"{waiting}: a retrain (which extracts them too) is running")
    active = context.instance.get_runs(
        filters=dg.RunsFilter(tags={"recsys/trigger": "new-batches"}, statuses=ACTIVE), limit=1
    )
    if active:
        return dg.SkipReason(f"{waiting}: the previous extraction (run {active[0].run_id[:8]}) is not done")
    now = datetime.now(UTC)
    last_request = cursor.get("requested_at")
    if (
        last_request
        and (now - datetime.fromisoformat(last_request)).total_seconds() < SETTINGS.extract_min_interval_seconds
    ):
        return dg.SkipReason(f"{waiting}: at most one extraction every {SETTINGS.extract_min_interval_seconds}s")
    context.update_cursor(json.dumps({"batch": last, "requested_at": now.isoformat()}))
    return dg.RunRequest(
        run_key=f"batches-upto-{last}",
        asset_selection=[dg.AssetKey("listening_events")],
        tags={"recsys/trigger": "new-batches"},
    )


def prometheus_alert_episodes(url: str) -> list[AlertEpisode]:
    """The episodes of the alerts labelled ``retrain="true"`` firing in the Prometheus at ``url``.

    Raises:
        httpx.HTTPError, KeyError, ValueError: Prometheus cannot be read or answers something else.
    """
    response = httpx.get(f"{url.rstrip('/')}/api/v1/alerts", timeout=10)
    response.raise_for_status()
    return firing_episodes(response.json()["data"]["alerts"])


def alert_retrain_due(instance: dg.DagsterInstance, prometheus: PrometheusResource) -> str | None:
    """The name of a firing Prometheus alert whose retrain has not been requested yet.

    Only Prometheus alerts count: the feedback-table fallback keeps its episodes in its own sensor's
    cursor, and an unreadable Prometheus holds nothing up (the KPI sensor reports it).
    """
    if not prometheus.url:
        return None
    try:
        episodes = prometheus_alert_episodes(prometheus.url)
    except (httpx.HTTPError, KeyError, ValueError):
        return None
    for episode in episodes:
        if run_with_key(instance, alert_run_key(episode)) is None:
            return episode.name
    return None


def drift_retrain_due(instance: dg.DagsterInstance) -> int | None:
    """The latest drift report's id when it found drift and its retrain has not been requested yet.

    A drifted world is the more specific reason to retrain: with new data landing fast, the new-data
    sensor would otherwise take every free slot (each canary decision frees one) and starve it.
    """
    found = instance.fetch_materializations(dg.AssetKey("drift_report"), limit=1, ascending=False).records
    if not found:
        return None
    drifted = found[0].event_log_entry.asset_materialization.metadata.get("drifted")
    if drifted is None or not drifted.value:
        return None
    requested = run_with_key(instance, drift_run_key(found[0].storage_id))
    return None if requested else found[0].storage_id


def retrain_ahead(instance: dg.DagsterInstance, prometheus: PrometheusResource, trigger: str) -> str | None:
    """Why a retrain of higher priority than ``trigger``'s goes first, if one is due: alerts, then drift."""
    if (alert := alert_retrain_due(instance, prometheus)) is not None:
        return f"alert {alert} asks for a retrain first (the KPI alert sensor requests it)"
    if trigger == "new-data" and (report := drift_retrain_due(instance)) is not None:
        return f"drift report {report} asks for a retrain first (the drift sensor requests it)"
    return None


def _gate_failed(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Whether ``run`` failed because the promotion gate rejected its candidate."""
    found = instance.fetch_materializations(dg.AssetKey("model_evaluation"), limit=1, ascending=False).records
    if not found or found[0].run_id != run.run_id:
        return False
    promote = found[0].event_log_entry.asset_materialization.metadata.get("promote")
    return promote is not None and promote.value is False


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=SETTINGS.sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        f"Retrain when new positive events reach {SETTINGS.new_data_fraction:.0%} of the champion's training rows."
    ),
)
def new_data_sensor(
    context: dg.SensorEvaluationContext,
    warehouse: WarehouseResource,
    mlflow: MLflowResource,
    prometheus: PrometheusResource,
):
    state = RetrainState.from_cursor(context.cursor)
    now = datetime.now(UTC)
    if state.pending_run_key:  # the outcome of the retrain requested last
        run = run_with_key(context.instance, state.pending_run_key)
        if run is None or not run.is_finished:
            requested = datetime.fromisoformat(state.requested_at) if state.requested_at else now
            if run is not None or now - requested < timedelta(minutes=10):
                return dg.SkipReason(f"waiting for the retrain it requested ({state.pending_run_key})")
            state.pending_run_key = None  # never launched (the request was dropped): look again
        else:
            if run.status == dg.DagsterRunStatus.SUCCESS:
                state.record_success()
            elif _gate_failed(context.instance, run):
                state.record_gate_failure(now, timedelta(seconds=SETTINGS.backoff_seconds))
            elif run.status == dg.DagsterRunStatus.FAILURE:  # a crash, not a verdict: retry, later each time
                state.record_crash(now, timedelta(seconds=SETTINGS.crash_backoff_seconds))
            state.history = [*state.history, f"{state.pending_run_key}: {run.status.value}"][-10:]
            state.pending_run_key = None
            context.update_cursor(state.to_cursor())
    running = running_retrain(context.instance)
    if running is not None:
        return dg.SkipReason(f"a retrain is running (run {running.run_id[:8]})")
    if state.backing_off(now):
        return dg.SkipReason(state.describe_backoff())
    try:
        registry = mlflow.get_registry()
        champion, challenger = registry.by_alias(CHAMPION), registry.by_alias(CHALLENGER)
    except RegistryError as exc:
        return dg.SkipReason(f"the registry cannot be read: {exc}")
    if challenger is not None:
        return dg.SkipReason(f"challenger v{challenger.version} is in canary: waiting for its decision")
    if champion is not None and (ahead := retrain_ahead(context.instance, prometheus, "new-data")) is not None:
        return dg.SkipReason(ahead)
    if champion is None:
        # A new platform trains its first model by itself, once there is data to train on (and tries
        # again, backing off, if the first candidate does not beat popularity).
        try:
            events = new_positive_events(warehouse.get_warehouse(), datetime(1970, 1, 1, tzinfo=UTC))
        except WarehouseError as exc:
            return dg.SkipReason(f"the warehouse cannot be read: {exc}")
        if events == 0:
            return dg.SkipReason("no champion and no listening data yet")
        state.attempts += 1
        state.pending_run_key, state.requested_at = f"bootstrap-{state.attempts}", now.isoformat()
        context.update_cursor(state.to_cursor())
        return retrain_request(state.pending_run_key, "bootstrap", f"no champion yet; {events:,} positive events")
    trained = int(champion.lineage("train_interactions") or 0)
    since = datetime.fromisoformat(champion.lineage("max_played_at"))
    try:
        progress = NewDataProgress(
            new_positive_events(warehouse.get_warehouse(), since), trained, SETTINGS.new_data_fraction
        )
    except WarehouseError as exc:
        return dg.SkipReason(f"the warehouse cannot be read: {exc}")
    if not progress.reached:
        return dg.SkipReason(progress.describe())
    state.attempts += 1
    state.pending_run_key = f"new-data:champion-v{champion.version}:attempt-{state.attempts}"
    state.requested_at = now.isoformat()
    context.update_cursor(state.to_cursor())
    return retrain_request(state.pending_run_key, "new-data", progress.describe())


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=SETTINGS.sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Retrain when the latest drift report is past its threshold (once per report).",
)
def drift_sensor(context: dg.SensorEvaluationContext, mlflow: MLflowResource, prometheus: PrometheusResource):
    found = context.instance.fetch_materializations(dg.AssetKey("drift_report"), limit=1, ascending=False).records
    if not found:
        return dg.SkipReason("no drift report yet")
    record = found[0]
    if context.cursor and int(context.cursor) >= record.storage_id:
        return dg.SkipReason(f"drift report {record.storage_id} already handled")
    metadata = record.event_log_entry.asset_materialization.metadata
    drifted = metadata.get("drifted")
    share = metadata.get("drift_share")
    if drifted is None or not drifted.value:
        context.update_cursor(str(record.storage_id))
        return dg.SkipReason(f"no drift in report {record.storage_id} (share {share.value if share else 0:.0%})")
    if running_retrain(context.instance) is not None:
        return dg.SkipReason("drift detected; a retrain is already running")
    if (canary := challenger_in_canary(mlflow)) is not None:
        return dg.SkipReason(f"drift detected; waiting for the canary of v{canary} to be decided first")
    if (ahead := retrain_ahead(context.instance, prometheus, "drift")) is not None:
        return dg.SkipReason(f"drift detected; {ahead}")
    context.update_cursor(str(record.storage_id))
    return retrain_request(
        drift_run_key(record.storage_id), "drift", f"drift share {share.value:.0%} in report {record.storage_id}"
    )


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=SETTINGS.sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Retrain once per alert episode on online KPIs (Prometheus alerts, or the feedback table).",
)
def kpi_alert_sensor(
    context: dg.SensorEvaluationContext,
    prometheus: PrometheusResource,
    warehouse: WarehouseResource,
    mlflow: MLflowResource,
):
    cursor = json.loads(context.cursor) if context.cursor else {"handled": [], "feedback_episode": None}
    if prometheus.url:
        try:
            episodes = prometheus_alert_episodes(prometheus.url)
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            return dg.SkipReason(f"Prometheus at {prometheus.url} cannot be read: {exc}")
        source = f"Prometheus {prometheus.url}"
    else:
        champion = mlflow.get_registry().by_alias(CHAMPION)
        if champion is None:
            return dg.SkipReason("no champion, no KPI to watch")
        episode, description = feedback_ctr_episode(warehouse.get_warehouse(), champion.version, SETTINGS.kpi_ctr_drop)
        if episode is None:
            cursor["feedback_episode"] = None
            context.update_cursor(json.dumps(cursor))
            return dg.SkipReason(f"feedback table: {description}")
        # The episode lasts as long as the condition holds: keep its first hour as its key.
        cursor["feedback_episode"] = cursor.get("feedback_episode") or episode.started_at
        episode = type(episode)(episode.name, cursor["feedback_episode"])
        episodes = [episode]
        source = f"feedback table: {description}"
    new = [e for e in episodes if e.key not in cursor["handled"]]
    if not new:
        return dg.SkipReason(f"{len(episodes)} firing alert episode(s) already handled ({source})")
    if running_retrain(context.instance) is not None:
        return dg.SkipReason(f"alert {new[0].name} firing; a retrain is already running")
    if (canary := challenger_in_canary(mlflow)) is not None:
        return dg.SkipReason(f"alert {new[0].name} firing; waiting for the canary of v{canary} to be decided first")
    cursor["handled"] = [*cursor["handled"], *(e.key for e in new)][-50:]
    context.update_cursor(json.dumps(cursor))
    return retrain_request(
        alert_run_key(new[0]), "kpi-alert", f"{new[0].name} firing since {new[0].started_at} ({source})"
    )


def canary_look_key(version: int, step: int, challenger_impressions: int, per_look: int) -> str | None:
    """The run key of the canary analysis due now: one at the start, then one per ``per_look`` more
    challenger impressions in the current step (the mSPRT stays valid however often it looks)."""
    looks = challenger_impressions // per_look
    return f"canary:v{version}:s{step}:{looks}" if looks else None


@dg.sensor(
    minimum_interval_seconds=SETTINGS.sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=["canary_analysis"],
    description="While a challenger is in canary: start it, analyse it each time enough new traffic has come in, "
    "and at once when a serving guardrail is breached.",
)
def canary_sensor(
    context: dg.SensorEvaluationContext,
    mlflow: MLflowResource,
    warehouse: WarehouseResource,
    prometheus: PrometheusResource,
    serving: ServingResource,
):
    from recsys_assets.data.kpis import serving_health
    from recsys_assets.ml.canary import CanaryRules, guardrail_breaches

    try:
        state = mlflow.get_registry().serving_state()
    except RegistryError as exc:
        return dg.SkipReason(f"the registry cannot be read: {exc}")
    if state.challenger is None or state.champion is None:
        return dg.SkipReason("no challenger in canary")
    canary_runs = dg.RunsFilter(tags={"recsys/trigger": "canary"}, statuses=ACTIVE)
    if active := context.instance.get_runs(filters=canary_runs, limit=1):
        return dg.SkipReason(f"the previous analysis of v{state.challenger} (run {active[0].run_id[:8]}) is not done")
    request = lambda key: dg.RunRequest(  # noqa: E731
        run_key=key, asset_selection=[dg.AssetKey("canary_analysis")], tags={"recsys/trigger": "canary"}
    )
    canary = state.canary
    if canary is None or canary.version != state.challenger:
        return request(f"canary:v{state.challenger}:start")
    rules = CanaryRules.from_settings(load_settings().automation)
    versions = {"champion": state.champion, "challenger": state.challenger}
    since = canary.step_starts()[0][2]
    health, _ = serving_health(prometheus.url, serving.get_client().metrics, since, versions, canary.mode)
    if health and (breaches := guardrail_breaches(health["champion"], health["challenger"], rules)):
        context.log.warning(f"challenger v{state.challenger}: {'; '.join(breaches)}")
        return request(f"canary:v{state.challenger}:guardrail")
    step_start = canary.step_starts()[-1][2]
    try:
        impressions = warehouse.get_warehouse().scalar(
            "SELECT COUNT(*) FROM listening_events WHERE source = 'recommendation' AND event_type = 'impression' "
            "AND variant = 'challenger' AND model_version = ? AND played_at >= ?",
            [str(state.challenger), step_start],
        )
    except WarehouseError as exc:
        return dg.SkipReason(f"the online KPIs cannot be read: {exc}")
    key = canary_look_key(state.challenger, canary.step, int(impressions or 0), rules.min_impressions)
    if key is None:
        return dg.SkipReason(
            f"challenger v{state.challenger} at {canary.fraction:.0%} (step {canary.step}): "
            f"{int(impressions or 0):,} of {rules.min_impressions:,} impressions for the next look"
        )
    return request(key)


automation_sensor = dg.AutomationConditionSensorDefinition(
    "recsys_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=SETTINGS.sensor_interval_seconds,
)


@dg.run_failure_sensor(
    monitored_jobs=[retrain_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A retrain run that failed (crashed, killed, stopped by run monitoring) has its MLflow "
    "training run ended as FAILED, so that no run stays RUNNING for ever.",
)
def abandoned_training_sensor(context: dg.RunFailureSensorContext, mlflow: MLflowResource):
    closed = mlflow.get_control_plane().fail_abandoned_runs(lambda owner: dagster_run_active(context.instance, owner))
    for run_id in closed:
        context.log.warning(f"MLflow run {run_id} was left RUNNING by a failed retrain: ended as FAILED")


@dg.sensor(
    minimum_interval_seconds=SETTINGS.sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Detect and record alias moves that the platform did not make (the MLflow UI, a script).",
)
def registry_audit_sensor(context: dg.SensorEvaluationContext, mlflow: MLflowResource):
    try:
        foreign = mlflow.get_control_plane().audit_aliases()
    except RegistryError as exc:
        return dg.SkipReason(f"the registry cannot be read: {exc}")
    for event in foreign:
        context.log.warning(f"{event['action']}: v{event['from']} -> v{event['to']} (recorded in its history)")
    if not foreign:
        return dg.SkipReason("every alias is where the control plane last moved it")
    return dg.SkipReason("recorded " + "; ".join(f"{e['action']} (v{e['from']} -> v{e['to']})" for e in foreign))
