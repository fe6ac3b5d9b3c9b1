"""An unloadable version never gets an alias (issue "Nothing acknowledged is lost…", item 5).

Real MLflow store (SQLite), real separate-process load check (``python -m recsys_core.validation``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys_assets_tests.service.versions import tiny_version
from recsys_core.control import ControlPlane
from recsys_core.registry import CHALLENGER, CHAMPION
from recsys_core.validation import UnservableVersion, validate_in_subprocess

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture
def plane(tmp_path: Path) -> ControlPlane:
    plane = ControlPlane(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path / "cache")
    log(plane, tiny_version(tmp_path / "good"), "good")
    return plane


def log(plane: ControlPlane, directory: Path, name: str) -> int:
    run_id = plane.start_run(name, tags={})
    uri = plane.log_model(run_id, directory)
    plane.end_run(run_id)
    return plane.register(model_uri=uri, run_id=run_id, lineage={}, reason=name, by="test").version


def truncated(tmp_path: Path) -> Path:
    """Half the item embeddings' rows: what a partial upload left behind."""
    directory = tiny_version(tmp_path / "truncated", seed=1)
    items = np.load(directory / "item_embeddings.npy")
    np.save(directory / "item_embeddings.npy", items[: len(items) // 2])
    return directory


def test_an_unloadable_challenger_is_rejected_with_its_reason_and_gets_no_alias(plane, tmp_path) -> None:
    with pytest.raises(UnservableVersion, match="version 2 cannot be served") as caught:
        log(plane, truncated(tmp_path), "truncated")
    assert "item" in caught.value.reason  # the loader's shape check names what disagrees
    state = plane.serving_state()
    assert (state.champion, state.challenger) == (1, None)  # nothing for a canary to wait on: the loop goes on
    rejected = plane.get(2)
    assert rejected.status == "rejected"
    assert rejected.history[-1]["action"] == "rejected: cannot be served"
    assert rejected.history[-1]["reason"] == caught.value.reason

    # The next good candidate becomes the challenger as usual.
    assert log(plane, tiny_version(tmp_path / "next", seed=2), "next") == 3
    assert plane.by_alias(CHALLENGER).version == 3


def test_promoting_or_rolling_back_to_an_unloadable_version_is_refused(plane, tmp_path) -> None:
    with pytest.raises(UnservableVersion):
        log(plane, truncated(tmp_path), "truncated")
    with pytest.raises(UnservableVersion, match="version 2 cannot be served"):
        plane.promote(2, reason="by hand", by="test")
    with pytest.raises(UnservableVersion, match="version 2 cannot be served"):
        plane.rollback(to=2, reason="by hand", by="test")
    assert plane.by_alias(CHAMPION).version == 1
    assert [e["action"] for e in plane.get(1).history] == ["registered as the first champion"]


def test_a_version_that_does_not_exist_is_named(plane) -> None:
    with pytest.raises(Exception, match="version 9"):
        plane.promote(9, reason="by hand", by="test")
    assert plane.by_alias(CHAMPION).version == 1


def test_the_check_runs_in_a_child_with_a_time_limit(plane, tmp_path) -> None:
    """A child that hangs is stopped at its limit, and that is a verdict, not a hang of the caller."""
    ok = validate_in_subprocess(plane.tracking_uri, 1, tmp_path / "c")
    assert (ok.items, ok.users) == (30, 8)
    print(f"\nthe separate-process check of a version: {ok.wall_s:.1f} s (load {ok.load_ms:.0f} ms)")
    with pytest.raises(UnservableVersion, match="more than 0 s"):
        validate_in_subprocess(plane.tracking_uri, 1, tmp_path / "c", timeout_s=0.01)
