"""Hyperparameters chosen per training on the validation split: the warm start first, never worse than it,
the trials recorded, and values from anywhere moved into the search space."""

from __future__ import annotations

import pytest

from recsys_assets.ml.split import global_temporal_split
from recsys_assets.ml.tuning import EMBEDDING_DIMS, HISTORY_LENGTHS, tune, warm_values
from recsys_assets.ml.two_tower import TrainingError, TwoTowerParams

pytestmark = pytest.mark.slow

BASE = TwoTowerParams(embedding_dim=16, batch_size=256, max_epochs=4, patience=1, min_train_pairs=10, seed=7)


def test_warm_values_come_from_logged_parameters_and_land_in_the_space() -> None:
    # MLflow gives parameters back as strings; a champion may predate the search space.
    logged = {"history_length": "25", "embedding_dim": "16", "temperature": "0.5", "learning_rate": "0.05",
              "l2": "0.0", "history_decay": "0.9", "mask_history_negatives": "True", "batch_size": "2048"}  # fmt: skip
    values = warm_values(logged)
    # A champion from before history_ties was searched gets the default (False).
    # So does one from before the batch size and the logQ correction were (the default, True).
    assert values == {"history_length": 20, "embedding_dim": 32, "temperature": 0.3, "learning_rate": 0.05, "l2": 0.0,
                      "history_decay": 0.9, "mask_history_negatives": True, "history_ties": False,
                      "batch_size": 2048, "logq_correction": True}  # fmt: skip
    assert warm_values({**logged, "batch_size": "3000", "logq_correction": "False"})["batch_size"] == 2048
    assert warm_values({**logged, "logq_correction": "False"})["logq_correction"] is False
    assert warm_values({**logged, "history_ties": "True"})["history_ties"] is True
    static = warm_values({**logged, "history_length": "0"})
    assert static["history_length"] == 0
    assert "history_decay" not in static
    assert "mask_history_negatives" not in static
    assert "history_ties" not in static
    assert warm_values({})["history_length"] in HISTORY_LENGTHS
    assert warm_values({})["embedding_dim"] in EMBEDDING_DIMS


def test_the_search_starts_from_the_warm_start_and_never_ends_worse(tiny_world) -> None:
    _, interactions, tracks = tiny_world
    train = global_temporal_split(interactions).train
    seen: list[dict] = []
    warm = {
        "history_length": 0,
        "embedding_dim": 32,
        "temperature": 0.1,
        "learning_rate": 0.05,
        "l2": 0.0,
        "batch_size": 256,
        "logq_correction": True,
    }
    result = tune(train, tracks, "global", BASE, 600, warm_start=warm, max_trials=5, on_trial=seen.append)
    assert len(result.trials) == len(seen) == 5
    first = result.trials[0]
    assert first["params"] == warm
    assert first["state"] == "complete"
    completed = [t["value"] for t in result.trials if t["state"] == "complete"]
    assert result.best_value == max(completed) >= first["value"]
    best = next(t for t in result.trials if t["value"] == result.best_value)
    for name, value in best["params"].items():
        assert getattr(result.params, name) == value
    # The fields that are not searched are the base's.
    assert (result.params.max_epochs, result.params.refit, result.params.seed) == (4, "warm", 7)
    assert [row["trial"] for row in result.table()] == [0, 1, 2, 3, 4]


def test_data_too_small_for_any_trial_is_a_clear_error(tiny_world) -> None:
    _, interactions, tracks = tiny_world
    tiny = global_temporal_split(interactions).train.head(5)
    with pytest.raises(TrainingError, match="no tuning trial could train"):
        tune(tiny, tracks, "global", BASE, budget_seconds=60, max_trials=2)


def test_with_a_ranking_stage_the_finalists_are_judged_by_what_each_would_serve(tiny_world) -> None:
    # The best trial by recall is not always the better one through the ranking stage (ml/tuning.py):
    # the warm start and the search's best, both trained already, are judged; the judge's choice wins.
    _, interactions, tracks = tiny_world
    train = global_temporal_split(interactions).train
    warm = {"history_length": 0, "embedding_dim": 32, "temperature": 0.3, "learning_rate": 0.01, "l2": 1e-4,
            "batch_size": 4096, "logq_correction": False}  # fmt: skip
    judged: list[TwoTowerParams] = []

    def prefer_the_warm_start(trained) -> float:
        judged.append(trained.params)
        return 1.0 if trained.params.learning_rate == warm["learning_rate"] else 0.0

    plain = tune(train, tracks, "global", BASE, 600, warm_start=warm, max_trials=4)
    assert plain.chosen_trial > 0, "the search found a better trial than this poor warm start"
    result = tune(train, tracks, "global", BASE, 600, warm_start=warm, max_trials=4, judge=prefer_the_warm_start)
    assert [p.learning_rate for p in judged] == [warm["learning_rate"], plain.params.learning_rate]
    assert result.chosen_trial == 0
    assert [f["trial"] for f in result.finalists] == [0, plain.chosen_trial]
    assert result.params.learning_rate == warm["learning_rate"]
    assert result.best_value == result.trials[0]["value"]

    undecided = tune(train, tracks, "global", BASE, 600, warm_start=warm, max_trials=4, judge=lambda t: None)
    assert undecided.chosen_trial == plain.chosen_trial  # a judge that cannot say leaves the search's choice
