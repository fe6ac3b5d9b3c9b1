"""Evaluation: the candidate, the champion re-scored and popularity on the same holdout, and the gate."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from recsys_assets.constants import EVALUATION
from recsys_assets.data.store import read_parquet, write_json_atomic
from recsys_assets.metadata import figure, markdown_table, plot_markdown
from recsys_assets.ml.gate import DEFAULT_GUARDS, GateRules
from recsys_assets.resources import MLflowResource, RecsysHomeResource
from recsys_core.settings import storage_path
from recsys_sim.simulation import world_dir

CORE_METRICS = ("ndcg@10", "recall@10", "precision@10", "map@10", "hit_rate@10", "ndcg@20", "recall@20",
                "coverage@10", "novelty@10", "sim_ctr@10")  # fmt: skip


class GateConfig(dg.Config):
    """When a candidate may replace the champion."""

    primary_metric: str = Field(default="ndcg@10", description="The metric that must improve.")
    min_improvement: float = Field(
        default=0.0, description="Required relative improvement of the primary metric (0.02 = +2%)."
    )
    guards: dict[str, float] = Field(
        default=dict(DEFAULT_GUARDS),
        description="Guard metric -> allowed relative regression against the reference.",
    )
    force: bool = Field(default=False, description="Promote regardless of the metrics (recorded as forced).")
    bootstrap_samples: int = Field(default=1000, description="Resamples of users for the confidence intervals.")
    ease_max_items: int = Field(
        default=2000,
        description="EASE, a strong linear baseline, is scored beside the candidate as a reference (it gates "
        "nothing) over this many most-listened tracks; 0 leaves it out.",
    )

    def rules(self) -> GateRules:
        return GateRules(
            primary_metric=self.primary_metric,
            min_improvement=self.min_improvement,
            guards=tuple(self.guards.items()),
            force=self.force,
            bootstrap_samples=self.bootstrap_samples,
        )


def click_model_for(home: Path):
    """The simulator's click model when the data came from the simulator, else ``None``."""
    from recsys_sim.simulator import World

    directory = world_dir(home)
    if not (directory / "world.json").exists():
        return None
    world = World.load(directory)
    return lambda users, tracks: world.click_probability(users, tracks)


def _metrics_table(results: dict[str, dict[str, float]]) -> pl.DataFrame:
    names = [m for m in CORE_METRICS if any(m in r for r in results.values())]
    return pl.DataFrame(
        {"metric": names, **{model: [r.get(m) for m in names] for model, r in results.items()}},
        strict=False,
    )


def _bar_plot(results: dict[str, dict[str, float]]):
    fig, ax = figure(7, 3.2)
    metrics = [
        m
        for m in ("ndcg@10", "recall@10", "precision@10", "map@10", "hit_rate@10")
        if m in next(iter(results.values()))
    ]
    width = 0.8 / len(results)
    for i, (model, r) in enumerate(results.items()):
        ax.bar(np.arange(len(metrics)) + i * width, [r[m] for m in metrics], width, label=model)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(results) - 1) / 2, metrics)
    ax.legend()
    ax.set_title("same holdout, same users")
    return plot_markdown(fig, "metrics")


