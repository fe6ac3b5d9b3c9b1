"""Deployment: the Bento, its rollout (local server or Kubernetes manifests), and the canary decision."""

# No `from __future__ import annotations` here (see assets/training.py).

import dataclasses
import json
import os
import string
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from recsys_assets.constants import DEPLOYMENT, REPO_ROOT
from recsys_assets.data.store import write_atomic
from recsys_assets.metadata import markdown_table
from recsys_assets.ml.canary import decide_canary
from recsys_assets.ml.kpis import (
    canary_events,
    canary_strata,
    serving_health,
)
from recsys_assets.resources import (
    CanaryPolicyResource,
    MLflowResource,
    PrometheusResource,
    RecsysHomeResource,
    ServingResource,
    WarehouseResource,
)
from recsys_core.control import ControlPlane
from recsys_core.registry import CHALLENGER, CHAMPION, CanaryState

BENTOFILE = REPO_ROOT / "serving" / "bentofile.yaml"
K8S_TEMPLATE = REPO_ROOT / "deploy" / "k8s" / "recommender.yaml"


def _versions(mlflow: MLflowResource) -> dict[str, int | None]:
    registry = mlflow.get_registry()
    champion, challenger = registry.by_alias(CHAMPION), registry.by_alias(CHALLENGER)
    return {
        "champion": champion.version if champion else None,
        "challenger": challenger.version if challenger else None,
    }


