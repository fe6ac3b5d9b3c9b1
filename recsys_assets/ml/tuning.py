"""Hyperparameters chosen at each training, on the validation split (plain module: no Dagster).

Every default of :class:`~recsys_assets.ml.two_tower.TwoTowerParams` was chosen on one dataset's
validation split. A platform that trains on many catalogues chooses them on each catalogue's own, at
every training, as EASE chooses its λ: Optuna's TPE sampler proposes values of the knobs that matter
(the history on or off and its length, its decay, the history mask, whether plays at the same instant
count as history, the embedding dimension, the temperature, the learning rate, the l2 penalty, the
batch size and the logQ correction of the in-batch negatives), a
median pruner stops a trial whose validation
recall@20 after an epoch is below the median of the earlier trials' at that epoch, and the search
stops starting trials once its time budget is spent; a trial still training then stops at the end of
its epoch and counts with its best epoch so far (a small batch on a large catalogue would otherwise
run its 30 epochs past the budget).

- Each trial trains on the fit part and is scored by its best validation recall@20, the measure early
  stopping uses; the holdout is never seen. Trials skip the refit and the popularity prior's and
  session term's picks (they come after the measure), so a trial costs its epochs only.
- The first trial is the warm start (the champion's values when there is one, else the defaults): a
  retrain searches near what won last time, and the chosen values are never worse on validation than
  the warm start's.
- With a ranking stage (``judge``), what is served is the stage's reordering of the retrieval's
  candidates, and the retrieval that recalls best alone is not always the one the stage does best
  with: on a sparse long-tail catalogue the search chose a retrieval without history (validation
  recall@20 0.0226 against the warm start's 0.0176) that came out worse through the stage (holdout
  NDCG@10 0.0278 against 0.0313, docs/benchmarks.md). So when the search's best trial is not the warm
  start, the two finalists, both trained already, are judged by the NDCG@10 of what each would serve on
  the same validation split (the stage fitted on it, scored out of fold: ml/ranker.py), and the better
  one is chosen. Two stage fits, after the budget: a search that found nothing better than the warm
  start (the demo's first training, with its one trial) costs none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace

import polars as pl

from recsys_assets.ml.buckets import UserBuckets
from recsys_assets.ml.split import SplitError
from recsys_assets.ml.two_tower import TrainedTwoTower, TrainingError, TwoTowerParams, train_two_tower

log = logging.getLogger(__name__)

HISTORY_LENGTHS = (0, 10, 20, 50)  # 0: no history (the static query tower)
EMBEDDING_DIMS = (32, 64, 128)
L2 = (0.0, 1e-6, 1e-5, 1e-4)
# A catalogue of 20k pairs gets 10 steps an epoch at 2,048 (and 2,047 in-batch negatives for each);
# a large one trains faster per epoch with large batches.
BATCH_SIZES = (256, 512, 1024, 2048, 4096)
TUNED = ("history_length", "history_decay", "mask_history_negatives", "history_ties", "embedding_dim",
         "temperature", "learning_rate", "l2", "batch_size", "logq_correction")  # fmt: skip
_WITH_HISTORY = ("history_decay", "mask_history_negatives", "history_ties")  # searched only with a history


@dataclass
class Tuning:
    """The search's outcome: the chosen parameters and every trial (number, state, value, values, seconds);
    ``finalists``: each finalist's trial number and served validation NDCG@10 when they were judged."""

    params: TwoTowerParams
    best_value: float | None
    trials: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    chosen_trial: int = 0
    finalists: list[dict] = field(default_factory=list)

    def table(self) -> list[dict]:
        """The trials as rows for the asset's metadata (the tuned values flattened)."""
        return [
            {"trial": t["number"], "state": t["state"], "val_recall@20": t["value"],
             "seconds": round(t["seconds"], 1), **t["params"]}
            for t in self.trials
        ]  # fmt: skip


def suggest(trial) -> dict:
    """One trial's values of the tuned knobs (``TUNED``); the decay and the mask only with a history."""
    history = trial.suggest_categorical("history_length", HISTORY_LENGTHS)
    values = {
        "history_length": history,
        "embedding_dim": trial.suggest_categorical("embedding_dim", EMBEDDING_DIMS),
        "temperature": trial.suggest_float("temperature", 0.02, 0.3, log=True),
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
        "l2": trial.suggest_categorical("l2", L2),
        "batch_size": trial.suggest_categorical("batch_size", BATCH_SIZES),
        "logq_correction": trial.suggest_categorical("logq_correction", (True, False)),
    }
    if history:
        values["history_decay"] = trial.suggest_float("history_decay", 0.5, 1.0)
        values["mask_history_negatives"] = trial.suggest_categorical("mask_history_negatives", (True, False))
        values["history_ties"] = trial.suggest_categorical("history_ties", (False, True))
    return values