@dg.asset(group_name=EVALUATION, kinds={"polars", "mlflow"})
def model_evaluation(
    context: dg.AssetExecutionContext,
    config: GateConfig,
    two_tower_model: dict,
    mlflow: MLflowResource,
    recsys_home: RecsysHomeResource,
) -> dg.Output[dict]:
    """Evaluation report: candidate, champion re-scored and popularity on the same holdout, with the gate's decision.

    EASE (capped to the most-listened tracks, λ picked on the validation split) is scored beside them
    as a reference: how the candidate stands against a strong linear baseline on this data. Only the
    champion and the popularity floor gate the candidate.

    The report is also written to ``$RECSYS_HOME/reports/evaluation/<run id>.json`` and its metrics to
    the candidate's MLflow run. The blocking check ``promotion_gate`` acts on the decision.
    """
    from recsys_assets.ml.gate import decide
    from recsys_assets.ml.metrics import build_eval_set, evaluate, popularity_scorer
    from recsys_core.registry import CHAMPION
    from recsys_core.scoring import Ranker

    registry = mlflow.get_control_plane()
    split_dir = storage_path(two_tower_model["split_dir"])
    train = read_parquet(split_dir / "train.parquet")
    holdout = read_parquet(split_dir / "holdout.parquet")
    eval_set = build_eval_set(train, holdout)
    clicks = click_model_for(recsys_home.path)
    model_dir = Path(two_tower_model["model_dir"])
    if not (model_dir / "manifest.json").exists():  # trained in another pod: MLflow has it
        model_dir = registry.download_logged(two_tower_model["model_uri"])
    candidate_ranker = Ranker.load(model_dir, version=0)
    candidate = evaluate(candidate_ranker.scorer(eval_set.items), eval_set, click_model=clicks)
    popularity = evaluate(popularity_scorer(train, eval_set.items), eval_set, click_model=clicks)
    results = {"candidate": candidate.metrics}
    champion_eval, champion_label = None, None
    champion = registry.by_alias(CHAMPION)
    if champion is not None:
        champion_dir = registry.download(champion.version)
        champion_eval = evaluate(
            Ranker.load(champion_dir, version=0).scorer(eval_set.items), eval_set, click_model=clicks
        )
        champion_label = f"champion v{champion.version}"
        results[champion_label] = champion_eval.metrics
    results["popularity"] = popularity.metrics
    ease, ease_lambda = None, None
    if config.ease_max_items > 0:
        protocol = two_tower_model["lineage"]["protocol"]
        ease, ease_lambda = _reference_ease(train, protocol, eval_set, config.ease_max_items)
        results["EASE (reference)"] = ease.metrics
    decision = decide(candidate, champion_eval, popularity, config.rules(), champion_label or "champion")
    context.log.info(decision.summary())

    report = {
        "dagster_run_id": context.run.run_id,
        "created_at": datetime.now(UTC).isoformat(),
        "mlflow_run_id": two_tower_model["mlflow_run_id"],
        "protocol": two_tower_model["lineage"]["protocol"],
        "split": {**two_tower_model["lineage"], **eval_set.sizes()},
        "champion_version": champion.version if champion else None,
        "metrics": results,
        "decision": decision.as_dict(),
        "gate": config.rules().__dict__,
    }
    path = recsys_home.reports_dir / "evaluation" / f"{context.run.run_id}.json"
    write_json_atomic(report, path)
    registry.log_run(
        two_tower_model["mlflow_run_id"],
        metrics={
            **{f"eval_{k}": v for k, v in candidate.metrics.items()},
            **{f"popularity_{k}": v for k, v in popularity.metrics.items()},
            **({f"champion_{k}": v for k, v in champion_eval.metrics.items()} if champion_eval else {}),
            **({f"ease_{k}": v for k, v in ease.metrics.items()} if ease else {}),
        },
        tags={"recsys.gate": "promote" if decision.promote else "reject", "recsys.gate_forced": str(decision.forced)},
    )
    deltas = pl.DataFrame([d.__dict__ for d in decision.deltas]).filter(pl.col("metric").is_in(CORE_METRICS))
    return dg.Output(
        report | {"report_path": str(path)},
        metadata={
            "decision": dg.MetadataValue.text(decision.summary()),
            "promote": dg.MetadataValue.bool(decision.promote),
            "forced": dg.MetadataValue.bool(decision.forced),
            "reference": dg.MetadataValue.text(decision.reference),
            "metrics": markdown_table(_metrics_table(results), limit=20),
            "deltas_vs_reference": markdown_table(deltas, limit=20),
            "metrics_plot": _bar_plot(results),
            "eval_users": dg.MetadataValue.int(len(eval_set.users)),
            **(
                {
                    "ease_lambda": dg.MetadataValue.float(ease_lambda),
                    "ndcg@10_vs_ease": dg.MetadataValue.float(
                        candidate.metrics["ndcg@10"] / ease.metrics["ndcg@10"] if ease.metrics["ndcg@10"] else 0.0
                    ),
                }
                if ease
                else {}
            ),
            "relevant_pairs": dg.MetadataValue.int(int(eval_set.n_relevant.sum())),
            "ndcg@10": dg.MetadataValue.float(candidate.metrics["ndcg@10"]),
            "recall@10": dg.MetadataValue.float(candidate.metrics["recall@10"]),
            "report": dg.MetadataValue.path(str(path)),
            "mlflow_run_id": dg.MetadataValue.text(two_tower_model["mlflow_run_id"]),
        },
    )


@dg.asset_check(asset=model_evaluation, blocking=True, description="The gate: the candidate must beat the champion.")
def promotion_gate(model_evaluation: dict) -> dg.AssetCheckResult:
    decision = model_evaluation["decision"]
    primary = next(d for d in decision["deltas"] if d["metric"] == model_evaluation["gate"]["primary_metric"])
    return dg.AssetCheckResult(
        passed=bool(decision["promote"]),
        metadata={
            "reference": dg.MetadataValue.text(decision["reference"]),
            "forced": dg.MetadataValue.bool(decision["forced"]),
            "primary_metric": dg.MetadataValue.text(model_evaluation["gate"]["primary_metric"]),
            "observed": dg.MetadataValue.float(primary["candidate"]),
            "threshold": dg.MetadataValue.float(
                primary["reference"] * (1 + model_evaluation["gate"]["min_improvement"])
            ),
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision["reasons"])),
        },
    )


def _reference_ease(train: pl.DataFrame, protocol: str, eval_set, max_items: int):
    """EASE scored on the same holdout as the candidate, λ picked on the same validation split."""
    from recsys_assets.ml.baselines import reference_ease
    from recsys_assets.ml.metrics import evaluate
    from recsys_assets.ml.split import validation_split

    val = validation_split(train, protocol)
    scorer, lam = reference_ease(
        train, (val.train, val.holdout), eval_set.items, max_items,
        lambda s, e: evaluate(s, e).metrics["ndcg@10"],
    )  # fmt: skip
    return evaluate(scorer, eval_set), lam
