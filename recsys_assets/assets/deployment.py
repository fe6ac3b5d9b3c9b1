"""Deployment: the Bento, its rollout (local server or Kubernetes manifests), and the canary decision."""

# No `from __future__ import annotations` here (see assets/training.py).

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

from recsys_assets.constants import DEPLOYMENT
from recsys_assets.data.kpis import PrometheusError, kpis_from_prometheus, kpis_from_warehouse
from recsys_assets.metadata import markdown_table
from recsys_assets.ml.canary import CanaryRules, decide_canary
from recsys_assets.ml.registry import CHALLENGER, CHAMPION
from recsys_assets.resources import (
    MLflowResource,
    PrometheusResource,
    RecsysHomeResource,
    ServingResource,
    WarehouseResource,
)
from recsys_assets.settings import automation_settings
from recsys_assets.stack.services import REPO_ROOT

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

    canary_fraction: float = Field(
        default=automation_settings().canary_fraction,
        description="Share of users (stable hash) who get the challenger (RECSYS_CANARY_FRACTION).",
    )
    require_running_service: bool = Field(
        default=False,
        description="Fail when the local service does not answer (else it loads the versions when it starts).",
    )


@dg.asset(group_name=DEPLOYMENT, kinds={"bentoml", "kubernetes"})
def model_deployment(
    context: dg.AssetExecutionContext,
    config: DeploymentConfig,
    recommender_bento: dict,
    serving: ServingResource,
    recsys_home: RecsysHomeResource,
    mlflow: MLflowResource,
) -> dg.Output[dict]:
    """The deployed recommender: the running service reloaded onto the registry's versions, and
    Kubernetes manifests for the Bento's container.

    Locally the running ``bentoml serve`` is told to follow the registry now and to canary the
    challenger to ``canary_fraction`` of users; the asset checks that it serves the expected
    versions. For production the manifests under ``$RECSYS_HOME/deploy/k8s`` name the container of
    this Bento.
    """
    tag = recommender_bento["tag"]
    image = f"recommender:{tag.split(':', 1)[1]}"
    rendered = string.Template(K8S_TEMPLATE.read_text()).safe_substitute(
        BENTO_TAG=tag,
        IMAGE=image,
        CANARY_FRACTION=config.canary_fraction,
        CHAMPION_VERSION=recommender_bento["champion"],
        CHALLENGER_VERSION=recommender_bento["challenger"] or "",
    )
    manifests = recsys_home.path / "deploy" / "k8s" / "recommender.yaml"
    manifests.parent.mkdir(parents=True, exist_ok=True)
    manifests.write_text(rendered)

    client = serving.get_client()
    status = "not running: it loads the registry's versions when it starts"
    served = {}
    if client.ready():
        client.admin("reload")
        served = client.admin("canary", {"fraction": config.canary_fraction})
        expected = (recommender_bento["champion"], recommender_bento["challenger"])
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
            f", challenger v{served['challenger_version']} to {config.canary_fraction:.0%} of users"
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
            "canary_fraction": config.canary_fraction,
        },
        metadata={
            "status": dg.MetadataValue.text(status),
            "service_url": dg.MetadataValue.url(client.url),
            "image": dg.MetadataValue.text(image),
            "manifests": dg.MetadataValue.path(str(manifests)),
            "canary_fraction": dg.MetadataValue.float(config.canary_fraction),
        },
    )


class CanaryConfig(dg.Config):
    """When the canary has seen enough."""

    min_impressions: int = Field(
        default=automation_settings().canary_min_impressions,
        description="Per variant, before any decision (RECSYS_CANARY_MIN_IMPRESSIONS).",
    )
    max_impressions: int = Field(
        default=automation_settings().canary_max_impressions,
        description="Per variant: no significant difference by then means promote (RECSYS_CANARY_MAX_IMPRESSIONS).",
    )
    alpha: float = Field(default=CanaryRules.alpha, description="Significance level of the two-proportion tests.")


@dg.asset(group_name=DEPLOYMENT, deps=["model_deployment"], kinds={"prometheus", "mlflow"})
def canary_analysis(
    context: dg.AssetExecutionContext,
    config: CanaryConfig,
    mlflow: MLflowResource,
    warehouse: WarehouseResource,
    prometheus: PrometheusResource,
    serving: ServingResource,
) -> dg.MaterializeResult:
    """Canary analysis: per-variant CTR, conversion and rejection, and the decision taken on them.

    Reads the counters since the challenger was registered (from Prometheus when ``PROMETHEUS_URL``
    is set, else from the feedback in the warehouse), runs two-proportion tests, then promotes the
    challenger to champion or rolls it back, records the decision on the MLflow version and tells the
    service to reload. With too little traffic it decides nothing and says how much is missing.
    """
    registry = mlflow.get_registry()
    challenger = registry.by_alias(CHALLENGER)
    champion = registry.by_alias(CHAMPION)
    if challenger is None or champion is None:
        return dg.MaterializeResult(metadata={"decision": dg.MetadataValue.text("no canary running"), "action": "none"})
    since = challenger.created_at
    versions = {"champion": champion.version, "challenger": challenger.version}
    source = "warehouse feedback"
    if prometheus.url:
        try:
            stats = kpis_from_prometheus(prometheus.url, since, versions)
            source = f"Prometheus {prometheus.url}"
        except PrometheusError as exc:
            context.log.warning(f"{exc}; reading the warehouse instead")
            stats = kpis_from_warehouse(warehouse.get_warehouse(), since, versions)
    else:
        stats = kpis_from_warehouse(warehouse.get_warehouse(), since, versions)
    rules = CanaryRules(
        min_impressions=config.min_impressions, max_impressions=config.max_impressions, alpha=config.alpha
    )
    decision = decide_canary(stats["champion"], stats["challenger"], rules)
    context.log.info(f"canary v{challenger.version} vs v{champion.version}: {decision.action}: {decision.reason}")
    by = f"canary_analysis (dagster run {context.run.run_id})"
    if decision.action == "promote":
        registry.promote(challenger.version, reason=decision.reason, by=by)
    elif decision.action == "rollback":
        registry.reject_challenger(reason=decision.reason, by=by)
    if decision.action != "wait":
        client = serving.get_client()
        if client.ready():
            client.admin("reload")
    table = pl.DataFrame(
        [
            {
                "variant": s.variant,
                "model_version": s.model_version,
                "impressions": s.impressions,
                "clicks": s.clicks,
                "ctr": s.ctr,
                "conversion": s.conversion_rate,
                "rejection": s.rejection_rate,
            }
            for s in stats.values()
        ]
    )
    return dg.MaterializeResult(
        metadata={
            "action": dg.MetadataValue.text(decision.action),
            "decision": dg.MetadataValue.text(decision.reason),
            "challenger_version": dg.MetadataValue.int(challenger.version),
            "champion_version": dg.MetadataValue.int(champion.version),
            "kpis": markdown_table(table),
            "source": dg.MetadataValue.text(source),
            "since": dg.MetadataValue.text(since.isoformat()),
            "ctr_p_value": dg.MetadataValue.float(decision.ctr_p if decision.ctr_p is not None else float("nan")),
            "decided_at": dg.MetadataValue.text(datetime.now(UTC).isoformat()),
            "details": dg.MetadataValue.json(json.loads(json.dumps(decision.as_dict()))),
        }
    )