def warm_values(params: Mapping) -> dict:
    """The tuned knobs of ``params`` (a champion's logged parameters, or a ``TwoTowerParams``' dict), as
    a first trial: values outside the search space are moved to its nearest point."""
    base = asdict(TwoTowerParams())
    values = {
        k: _bool(params.get(k, base[k])) if isinstance(base[k], bool) else type(base[k])(params.get(k, base[k]))
        for k in TUNED
    }
    values["history_length"] = min(HISTORY_LENGTHS, key=lambda n: abs(n - values["history_length"]))
    values["embedding_dim"] = min(EMBEDDING_DIMS, key=lambda d: abs(d - values["embedding_dim"]))
    values["l2"] = min(L2, key=lambda v: abs(v - values["l2"]))
    values["batch_size"] = min(BATCH_SIZES, key=lambda b: abs(b - values["batch_size"]))
    values["temperature"] = min(max(values["temperature"], 0.02), 0.3)
    values["learning_rate"] = min(max(values["learning_rate"], 0.01), 0.3)
    values["history_decay"] = min(max(values["history_decay"], 0.5), 1.0)
    if not values["history_length"]:
        for key in _WITH_HISTORY:
            del values[key]
    return values


class _OutOfTime(Exception):
    """Raised between a trial's epochs once the search's budget is spent."""


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def tune(
    train: pl.DataFrame | UserBuckets,
    tracks: pl.DataFrame,
    protocol: str,
    base: TwoTowerParams,
    budget_seconds: float,
    warm_start: Mapping | None = None,
    max_trials: int | None = None,
    on_trial: Callable[[dict], None] | None = None,
    judge: Callable[[TrainedTwoTower], float | None] | None = None,
) -> Tuning:
    """Search the tuned knobs of ``base`` on ``train``'s validation split (``protocol``) for
    ``budget_seconds`` (checked between trials) or ``max_trials``; every other field of ``base`` is
    kept. Returns ``base`` with the best trial's values (the warm start's when nothing beat it), or,
    with ``judge`` (a trained trial's served validation NDCG@10, ``None`` when it cannot say), the values
    of whichever of the best trial and the warm start it scores higher.

    Raises:
        TrainingError: the warm start itself cannot train (the data are too small for any trial).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=base.seed, n_startup_trials=4),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    study.enqueue_trial(warm_values(warm_start or asdict(base)))
    trials: list[dict] = []
    finalists: dict[int, tuple[float, TrainedTwoTower]] = {}  # the warm start's model and the best other

    def keep_finalist(number: int, value: float, trained: TrainedTwoTower) -> None:
        if judge is None:
            return
        best_other = next((n for n in finalists if n), None)
        if number and best_other is not None:
            if value <= finalists[best_other][0]:
                return
            del finalists[best_other]
        finalists[number] = (value, trained)

    def objective(trial) -> float:
        values = suggest(trial)
        params = replace(base, **values, refit="none", popularity_prior=False, session_length=0)
        t0 = time.perf_counter()
        state, value = "failed", None

        scores: list[float] = []

        def progress(record: dict) -> None:
            if "val_recall@20" in record:
                scores.append(record["val_recall@20"])
                trial.report(record["val_recall@20"], record["epoch"])
                if trial.should_prune():
                    raise optuna.TrialPruned()
                if time.perf_counter() - started > budget_seconds:
                    raise _OutOfTime()

        error = None
        try:
            try:
                trained = train_two_tower(train, tracks, protocol, params, progress=progress)
                value = max(h["val_recall@20"] for h in trained.history if "val_recall@20" in h)
                keep_finalist(trial.number, value, trained)
            except _OutOfTime:
                value = max(scores)
            state = "complete"
            return value
        except optuna.TrialPruned:
            state = "pruned"
            raise
        except (TrainingError, SplitError) as exc:  # Optuna marks the trial failed; the record says why
            error = str(exc)
            raise
        finally:
            record = {"number": trial.number, "state": state, "value": value, "params": values,
                      "seconds": time.perf_counter() - t0, **({"error": error} if error else {})}  # fmt: skip
            trials.append(record)
            log.info("tuning trial %s", record)
            if on_trial is not None:
                on_trial(record)

    study.optimize(objective, timeout=budget_seconds, n_trials=max_trials, catch=(TrainingError, SplitError))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise TrainingError("no tuning trial could train (the first one, the warm start, failed)")
    best = study.best_trial
    judged = []
    if best.number and {0, best.number} <= finalists.keys():
        judged = [{"trial": n, "served_val_ndcg@10": judge(finalists[n][1])} for n in (0, best.number)]
        log.info("the finalists through the ranking stage: %s", judged)
        if all(j["served_val_ndcg@10"] is not None for j in judged):
            best = study.trials[max(judged, key=lambda j: j["served_val_ndcg@10"])["trial"]]
    return Tuning(replace(base, **best.params), best.value, trials, time.perf_counter() - started, best.number, judged)
