"""The two-tower model: it learns, it refuses bad data clearly, and its export reloads identically."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from recsys_assets.ml.export import export_model
from recsys_assets.ml.metrics import build_eval_set, evaluate, popularity_scorer
from recsys_assets.ml.split import global_temporal_split, validation_split
from recsys_assets.ml.two_tower import TrainingError, TwoTowerParams, train_two_tower
from recsys_core.model_version import ModelArtifact

pytestmark = pytest.mark.slow

FAST = TwoTowerParams(embedding_dim=16, batch_size=256, max_epochs=6, patience=2, min_train_pairs=10, seed=7)


@pytest.fixture(scope="module")
def trained(tiny_world):
    _, interactions, tracks = tiny_world
    split = global_temporal_split(interactions)
    val = validation_split(split.train, "global")
    return split, train_two_tower(split.train, tracks, (val.train, val.holdout), FAST)


def test_the_loss_decreases(tiny_world) -> None:
    _, interactions, tracks = tiny_world
    split = global_temporal_split(interactions)
    model = train_two_tower(split.train, tracks, None, replace(FAST, refit="none"))
    losses = [h["loss"] for h in model.history]
    assert len(losses) == FAST.max_epochs
    assert losses[-1] < 0.9 * losses[0]


def test_early_stopping_watches_the_validation_split(trained) -> None:
    _, model = trained
    fit = [h for h in model.history if h.get("phase") != "refit"]
    refit = [h for h in model.history if h.get("phase") == "refit"]
    assert all("val_recall@20" in h for h in fit)
    best = max(fit, key=lambda h: h["val_recall@20"])
    assert model.best_epoch == best["epoch"]
    assert len(fit) <= min(best["epoch"] + FAST.patience, FAST.max_epochs)
    assert len(refit) == FAST.refit_epochs  # the warm refit on the whole train side


def test_it_beats_popularity_on_simulated_tastes(trained) -> None:
    split, model = trained
    eval_set = build_eval_set(split.train, split.holdout)
    rows = pl.DataFrame({"track_id": model.vocab.items[1:].astype(str), "row": np.arange(1, len(model.vocab.items))})
    item_rows = pl.DataFrame({"track_id": eval_set.items}).join(rows, on="track_id", how="left")["row"].to_numpy()
    user_index = {u: i for i, u in enumerate(model.vocab.users)}

    def scorer(users):
        return model.user_embeddings[[user_index[u] for u in users]] @ model.item_embeddings[item_rows].T

    two_tower = evaluate(scorer, eval_set).metrics["ndcg@10"]
    popularity = evaluate(popularity_scorer(split.train, eval_set.items), eval_set).metrics["ndcg@10"]
    assert two_tower > popularity


def test_same_seed_same_model(tiny_world) -> None:
    _, interactions, tracks = tiny_world
    split = global_temporal_split(interactions)
    params = replace(FAST, max_epochs=2, refit="none")
    a = train_two_tower(split.train, tracks, None, params)
    b = train_two_tower(split.train, tracks, None, params)
    np.testing.assert_allclose(a.item_embeddings, b.item_embeddings, rtol=1e-5, atol=1e-6)


def test_export_then_reload_in_a_fresh_process_gives_the_same_top_k(trained, tmp_path) -> None:
    split, model = trained
    artifact = export_model(model, split.train, {"data": {"cutoff": str(split.cutoff)}}, tmp_path / "v1", k=10)
    users = [str(u) for u in model.vocab.users[1:6]]
    expected = {}
    for user in users:
        row = artifact.user_row(user)
        scores = artifact.item_embeddings @ artifact.user_embeddings[row]
        scores[0] = -np.inf
        expected[user] = [str(artifact.item_ids[i]) for i in np.argsort(-scores, kind="stable")[:10]]
    features = np.load(tmp_path / "v1" / "user_features.npy")[[artifact.user_row(u) for u in users]]
    np.save(tmp_path / "features.npy", features)
    # The users' history at the cutoff, as a TensorFlow Serving client sends it: track ids, "" for padding.
    history_rows = np.load(tmp_path / "v1" / "user_history.npy")[[artifact.user_row(u) for u in users]]
    assert history_rows.shape[1] == model.params.history_length > 0
    assert (history_rows > 0).any()
    np.save(tmp_path / "history.npy", np.where(history_rows > 0, artifact.item_ids[history_rows], "").astype(str))
    # A fresh interpreter, without TFRS and without TF_USE_LEGACY_KERAS: the SavedModel index alone.
    code = (
        "import json, sys, numpy as np, tensorflow as tf\n"
        f"index = tf.saved_model.load({str(tmp_path / 'v1' / 'index')!r})\n"
        f"users = {users!r}\n"
        f"features = np.load({str(tmp_path / 'features.npy')!r})\n"
        f"history = np.load({str(tmp_path / 'history.npy')!r})\n"
        "_, ids = index({'user_id': tf.constant(users), 'user_features': tf.constant(features),\n"
        "                'history': tf.constant(history)})\n"
        "print(json.dumps({u: [x.decode() for x in row] for u, row in zip(users, ids.numpy())}))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert reloaded == expected
    again = ModelArtifact.load(tmp_path / "v1")
    np.testing.assert_array_equal(again.item_embeddings, artifact.item_embeddings)
    assert again.cutoff == str(split.cutoff)


def test_export_builds_the_ann_index_from_the_threshold_on(trained, tmp_path) -> None:
    """At or above RECSYS_ANN_MIN_ITEMS tracks the version carries its index (and the Ranker uses it);
    below, it has none."""
    from recsys_core.ann import INDEX_FILE
    from recsys_core.scoring import Ranker

    split, model = trained
    items = len(model.vocab.items) - 1
    small = export_model(model, split.train, {}, tmp_path / "v1", k=5, ann_min_items=items + 1)
    assert "ann" not in small.manifest
    assert not (tmp_path / "v1" / INDEX_FILE).exists()
    large = export_model(model, split.train, {}, tmp_path / "v2", k=5, ann_min_items=items)
    assert large.manifest["ann"]["items"] == items
    ranker = Ranker.load(tmp_path / "v2", 2, ann_min_items=items)
    assert ranker.ann is not None
    user = str(model.vocab.users[1])
    assert len(ranker.recommend(user, 5).track_ids) == 5


def test_export_never_overwrites_a_version(trained, tmp_path) -> None:
    split, model = trained
    export_model(model, split.train, {}, tmp_path / "v1", k=5)
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_model(model, split.train, {}, tmp_path / "v1", k=5)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("u1", "t1"), ("u2", "t2")], "2 distinct .user, track. training pairs: at least 10"),
        ([("u1", f"t{i}") for i in range(20)], "1 users and 20 tracks"),
        ([(f"u{i}", "t1") for i in range(20)], "20 users and 1 tracks"),
    ],
)
def test_tiny_or_degenerate_training_sets_are_refused_before_tensorflow(rows, message) -> None:
    df = pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "track_id": [r[1] for r in rows],
            "played_at": [datetime(2025, 1, 1, tzinfo=UTC)] * len(rows),
            "weight": [1.0] * len(rows),
            "liked": [False] * len(rows),
        }
    )
    tracks = pl.DataFrame({"track_id": ["t1"], "artist_id": ["a"], "genre": ["g"]})
    with pytest.raises(TrainingError, match=message):
        train_two_tower(df, tracks, None, FAST)


def test_users_and_tracks_with_a_single_event_are_handled(tiny_world) -> None:
    _, interactions, tracks = tiny_world
    extra = interactions.head(3).with_columns(
        pl.Series("user_id", ["lonely-1", "lonely-2", "lonely-3"]),
        pl.Series("track_id", ["solo-1", "solo-2", "solo-3"]),
    )
    data = pl.concat([interactions, extra])
    split = global_temporal_split(data)
    model = train_two_tower(split.train, tracks, None, replace(FAST, max_epochs=1, refit="none"))
    assert np.isfinite(model.user_embeddings).all()
    assert np.isfinite(model.item_embeddings).all()


# --- the history-aware query tower ------------------------------------------------------------------


def _pairs_by_hand() -> tuple[pl.DataFrame, object]:
    from recsys_assets.ml.two_tower import Vocabulary

    t = datetime(2026, 1, 1, tzinfo=UTC)
    pairs = pl.DataFrame(
        {
            "user_id": ["a", "a", "a", "a", "b"],
            "track_id": ["t3", "t1", "t2", "t4", "t1"],
            "weight": [1.0] * 5,
            "first_at": [t.replace(hour=1), t, t.replace(hour=1), t.replace(hour=2), t],
        }
    )
    items = pl.DataFrame({"track_id": ["t1", "t2", "t3", "t4"], "artist_id": ["x"] * 4, "genre": ["g"] * 4})
    return pairs, Vocabulary.build(pairs, items)


def test_each_example_sees_only_the_tracks_first_played_before_it() -> None:
    from recsys_assets.ml.two_tower import example_histories

    pairs, vocab = _pairs_by_hand()  # item rows: t1 → 1, t2 → 2, t3 → 3, t4 → 4
    got = example_histories(pairs, vocab, 3)
    assert got.tolist() == [
        [1, 0, 0],  # a/t3 at 1h: t1 (0h); t2, at the same instant, is not before
        [0, 0, 0],  # a/t1 at 0h: nothing before
        [1, 0, 0],  # a/t2 at 1h: t1
        [3, 2, 1],  # a/t4 at 2h: most recent first (t2 and t3 tie at 1h: by track id, the later id first)
        [0, 0, 0],  # b/t1: a's plays are not b's history
    ]


def test_the_latest_history_is_each_users_last_tracks_most_recent_first() -> None:
    from recsys_assets.ml.two_tower import latest_histories

    pairs, vocab = _pairs_by_hand()
    got = latest_histories(pairs, vocab, 2)
    rows = {str(u): i for i, u in enumerate(vocab.users)}
    assert got[rows["a"]].tolist() == [4, 3]
    assert got[rows["b"]].tolist() == [1, 0]
    assert got[0].tolist() == [0, 0]  # the out-of-vocabulary user has no history


def test_an_example_s_history_tracks_are_not_its_negatives() -> None:
    """The score mask leaves out, row by row, the in-batch candidates that are in that row's history
    (every column holding the track, when the batch holds it twice), never the row's own target."""
    from recsys_assets.ml.two_tower import history_score_mask

    targets = np.array([5, 7, 5, 9])
    histories = np.array([[7, 0], [5, 9], [0, 0], [3, 5]])  # 3: a track no example of the batch targets
    got = history_score_mask(histories, targets, 10).numpy()
    assert got.tolist() == [
        [True, False, True, True],  # row 0 heard 7 (column 1)
        [False, True, False, False],  # row 1 heard 5 (columns 0 and 2) and 9 (column 3)
        [True, True, True, True],  # row 2 heard nothing
        [False, True, False, True],  # row 3 heard 5 (columns 0 and 2); 3 is no candidate
    ]


