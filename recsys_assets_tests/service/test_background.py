"""The service's background loops survive what used to kill them: spilled feedback read back (it never
landed: its times came back as strings), a spill file that cannot be landed, versions that cannot be
loaded, a registry poll that raises."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from recsys_assets_tests.service.versions import write_version
from recsys_core.registry import RegistryError, ServingState
from recsys_core.warehouse import Warehouse
from serving.feedback import FeedbackWriter, event_row
from serving.models import ModelSlots


def version_dir(directory: Path, items: int = 50, users: int = 5) -> Path:
    rng = np.random.default_rng(0)
    return write_version(
        directory, rng.normal(size=(users + 1, 4)), rng.normal(size=(items + 1, 4)), [[] for _ in range(users + 1)]
    )


def rows(n: int, prefix: str) -> list[tuple]:
    return [event_row(event_id=f"{prefix}-{i}", user_id="u", track_id=f"t{i}", artist_id=None,
                      event_type="impression", model_version=1, variant="champion") for i in range(n)]  # fmt: skip


def test_spilled_feedback_lands_and_a_bad_spill_file_is_set_aside(tmp_path: Path) -> None:
    warehouse = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    warehouse.init_schema()
    spill = tmp_path / "spill"
    writer = FeedbackWriter(warehouse, spill_dir=spill, flush_seconds=3600, max_buffer=5)
    writer.add(rows(8, "a"))  # over max_buffer: spilled to a file
    (spill / "feedback-0-broken.jsonl").write_text('["only", "three", "fields"]\n')  # sorts first
    writer.add(rows(3, "b"))
    assert len(list(spill.glob("feedback-*.jsonl"))) == 2
    landed = writer.flush()
    assert landed == 11
    assert warehouse.scalar("SELECT COUNT(*) FROM listening_events WHERE source = 'recommendation'") == 11
    assert not list(spill.glob("feedback-*.jsonl"))
    (kept,) = (spill / "quarantine").glob("*.jsonl")
    assert kept.name == "feedback-0-broken.jsonl"
    assert kept.with_suffix(".reason.txt").read_text().strip()
    assert writer.quarantined == 1


def test_the_flush_loop_survives_an_unexpected_error(tmp_path: Path, monkeypatch) -> None:
    warehouse = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    writer = FeedbackWriter(warehouse, spill_dir=tmp_path / "spill", flush_seconds=0.05)
    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("an error nobody planned for")
        return 0

    monkeypatch.setattr(writer, "flush", flaky)
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 3
        assert writer.alive
        assert writer.failures == 1
    finally:
        writer._stop.set()


class Registry:
    """A registry stand-in (pure logic of the slots): versions 1 (good) and 2 (broken in ``how``)."""

    def __init__(self, root: Path, how: str):
        self.root, self.how = root, how
        self.state = ServingState(1, None, None)
        self.poll_error: Exception | None = None

    def serving_state(self) -> ServingState:
        if self.poll_error is not None:
            raise self.poll_error
        return self.state

    def download(self, version: int) -> Path:
        if version == 1:
            return version_dir(self.root / "v1") if not (self.root / "v1").exists() else self.root / "v1"
        if self.how == "no manifest":
            raise StopIteration  # what `next(rglob("manifest.json"))` raised on a version without one
        broken = self.root / "v2"
        if not broken.exists():
            version_dir(broken)
            half = np.load(broken / "item_embeddings.npy")[:25]
            np.save(broken / "item_embeddings.npy", half)  # half the rows: IndexError when scored
        return broken


@pytest.mark.parametrize("how", ["no manifest", "half the embeddings"])
def test_an_unloadable_version_is_counted_and_the_champion_keeps_serving(tmp_path: Path, how: str) -> None:
    registry = Registry(tmp_path, how)
    failures = []
    slots = ModelSlots(registry, on_load_failure=lambda variant, version: failures.append((variant, version)))
    assert slots.refresh()
    assert slots.current.champion_version == 1
    registry.state = ServingState(2, None, None)  # a promotion to the broken version
    assert not slots.refresh()
    assert slots.current.champion_version == 1
    assert failures == [("champion", 2)]
    assert slots.load_failures == 1
    assert "version 2 for champion" in slots.last_error


def test_the_poll_loop_survives_any_error_and_readiness_follows_it(tmp_path: Path) -> None:
    registry = Registry(tmp_path, "no manifest")
    slots = ModelSlots(registry)
    slots.refresh()
    registry.poll_error = KeyError("an error nobody planned for")
    slots.start(0.02)
    try:
        deadline = time.monotonic() + 5
        while "KeyError" not in (slots.last_error or "") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "KeyError" in slots.last_error
        registry.poll_error = RegistryError("the store is down")
        time.sleep(0.1)
        assert slots.alive
    finally:
        slots.close()
    assert not slots.alive
    shutil.rmtree(tmp_path / "v1")
