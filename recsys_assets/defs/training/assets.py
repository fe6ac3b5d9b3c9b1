"""Training: the two-tower model, trained on the temporal train side and tracked in MLflow."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

import json
import shutil
from collections import Counter
from functools import partial
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from recsys_assets.constants import MODEL_FRESHNESS, TRAINING, TRAINING_POD
from recsys_assets.data.store import copy_tree, remove_tree, write_parquet_atomic
from recsys_assets.metadata import figure, markdown_table, plot_markdown
from recsys_assets.ml.buckets import UserBuckets
from recsys_assets.ml.distribute import placement
from recsys_assets.ml.ranker import served_validation_ndcg
from recsys_assets.ml.split import PROTOCOLS, data_hash, recent, temporal_split
from recsys_assets.ml.train_worker import default_result, train_and_export
from recsys_assets.ml.tuning import TUNED, Tuning, tune
from recsys_assets.ml.two_tower import TwoTowerParams
from recsys_assets.resources import (
    MLflowResource,
    PreparedDataResource,
    RecsysHomeResource,
    ServingResource,
    TrainingResource,
)
from recsys_assets.runs import dagster_run_active
from recsys_core.registry import CHAMPION
from recsys_core.settings import storage_path

_DEFAULTS = TwoTowerParams()


class TwoTowerConfig(dg.Config):
    """Hyperparameters of the two-tower model and the holdout protocol it is judged on."""

    protocol: str = Field(default="global", description="Holdout protocol: 'global' (temporal cutoff) or 'user'.")
    embedding_dim: int = Field(default=_DEFAULTS.embedding_dim, description="Width of both towers' output.")
    learning_rate: float = Field(default=_DEFAULTS.learning_rate, description="Adagrad learning rate.")
    batch_size: int = Field(default=_DEFAULTS.batch_size, description="Training pairs per batch (in-batch negatives).")
    max_epochs: int = Field(default=_DEFAULTS.max_epochs, description="Upper bound on epochs.")
    patience: int = Field(default=_DEFAULTS.patience, description="Epochs without validation gain before stopping.")
    temperature: float = Field(default=_DEFAULTS.temperature, description="Softmax temperature of the retrieval loss.")
    l2: float = Field(default=_DEFAULTS.l2, description="L2 penalty on the id embeddings.")
    use_user_features: bool = Field(default=True, description="Feed genre shares and activity to the query tower.")
    logq_correction: bool = Field(default=True, description="Correct in-batch negatives for popularity.")
    refit: str = Field(
        default=_DEFAULTS.refit,
        description="After early stopping: 'warm' (a few more epochs on the whole train side), 'scratch' "
        "(retrain on it for the best number of epochs) or 'none'.",
    )
    refit_epochs: int = Field(default=_DEFAULTS.refit_epochs, description="Epochs of the warm refit.")
    min_train_pairs: int = Field(default=_DEFAULTS.min_train_pairs, description="Refuse to train on fewer pairs.")
    history_length: int = Field(
        default=_DEFAULTS.history_length,
        description="The query tower's history: the user's last N distinct positive tracks before each example "
        "(0: id and features only). 20 was picked on the validation split (docs/benchmarks.md).",
    )
    history_decay: float = Field(
        default=_DEFAULTS.history_decay,
        gt=0.0,
        le=1.0,
        description="Recency weighting of the history's mean: the k-th most recent track weighs decay**k "
        "(1: the plain mean). Picked on the validation split (docs/benchmarks.md).",
    )
    history_attributes: bool = Field(
        default=_DEFAULTS.history_attributes,
        description="Pool the history's tracks by their whole candidate vector (id + artist + genre embeddings) "
        "instead of their id embedding alone (docs/benchmarks.md: better on the global protocol's validation, "
        "worse on the per-user one's).",
    )
    mask_history_negatives: bool = Field(
        default=_DEFAULTS.mask_history_negatives,
        description="Leave an example's own history tracks out of its in-batch negatives (they are never its "
        "target, so as negatives they teach the tower to move away from what was just played).",
    )
    session_length: int = Field(
        default=_DEFAULTS.session_length,
        ge=0,
        description="The session term: the query moves towards the user's last N plays since the cutoff, by a "
        "weight picked on a next-play validation (0: no session term).",
    )
    ranker: bool = Field(
        default=_DEFAULTS.ranker,
        description="Train the ranking stage (a DCN over the retrieval's top 100, on the validation split's "
        "candidates); the version carries it only when its gain on its own validation is above the noise.",
    )
    seed: int = Field(default=_DEFAULTS.seed, description="Seed of every random choice.")
    window_days: int | None = Field(
        default=None,
        ge=0,
        description="Train on the last N days before the holdout's cutoff (0: everything; unset: "
        "RECSYS_TRAIN_WINDOW_DAYS). The holdout is the same whatever the window.",
    )
    tuning_budget_seconds: int | None = Field(
        default=None,
        ge=0,
        description="Seconds of the hyperparameter search on the validation split before the training (0: off; "
        "unset: RECSYS_TUNING_BUDGET_SECONDS). It starts from the champion's values (else this config's) and "
        "chooses history_length, history_decay, mask_history_negatives, history_ties, embedding_dim, "
        "temperature, learning_rate, l2, batch_size and logq_correction.",
    )

    def params(self) -> TwoTowerParams:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol={self.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        fields = TwoTowerParams.__dataclass_fields__  # window_days and the budget are not the model's
        return TwoTowerParams(**{k: v for k, v in self.model_dump().items() if k in fields})


def _train_on_workers(
    context: dg.AssetExecutionContext,
    training: TrainingResource,
    params: TwoTowerParams,
    split_dir,
    tracks: pl.DataFrame,
    protocol: str,
    model_dir: Path,
    manifest: dict,
    ann_min_items: int,
    window_days: int,
) -> dict:
    """The training on ``training.workers`` processes (``recsys_assets.ml.train_worker``): they read the
    train side and the tracks from the split's directory (local or object storage). Worker 0 exports
    the version: to ``model_dir`` on this host; from pods, to the storage root, then copied here."""
    write_parquet_atomic(tracks, split_dir / "tracks.parquet")
    exchange = split_dir.parent / "training"  # between the pods and this step, in the storage root
    out = exchange / "version" if training.on_kubernetes else model_dir
    result = storage_path(default_result(str(out)))
    args = ["--train", str(split_dir / "train.parquet"), "--tracks", str(split_dir / "tracks.parquet"),
            "--params", json.dumps(params.__dict__), "--protocol", protocol, "--out", str(out),
            "--result", str(result), "--manifest", json.dumps(manifest, default=str),
            "--ann-min-items", str(ann_min_items), "--window-days", str(window_days),
            "--bucket-rows", str(training.bucket_rows)]  # fmt: skip
    name = f"recsys-train-{context.run.run_id[:8]}"
    training.run_workers(context, args, log_dir=model_dir.with_name(f"{model_dir.name}.logs"), name=name)
    outcome = json.loads(result.read_text())
    if training.on_kubernetes:
        copy_tree(out, model_dir)
        remove_tree(exchange)  # MLflow gets the version from here
    else:
        result.unlink()
    for record in outcome["history"]:
        context.log.info(f"epoch {record}")
    return outcome


def _search(
    context: dg.AssetExecutionContext,
    registry,
    parent: str,
    train,
    tracks: pl.DataFrame,
    protocol: str,
    params: TwoTowerParams,
    budget_seconds: int,
) -> Tuning:
    """The per-training search (``recsys_assets.ml.tuning``) on ``train``'s validation split, warm-started
    from the champion's logged values; each trial is an MLflow run nested under ``parent``."""
    champion = registry.by_alias(CHAMPION)
    warm = registry.run_params(champion.run_id) if champion and champion.run_id else None
    context.log.info(
        f"searching the hyperparameters for {budget_seconds} s, from "
        + (f"the champion's values (version {champion.version})" if warm else "this config's values")
    )

    def record(trial: dict) -> None:
        context.log.info(f"tuning trial {trial}")
        run_id = registry.start_run(
            run_name=f"trial-{trial['number']}",
            tags={"dagster.run_id": context.run.run_id, "dagster.asset": "two_tower_model",
                  "recsys.tuning.state": trial["state"], **({"recsys.tuning.error": trial["error"][:4000]}
                                                            if "error" in trial else {})},
            parent=parent,
        )  # fmt: skip
        metrics = {"val_recall_at_20": trial["value"], "seconds": trial["seconds"]}  # no value: pruned or failed
        registry.log_run(run_id, params=trial["params"], metrics=metrics)
        registry.end_run(run_id, status={"complete": "FINISHED", "pruned": "KILLED"}.get(trial["state"], "FAILED"))

    # With the ranking stage the finalists are judged by what each would serve (ml/tuning.py).
    judge = partial(served_validation_ndcg, window=train, tracks=tracks, protocol=protocol) if params.ranker else None
    return tune(train, tracks, protocol, params, budget_seconds, warm_start=warm, on_trial=record, judge=judge)


