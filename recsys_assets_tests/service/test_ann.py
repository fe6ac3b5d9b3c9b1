"""The ANN path of the scorer, forced on a small catalogue: recall against brute force, heard tracks
excluded, exact scores and order for what is found; brute force below the threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recsys_assets_tests.service.versions import write_version
from recsys_core import ann
from recsys_core.scoring import Ranker

ITEMS, USERS, DIM, CENTRES = 4_000, 300, 16, 40


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory):
    """Clustered embeddings (as trained ones are), 0–60 heard tracks per user, and an index built as the
    training run builds it."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((CENTRES, DIM))
    items = centres[rng.integers(0, CENTRES, ITEMS + 1)] + 0.5 * rng.standard_normal((ITEMS + 1, DIM))
    users = centres[rng.integers(0, CENTRES, USERS + 1)] + 0.5 * rng.standard_normal((USERS + 1, DIM))
    seen = [[]] + [sorted(rng.choice(np.arange(1, ITEMS + 1), rng.integers(0, 61), replace=False).tolist())
                   for _ in range(USERS)]  # fmt: skip
    directory = write_version(tmp_path_factory.mktemp("ann") / "v1", users, items, seen)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["ann"] = ann.build(np.load(directory / "item_embeddings.npy"), directory)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_the_index_finds_what_brute_force_finds(version_dir) -> None:
    indexed = Ranker.load(version_dir, 1, ann_min_items=1_000)
    exact = Ranker.load(version_dir, 1, ann_min_items=10**9)
    assert indexed.ann is not None
    assert exact.ann is None
    hits = 0
    for row in range(1, USERS + 1):
        user = f"u{row}"
        found, scores, fallback = indexed.top_rows(user, 10)
        truth, _, _ = exact.top_rows(user, 10)
        assert not fallback
        assert len(found) == 10
        assert not set(found.tolist()) & set(indexed.artifact.seen(row).tolist()), user
        # What is found is scored and ordered exactly.
        expected = indexed.artifact.item_embeddings[found] @ indexed.artifact.user_embeddings[row]
        np.testing.assert_allclose(scores, expected, rtol=1e-5)
        assert list(scores) == sorted(scores, reverse=True)
        hits += len(set(found.tolist()) & set(truth.tolist()))
    assert hits / (10 * USERS) >= 0.95


def test_below_the_threshold_the_index_is_not_loaded(version_dir) -> None:
    assert Ranker.load(version_dir, 1).ann is None  # 4,000 tracks < the default threshold


def test_a_version_whose_index_does_not_match_is_refused(version_dir, tmp_path) -> None:
    import shutil

    broken = tmp_path / "v2"
    shutil.copytree(version_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["ann"]["items"] = ITEMS - 1
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="ANN index holds 3999 tracks"):
        Ranker.load(broken, 2, ann_min_items=1_000)
    (broken / ann.INDEX_FILE).unlink()
    manifest["ann"]["items"] = ITEMS
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is missing"):
        Ranker.load(broken, 2, ann_min_items=1_000)