@dg.asset(group_name=DEPLOYMENT, deps=["registered_model"], kinds={"bentoml"})
def recommender_bento(
    context: dg.AssetExecutionContext, mlflow: MLflowResource, recsys_home: RecsysHomeResource
) -> dg.Output[dict]:
    """The BentoML Bento of the recommendation service, labelled with the model versions it serves.

    Built with ``bentoml build`` (``lock_packages: false``: ``constraints.txt`` is the lock) into
    ``$RECSYS_HOME/bentoml``. The service follows the registry's ``champion`` and ``challenger``
    aliases at run time; the labels record which versions they pointed at when it was built.
    """
    versions = _versions(mlflow)
    if versions["champion"] is None:
        raise dg.Failure(description="no champion is registered: there is nothing to serve yet")
    env = {**os.environ, "BENTOML_HOME": str(recsys_home.path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    labels = [f"{variant}_version={version}" for variant, version in versions.items() if version is not None]
    command = [str(Path(sys.executable).parent / "bentoml"), "build", "-f", str(BENTOFILE), "-o", "tag"]
    for label in labels:
        command += ["--label", label]
    result = subprocess.run(
        [*command, str(REPO_ROOT)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        raise dg.Failure(
            description=f"bentoml build failed ({result.returncode})", metadata={"stderr": result.stderr[-4000:]}
        )
    tag = next(line.split("__tag__:", 1)[1].strip() for line in result.stdout.splitlines() if "__tag__:" in line)
    context.log.info(f"built {tag} with {labels}")
    return dg.Output(
        {"tag": tag, **versions},
        metadata={
            "bento_tag": dg.MetadataValue.text(tag),
            "champion_version": dg.MetadataValue.int(versions["champion"]),
            "challenger_version": dg.MetadataValue.text(str(versions["challenger"])),
            "bentoml_home": dg.MetadataValue.path(env["BENTOML_HOME"]),
            "containerize": dg.MetadataValue.text(f"bentoml containerize {tag}"),
        },
    )


class DeploymentConfig(dg.Config):
    """How the new versions reach users."""

    require_running_service: bool = Field(
        default=False,
        description="Fail when the local service does not answer (else it loads the versions when it starts).",
    )


def start_canary(registry: ControlPlane, challenger: int, policy: CanaryPolicyResource, by: str) -> CanaryState:
    """The challenger's canary at its first step, unless it has started already (the one place that
    starts a canary: the deployment and the canary analysis both call it)."""
    state = registry.canary_state()
    if state is not None and state.version == challenger:
        return state
    return registry.set_canary(
        challenger, step=0, fraction=policy.steps[0], mode=policy.mode,
        reason=f"canary started ({policy.mode}, steps {', '.join(f'{s:.0%}' for s in policy.steps)})",
        by=by,
    )  # fmt: skip


@dg.asset(group_name=DEPLOYMENT, kinds={"bentoml", "kubernetes"})
def model_deployment(
    context: dg.AssetExecutionContext,
    config: DeploymentConfig,
    recommender_bento: dict,
    serving: ServingResource,
    recsys_home: RecsysHomeResource,
    mlflow: MLflowResource,
    canary_policy: CanaryPolicyResource,
) -> dg.Output[dict]:
    """The deployed recommender: the running service reloaded onto the registry's versions, and
    Kubernetes manifests for the Bento's container.

    The challenger's canary starts at the first traffic step (``RECSYS_CANARY_STEPS``), held in the
    registry so that every replica serves the same split; the running ``bentoml serve`` is told to
    follow the registry now, and the asset checks that it serves the expected versions. For
    production the manifests under ``<storage root>/deploy/k8s`` name the container of this Bento.
    """
    tag = recommender_bento["tag"]
    image = f"recommender:{tag.split(':', 1)[1]}"
    rendered = string.Template(K8S_TEMPLATE.read_text()).safe_substitute(
        BENTO_TAG=tag,
        IMAGE=image,
        CHAMPION_VERSION=recommender_bento["champion"],
        CHALLENGER_VERSION=recommender_bento["challenger"] or "",
    )
    manifests = recsys_home.storage_root / "deploy" / "k8s" / "recommender.yaml"
    write_atomic(manifests, lambda f: f.write(rendered.encode()))

    canary = None
    if recommender_bento["challenger"] is not None:
        registry = mlflow.get_control_plane()
        if getattr(registry.by_alias(CHALLENGER), "version", None) == recommender_bento["challenger"]:
            canary = start_canary(
                registry, recommender_bento["challenger"], canary_policy, by=f"model_deployment (run {context.run_id})"
            )
    fraction = canary.fraction if canary else 0.0
    client = serving.get_client()
    status = "not running: it loads the registry's versions when it starts"
    served = {}
    if client.ready():
        expected = (recommender_bento["champion"], recommender_bento["challenger"])
        # Every worker and replica follows the registry within its poll interval (a reload reaches one).
        served = client.converge(expected, timeout=2 * serving.model_poll_seconds + 10)
        serving_now = (served["champion_version"], served["challenger_version"])
        if serving_now != expected:
            # The registry may have moved on since the Bento was built (a canary decided, a version
            # registered by hand): following the registry as it is now is right, anything else is not.
            registry = mlflow.get_registry()
            current = tuple(getattr(registry.by_alias(a), "version", None) for a in (CHAMPION, CHALLENGER))
            if serving_now != current:
                raise dg.Failure(
                    description=f"the service serves {served}, expected champion/challenger {expected} "
                    f"(the registry now says {current})"
                )
            context.log.warning(f"the registry moved on while deploying: serving {current}, built for {expected}")
        status = f"serving champion v{served['champion_version']}" + (
            f", challenger v{served['challenger_version']} to {served['fraction']:.0%} of users ({served['mode']})"
            if served["challenger_version"]
            else ""
        )
    elif config.require_running_service:
        raise dg.Failure(description=f"the service at {client.url} does not answer /readyz")
    context.log.info(status)
    return dg.Output(
        {
            **recommender_bento,
            "image": image,
            "manifests": str(manifests),
            "served": served,
            "canary_fraction": fraction,
        },
        metadata={
            "status": dg.MetadataValue.text(status),
            "service_url": dg.MetadataValue.url(client.url),
            "image": dg.MetadataValue.text(image),
            "manifests": dg.MetadataValue.path(str(manifests)),
            "canary_fraction": dg.MetadataValue.float(fraction),
        },
    )


class CanaryConfig(dg.Config):
    """Overrides of the canary's rules for one run (unset: the deployment's ``RECSYS_CANARY_*``)."""

    min_impressions: int | None = Field(
        default=None,
        description="Challenger impressions before any decision, and per step (RECSYS_CANARY_MIN_IMPRESSIONS).",
    )
    max_impressions: int | None = Field(
        default=None,
        description="The horizon: no significant difference by then, the CTR estimate decides "
        "(RECSYS_CANARY_MAX_IMPRESSIONS).",
    )


@dg.asset(group_name=DEPLOYMENT, deps=["model_deployment"], kinds={"prometheus", "mlflow"})
def canary_analysis(
    context: dg.AssetExecutionContext,
    config: CanaryConfig,
    mlflow: MLflowResource,
    warehouse: WarehouseResource,
    prometheus: PrometheusResource,
    serving: ServingResource,
    canary_policy: CanaryPolicyResource,
) -> dg.MaterializeResult:
    """Canary analysis: the challenger's always-valid user-level tests, serving guardrails, and the
    decision taken on them (promote, roll back, step the traffic up, or wait).

    See ``recsys_assets/ml/canary.py`` for the statistics. The user-level data come from the feedback
    in the warehouse, by traffic step; latency and errors from Prometheus when ``PROMETHEUS_URL`` is
    set, else from the service's ``/metrics``. Every decision is recorded on the MLflow version, and
    the service is told to follow the registry at once.
    """
    registry = mlflow.get_control_plane()
    state = registry.serving_state()
    if state.challenger is None or state.champion is None:
        return dg.MaterializeResult(metadata={"decision": dg.MetadataValue.text("no canary running"), "action": "none"})
    by = f"canary_analysis (dagster run {context.run.run_id})"
    client = serving.get_client()
    canary = state.canary
    if canary is None or canary.version != state.challenger:
        canary = start_canary(registry, state.challenger, canary_policy, by=by)
        if client.ready():
            client.admin("reload")
        started = f"canary of v{canary.version} started at {canary.fraction:.0%} ({canary.mode})"
        context.log.info(started)
        return dg.MaterializeResult(metadata={"action": "start", "decision": dg.MetadataValue.text(started)})
    rules = canary_policy.get_rules()
    overrides = {k: v for k, v in (("min_impressions", config.min_impressions),
                                   ("max_impressions", config.max_impressions)) if v is not None}  # fmt: skip
    rules = dataclasses.replace(rules, **overrides)
    versions = {"champion": state.champion, "challenger": state.challenger}
    since = canary.step_starts()[0][2]
    health, health_source = serving_health(prometheus.url, client.metrics, since, versions, canary.mode)
    events = canary_events(warehouse.get_warehouse(), canary, state.champion)
    strata = canary_strata(events, canary)
    decision = decide_canary(
        strata, rules, step=canary.step, mode=canary.mode,
        health=(health["champion"], health["challenger"]) if health else None,
    )  # fmt: skip
    context.log.info(f"canary v{state.challenger} vs v{state.champion}: {decision.action}: {decision.reason}")
    if decision.action == "promote":
        registry.promote(state.challenger, reason=decision.reason, by=by)
    elif decision.action == "rollback":
        registry.reject_challenger(reason=decision.reason, by=by)
    elif decision.action == "step_up":
        registry.set_canary(state.challenger, step=canary.step + 1, fraction=decision.next_fraction,
                            mode=canary.mode, reason=decision.reason, by=by)  # fmt: skip
    if decision.action != "wait" and client.ready():
        client.admin("reload")
    sums = ("impressions", "clicks", "conversions", "rejections")
    totals = (
        events.group_by("step", "variant")
        .agg(pl.len().alias("users"), *(pl.col(c).sum() for c in sums))
        .with_columns(ctr=pl.col("clicks") / pl.col("impressions"))
        .sort("step", "variant")
    )
    tests = pl.DataFrame(
        [{"metric": t.metric, "champion": t.champion_rate, "challenger": t.challenger_rate, "lift": t.lift,
          "ci_low": t.lift_low, "ci_high": t.lift_high, "p_always_valid": t.p_value, "alpha": t.alpha,
          "users": t.users, "significant": t.significant} for t in decision.tests],
        schema_overrides={"champion": pl.Float64, "challenger": pl.Float64, "lift": pl.Float64,
                          "ci_low": pl.Float64, "ci_high": pl.Float64},
    )  # fmt: skip
    guard = pl.DataFrame(
        [{"variant": v, "requests": h.requests, "errors": h.errors, "error_rate": h.error_rate,
          "p99_ms": None if h.latency_p99_seconds is None else h.latency_p99_seconds * 1000}
         for v, h in (health or {}).items()],
        schema={"variant": pl.String, "requests": pl.Int64, "errors": pl.Int64, "error_rate": pl.Float64,
                "p99_ms": pl.Float64},
    )  # fmt: skip
    ctr = decision.test("ctr")
    return dg.MaterializeResult(
        metadata={
            "action": dg.MetadataValue.text(decision.action),
            "decision": dg.MetadataValue.text(decision.reason),
            "mode": dg.MetadataValue.text(canary.mode),
            "step": dg.MetadataValue.int(canary.step),
            "fraction": dg.MetadataValue.float(canary.fraction),
            "challenger_version": dg.MetadataValue.int(state.challenger),
            "champion_version": dg.MetadataValue.int(state.champion),
            "tests": markdown_table(tests),
            "kpis_by_step": markdown_table(totals, limit=20),
            "guardrails": markdown_table(guard),
            "guardrail_breaches": dg.MetadataValue.json(decision.guardrails),
            "health_source": dg.MetadataValue.text(health_source),
            "source": dg.MetadataValue.text("warehouse feedback (per user)"),
            "since": dg.MetadataValue.text(since.isoformat()),
            "ctr_p_value": dg.MetadataValue.float(ctr.p_value if ctr else float("nan")),
            "ctr_lift": dg.MetadataValue.float(ctr.lift if ctr and ctr.lift is not None else float("nan")),
            "decided_at": dg.MetadataValue.text(datetime.now(UTC).isoformat()),
            "details": dg.MetadataValue.json(json.loads(json.dumps(decision.as_dict(), default=str))),
        }
    )
