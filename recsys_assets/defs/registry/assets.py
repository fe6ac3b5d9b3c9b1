"""Registry: a blessed model becomes a new MLflow version (challenger, or champion if it is the first)."""

# No `from __future__ import annotations` here (see assets/training.py).

import dagster as dg

from recsys_assets.constants import REGISTRY
from recsys_assets.resources import MLflowResource
from recsys_core.validation import UnservableVersion


@dg.asset(group_name=REGISTRY, kinds={"mlflow"})
def registered_model(
    context: dg.AssetExecutionContext, two_tower_model: dict, model_evaluation: dict, mlflow: MLflowResource
) -> dg.Output[dict]:
    """The candidate registered as a version of ``recsys-two-tower``: challenger, or champion if first.

    Runs only when the blocking ``promotion_gate`` check passed; the version carries the data lineage
    and the decision, and its alias history records when, from, to, why and by whom.
    """
    decision = model_evaluation["decision"]
    if not decision["promote"]:
        raise dg.Failure(
            description="the gate rejected this candidate; it is not registered",
            metadata={"reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision["reasons"]))},
        )
    registry = mlflow.get_control_plane()
    lineage = {
        **two_tower_model["lineage"],
        "dagster_run_id": context.run.run_id,
        "evaluation_report": model_evaluation["report_path"],
        "gate": "forced" if decision["forced"] else "passed",
        "gate_reference": decision["reference"],
    }
    reason = ("forced by the operator; " if decision["forced"] else "") + "; ".join(decision["reasons"])
    try:
        version = registry.register(
            model_uri=two_tower_model["model_uri"],
            run_id=two_tower_model["mlflow_run_id"],
            lineage=lineage,
            reason=reason[:4000],
            by=f"dagster run {context.run.run_id}",
        )
    except UnservableVersion as exc:  # registered as "rejected", with no alias: the loop goes on
        raise dg.Failure(
            description=f"version {exc.version} was rejected: it cannot be served ({exc.reason})",
            metadata={"version": dg.MetadataValue.int(exc.version), "reason": dg.MetadataValue.text(exc.reason)},
        ) from exc
    context.log.info(f"registered version {version.version} with aliases {version.aliases}")
    return dg.Output(
        {"version": version.version, "aliases": version.aliases, "mlflow_run_id": two_tower_model["mlflow_run_id"]},
        metadata={
            "version": dg.MetadataValue.int(version.version),
            "aliases": dg.MetadataValue.text(", ".join(version.aliases)),
            "mlflow_run_id": dg.MetadataValue.text(two_tower_model["mlflow_run_id"]),
            "gate": dg.MetadataValue.text(lineage["gate"]),
        },
    )