def _loss_plot(history: list[dict]):
    fig, ax = figure()
    epochs = [h for h in history if h.get("phase") != "refit"]
    ax.plot([h["epoch"] for h in epochs], [h["loss"] for h in epochs], marker="o", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if any("val_recall@20" in h for h in epochs):
        twin = ax.twinx()
        twin.plot([h["epoch"] for h in epochs], [h.get("val_recall@20") for h in epochs], color="tab:orange",
                  marker="s", label="validation recall@20")  # fmt: skip
        twin.set_ylabel("validation recall@20")
    ax.set_title("two-tower training")
    return plot_markdown(fig, "training curves")


@dg.asset(
    group_name=TRAINING,
    deps=["training_interactions", "track_features"],
    kinds={"tensorflow", "mlflow"},
    freshness_policy=MODEL_FRESHNESS,
    op_tags=TRAINING_POD,
)
def two_tower_model(
    context: dg.AssetExecutionContext,
    config: TwoTowerConfig,
    prepared: PreparedDataResource,
    mlflow: MLflowResource,
    recsys_home: RecsysHomeResource,
    serving: ServingResource,
    training: TrainingResource,
) -> dg.Output[dict]:
    """Two-tower retrieval model (TFRS), trained on the temporal train side, exported as one version directory.

    The split, the training history and the lineage (cutoff, row counts, data hash) go to an MLflow
    run; the version directory (towers as SavedModels, embeddings, vocabularies, seen lists,
    popularity fallback) is logged as the run's pyfunc model. Registration waits for the gate.

    It trains in this process, or on ``RECSYS_TRAIN_WORKERS`` worker processes (``TrainingResource``).
    """

    params = config.params()
    registry = mlflow.get_control_plane()
    registry.check()  # an unreachable store fails now, not after the training
    for abandoned in registry.fail_abandoned_runs(lambda owner: dagster_run_active(context.instance, owner)):
        context.log.warning(f"MLflow run {abandoned} of a killed training was still RUNNING: ended as FAILED")
    store = prepared.get_store()
    interactions = store.scan_table("training_interactions").collect()
    tracks = store.scan_table("track_features").select("track_id", "artist_id", "genre").collect()
    window_days = config.window_days if config.window_days is not None else training.window_days
    budget = training.tuning_budget_seconds if config.tuning_budget_seconds is None else config.tuning_budget_seconds
    # The window is the model's training only: the split, the evaluation and the seen lists keep the whole
    # train side (ml/split.py, recent).
    split = temporal_split(interactions, config.protocol)
    lineage = {
        "protocol": split.protocol,
        "cutoff": split.cutoff.isoformat() if split.cutoff else None,
        "data_hash": data_hash(interactions),
        "interactions": interactions.height,
        "window_days": window_days,
        "window_interactions": recent(split.train, window_days or 0).height,
        "max_played_at": interactions["played_at"].max().isoformat(),
        **split.sizes(),
    }
    context.log.info(f"split: {json.dumps(lineage)}")
    run_id = registry.start_run(
        run_name=f"dagster-{context.run.run_id[:8]}",
        tags={
            "dagster.run_id": context.run.run_id,
            "dagster.asset": "two_tower_model",
            "recsys.protocol": split.protocol,
        },
    )
    model_dir = recsys_home.models_dir / "candidates" / run_id  # local: MLflow then has it
    split_dir = recsys_home.runs_dir / run_id / "split"  # the storage root: evaluation may run elsewhere
    try:
        manifest = {"mlflow_run_id": run_id, "dagster_run_id": context.run.run_id, "data": lineage}
        write_parquet_atomic(split.train, split_dir / "train.parquet")
        write_parquet_atomic(split.holdout, split_dir / "holdout.parquet")
        tuning = None
        if budget:  # in this process, on the window the model trains on; the workers then train the choice
            side = recent(split.train, window_days or 0)
            if side.height > training.bucket_rows:
                side = UserBuckets.of(side, training.bucket_rows)
            tuning = _search(context, registry, run_id, side, tracks, split.protocol, params, budget)
            params = tuning.params
            context.log.info(f"chosen in {tuning.seconds:.0f} s over {len(tuning.trials)} trials: "
                             f"{ {k: getattr(params, k) for k in TUNED} }")  # fmt: skip
        if training.distributed:
            trained = _train_on_workers(context, training, params, split_dir, tracks, split.protocol, model_dir,
                                        manifest, serving.ann_min_items, window_days or 0)  # fmt: skip
        else:
            trained = train_and_export(
                split.train, tracks, params, split.protocol, model_dir, manifest, placement(training.strategy),
                serving.ann_min_items, progress=lambda record: context.log.info(f"epoch {record}"),
                window_days=window_days or 0, bucket_rows=training.bucket_rows,
            )  # fmt: skip
        registry.log_run(
            run_id,
            params={**params.__dict__, "protocol": split.protocol},
            metrics={
                "train_seconds": trained["train_seconds"],
                "examples_per_second": trained["examples_per_second"],
                "best_epoch": trained["best_epoch"],
                "session_weight": trained["session_weight"],
                **(_tuning_metrics(tuning) if tuning else {}),
                **_ranker_metrics(trained.get("ranker")),
            },
            history=trained["history"],
            tags={f"recsys.{k}": str(v) for k, v in lineage.items()},
        )
        model_uri = registry.log_model(run_id, model_dir)
        registry.end_run(run_id)
    except BaseException:
        registry.end_run(run_id, status="FAILED")
        shutil.rmtree(model_dir, ignore_errors=True)
        remove_tree(split_dir)
        raise
    history = pl.DataFrame(trained["history"])
    value = {
        "mlflow_run_id": run_id,
        "model_uri": model_uri,
        "model_dir": str(model_dir),
        "split_dir": str(split_dir),
        "lineage": lineage,
        "params": params.__dict__,
    }
    return dg.Output(
        value,
        metadata={
            "mlflow_run_id": dg.MetadataValue.text(run_id),
            "model_uri": dg.MetadataValue.text(model_uri),
            "model_dir": dg.MetadataValue.path(str(model_dir)),
            "cutoff": dg.MetadataValue.text(str(lineage["cutoff"])),
            "train_interactions": dg.MetadataValue.int(lineage["train_interactions"]),
            "train_pairs": dg.MetadataValue.int(trained["pairs"]),
            "best_epoch": dg.MetadataValue.int(trained["best_epoch"]),
            # The session term's weight and the next-play validation it was picked on.
            "session_weight": dg.MetadataValue.float(trained["session_weight"]),
            "session_validation": markdown_table(pl.DataFrame(trained["session_scores"]), limit=10),
            "train_seconds": dg.MetadataValue.float(round(trained["train_seconds"], 2)),
            # Where it trained: the tf.distribute strategy, its workers and replicas.
            "training": dg.MetadataValue.json({k: trained[k] for k in ("strategy", "workers", "replicas")}),
            "examples_per_second": dg.MetadataValue.float(round(trained["examples_per_second"], 1)),
            "data_hash": dg.MetadataValue.text(lineage["data_hash"]),
            "history": markdown_table(history, limit=60),
            "training_curves": _loss_plot(trained["history"]),
            # Whether this version carries an ANN index (catalogues of RECSYS_ANN_MIN_ITEMS tracks or more).
            "ann_index": dg.MetadataValue.json(
                trained["ann"] or {"built": False, "items": trained["items"], "min_items": serving.ann_min_items}
            ),  # fmt: skip
            **(_tuning_metadata(tuning, budget) if tuning else {"tuning": dg.MetadataValue.text("off (budget 0)")}),
            # The ranking stage: kept or not, and its validation against the retrieval order.
            "ranking_stage": dg.MetadataValue.json(trained.get("ranker") or {"trained": False}),
        },
    )


def _ranker_metrics(stage: dict | None) -> dict[str, float]:
    if not stage or "val_ndcg@10" not in stage:
        return {}
    return {"ranker_kept": float(stage["kept"]), "ranker_val_ndcg_at_10": stage["val_ndcg@10"],
            "ranker_retrieval_val_ndcg_at_10": stage["retrieval_val_ndcg@10"],
            "ranker_ease_lambda": stage["ease_lambda"]}  # fmt: skip


def _tuning_metrics(tuning: Tuning) -> dict[str, float]:
    return {"tuning_seconds": tuning.seconds, "tuning_trials": len(tuning.trials),
            "tuning_best_val_recall_at_20": tuning.best_value, "tuning_chosen_trial": tuning.chosen_trial}  # fmt: skip


def _tuning_metadata(tuning: Tuning, budget: int) -> dict:
    """The search in the asset's metadata: the chosen values, its time and trials, and every trial."""
    return {
        "tuning": dg.MetadataValue.json({
            "chosen": {k: getattr(tuning.params, k) for k in TUNED},
            "best_val_recall@20": tuning.best_value,
            "chosen_trial": tuning.chosen_trial,
            "finalists": tuning.finalists,
            "seconds": round(tuning.seconds, 1),
            "budget_seconds": budget,
            "trials": dict(Counter(t["state"] for t in tuning.trials)),
        }),
        "tuning_trials": markdown_table(pl.DataFrame(tuning.table()), limit=100),
    }  # fmt: skip