def test_the_next_play_validation_by_hand() -> None:
    """Per user: the last track new to them in the validation part is the target, the tracks they
    played there before it (most recent first) what the service would have heard."""
    from recsys_assets.ml.two_tower import next_plays

    t = datetime(2026, 11, 1, tzinfo=UTC)
    fit = pl.DataFrame({"user_id": ["a", "b"], "track_id": ["t9", "t1"], "played_at": [t, t], "weight": [1.0, 1.0]})
    at = [t.replace(day=d) for d in (2, 3, 4, 5, 2, 3, 2)]
    val = pl.DataFrame(
        {
            "user_id": ["a", "a", "a", "a", "b", "b", "c"],
            "track_id": ["t1", "t2", "t3", "t9", "t2", "t1", "t4"],
            "played_at": at,
            "weight": [1.0] * 7,
        }
    )
    got = next_plays(fit, val, np.array(["a", "b", "c"], dtype=object)).sort("user_id")
    # a: t9 was in a's fit part, so the target is t3, after t2 and t1; b: t1 is not new, t2 has nothing
    # before it; c: a single play, nothing heard before it.
    assert got.rows() == [("a", ["t2", "t1"], "t3")]


def test_the_history_tower_trains_and_its_savedmodel_reproduces_the_embeddings(tiny_world, tmp_path) -> None:
    """history_length > 0: the exported query tower takes the history's track ids and gives the
    embeddings the version carries (computed from each user's history at the cutoff)."""
    _, interactions, tracks = tiny_world
    split = global_temporal_split(interactions)
    params = replace(FAST, max_epochs=2, refit="none", history_length=5, history_decay=0.7, history_attributes=True)
    model = train_two_tower(split.train, tracks, None, params)
    assert model.user_history.shape == (len(model.vocab.users), 5)
    assert (model.user_history[1:] > 0).any()
    export_model(model, split.train, {}, tmp_path / "v1", k=10)
    assert json.loads((tmp_path / "v1" / "manifest.json").read_text())["history_length"] == 5
    np.testing.assert_array_equal(np.load(tmp_path / "v1" / "user_history.npy"), model.user_history)

    import tensorflow as tf

    tower = tf.saved_model.load(str(tmp_path / "v1" / "query_tower")).signatures["serving_default"]
    rows = np.arange(1, min(9, len(model.vocab.users)))
    ids = np.where(model.user_history[rows] > 0, model.vocab.items[model.user_history[rows]].astype(str), "")
    got = tower(
        user_id=tf.constant(model.vocab.users[rows].astype(str)),
        user_features=tf.constant(model.user_features[rows]),
        history=tf.constant(ids),
    )["embedding"].numpy()
    # The prior's extra dimension is α·log q on the item side and 1 on the query side.
    np.testing.assert_allclose(got[:, :-1], model.user_embeddings[rows, :-1], rtol=1e-5, atol=1e-5)

    # The numpy tower (what serving runs) against the SavedModel, on random users and histories.
    from recsys_core.query_tower import QueryTower

    numpy_tower = QueryTower.load(tmp_path / "v1")
    assert numpy_tower.history_decay == pytest.approx(0.7)
    rng = np.random.default_rng(3)
    users = rng.integers(0, len(model.vocab.users), 32)
    histories = rng.integers(0, len(model.vocab.items), (32, 5))
    histories[::4, 2:] = 0  # short histories
    histories[1] = 0  # an empty one
    histories[2, 1] = 0  # a track the version does not know, between two it knows: no weight, no position
    features = rng.random((32, model.user_features.shape[1]), dtype=np.float32)
    ids = np.where(histories > 0, model.vocab.items[histories].astype(str), "")
    expected = tower(user_id=tf.constant(model.vocab.users[users].astype(str)), user_features=tf.constant(features),
                     history=tf.constant(ids))["embedding"].numpy()  # fmt: skip
    got = np.stack([numpy_tower.embed(u, f, h) for u, f, h in zip(users, features, histories, strict=True)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_the_one_scorer_ranks_from_the_plays_since_the_cutoff(trained, tmp_path) -> None:
    """The Ranker's users are the numpy tower's over the exported history (TensorFlow's to 1e-5); plays
    since the cutoff move the query, are filtered out, and personalise a user the version never saw."""
    from recsys_core.scoring import Ranker

    split, model = trained
    artifact = export_model(model, split.train, {"data": {"cutoff": str(split.cutoff)}}, tmp_path / "v1", k=10)
    ranker = Ranker(artifact, 1)
    assert ranker.history_length == model.params.history_length > 0
    np.testing.assert_allclose(ranker.users, artifact.user_embeddings, rtol=1e-5, atol=1e-5)

    user = str(model.vocab.users[1])
    before = ranker.recommend(user, 10)
    liked = before.track_ids[:3]
    after = ranker.recommend(user, 10, recent=tuple(reversed(liked)))
    assert not set(liked) & set(after.track_ids)  # heard now: filtered out like the training's
    assert not np.allclose(ranker.query(user, liked)[0], ranker.users[artifact.user_row(user)])
    assert not after.fallback
    assert not after.personalised_from_history
    # The session term: the query is the tower's over the merged history, moved towards the plays.
    from recsys_core.query_tower import merged_history, unit_directions

    row = artifact.user_row(user)
    played = np.array([ranker._item_rows[t] for t in liked])
    tower = ranker.tower
    assert tower.session_weight == model.session_weight > 0  # else the session term below is not exercised
    assert [s["session_weight"] for s in model.session_scores] == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    expected = tower.with_session(
        tower.embed(row, ranker._features[row], merged_history(played, ranker._history[row], ranker.history_length)),
        played,
        unit_directions(artifact.item_embeddings),
    )
    np.testing.assert_allclose(ranker.query(user, liked)[0], expected, rtol=1e-6)

    # A track already in the exported history keeps its place (first play): the tower's query does not
    # move; only the session term does (the user is playing it now).
    old_row = ranker._history[row][ranker._history[row] > 0][-1]
    old = str(artifact.item_ids[old_row])
    np.testing.assert_allclose(
        ranker.query(user, (old,))[0],
        tower.with_session(ranker.users[row], np.array([old_row]), unit_directions(artifact.item_embeddings)),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip

    # A user the version does not know: popularity until they play a track it knows, then personalised.
    assert ranker.recommend("new-user", 10).fallback
    assert ranker.recommend("new-user", 10, recent=("no-such-track",)).fallback
    fresh = ranker.recommend("new-user", 10, recent=tuple(liked))
    assert fresh.personalised_from_history
    assert not fresh.fallback
    assert fresh.track_ids != ranker.recommend("new-user", 10).track_ids
    assert not set(liked) & set(fresh.track_ids)


def test_a_windowed_training_is_served_without_the_tracks_heard_before_the_window(tiny_world, tmp_path) -> None:
    """Only the training sees the window: the version's seen lists are the whole train side's, and the
    users the window left out are unknown to it (not piled into the out-of-vocabulary row)."""
    from recsys_assets.ml.distribute import placement
    from recsys_assets.ml.split import recent
    from recsys_assets.ml.train_worker import train_and_export

    _, interactions, tracks = tiny_world
    train = global_temporal_split(interactions).train
    outcome = train_and_export(train, tracks, replace(FAST, max_epochs=2), "global", tmp_path / "v", {},
                               placement("one-device"), ann_min_items=10**9, window_days=5)  # fmt: skip
    assert outcome["strategy"] == "one-device"
    artifact = ModelArtifact.load(tmp_path / "v")
    window = recent(train, 5)
    assert set(artifact.user_ids[1:]) == set(window["user_id"].unique())  # the model's users: the window's
    assert not len(artifact.seen(0))
    before = train.join(window.select("user_id", "track_id"), on=["user_id", "track_id"], how="anti")
    before = before.filter(pl.col("user_id").is_in(window["user_id"].unique().to_list()))
    before = before.filter(pl.col("track_id").is_in(artifact.item_ids[1:].tolist()))
    assert before.height  # a window of 5 of 21 days leaves such tracks
    rows = {u: i for i, u in enumerate(artifact.user_ids)}
    items = {t: i for i, t in enumerate(artifact.item_ids)}
    for user, track in before.select("user_id", "track_id").unique().iter_rows():
        assert items[track] in artifact.seen(rows[user]), (user, track)
