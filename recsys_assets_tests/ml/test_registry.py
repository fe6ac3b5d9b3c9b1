"""The registry flow on a real SQLite-backed MLflow store in a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys_assets_tests.service.versions import tiny_version
from recsys_core.control import ControlPlane
from recsys_core.registry import CHALLENGER, CHAMPION, MODEL_NAME, Registry, RegistryError
from recsys_core.validation import UnservableVersion

pytestmark = pytest.mark.slow


@pytest.fixture
def registry(tmp_path: Path) -> ControlPlane:
    return ControlPlane(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}", tmp_path / "artifacts", tmp_path / "cache")


def fake_version_dir(tmp_path: Path, name: str) -> Path:
    """A tiny servable model directory (the control plane loads every version before an alias moves)."""
    return tiny_version(tmp_path / name, name=name)


def register(registry: ControlPlane, tmp_path: Path, name: str) -> int:
    run_id = registry.start_run(name, tags={})
    registry.log_run(run_id, params={"name": name}, metrics={"ndcg_at_10": 0.1}, history=[{"epoch": 1, "loss": 2.0}])
    uri = registry.log_model(run_id, fake_version_dir(tmp_path, name))
    registry.end_run(run_id)
    return registry.register(
        model_uri=uri, run_id=run_id, lineage={"cutoff": name}, reason=f"{name} passed", by="test"
    ).version


def test_first_is_champion_then_challengers_then_promotion_and_rollback(registry: ControlPlane, tmp_path: Path) -> None:
    v1 = register(registry, tmp_path, "first")
    assert registry.by_alias(CHAMPION).version == v1
    assert registry.by_alias(CHALLENGER) is None

    v2 = register(registry, tmp_path, "second")
    assert registry.by_alias(CHALLENGER).version == v2
    assert registry.by_alias(CHAMPION).version == v1

    registry.promote(reason="won the canary", by="canary analysis")
    assert registry.by_alias(CHAMPION).version == v2
    assert registry.by_alias(CHALLENGER) is None
    assert registry.get(v1).status == "retired"

    v3 = register(registry, tmp_path, "third")
    registry.promote(v3, reason="by hand", by="test")
    assert registry.rollback(reason="bad KPIs", by="test").version == v2  # back to the previous champion
    assert registry.get(v3).status == "rolled_back"
    assert registry.rollback(to=v1, reason="way back", by="test").version == v1

    history = registry.get(v2).history
    actions = [(e["action"], e["from"], e["to"]) for e in history]
    assert actions == [
        ("registered as challenger", None, v2),
        ("promoted to champion", v1, v2),
        ("challenger alias cleared (promoted)", v2, None),
        ("promoted to champion", v2, v3),
        ("rolled back to", v3, v2),
        ("rolled back to", v2, v1),
    ]
    assert all({"at", "reason", "by"} <= set(e) for e in history)
    assert registry.get(v2).lineage("cutoff") == "second"
    assert registry.get(v2).lineage_tags == {"cutoff": "second"}  # the history and status stay out

    v4 = register(registry, tmp_path, "fourth")
    v5 = register(registry, tmp_path, "fifth")
    assert registry.by_alias(CHALLENGER).version == v5
    assert registry.get(v4).status == "superseded"  # replaced before its canary ended
    listed = {v.version: v.aliases for v in registry.versions()}  # what `recsys model list` shows
    assert listed == {v1: [CHAMPION], v2: [], v3: [], v4: [], v5: [CHALLENGER]}


def test_download_gives_back_the_logged_directory(registry: ControlPlane, tmp_path: Path) -> None:
    v1 = register(registry, tmp_path, "first")
    local = registry.download(v1)
    assert json.loads((local / "manifest.json").read_text())["name"] == "first"
    assert registry.download(v1) == local  # cached


def test_a_failure_after_creating_the_version_leaves_no_version(
    registry: Registry, tmp_path: Path, monkeypatch
) -> None:
    register(registry, tmp_path, "first")
    run_id = registry.start_run("broken", tags={})
    uri = registry.log_model(run_id, fake_version_dir(tmp_path, "broken"))

    def fail(*args, **kwargs):
        raise RegistryError("the alias could not be set")

    monkeypatch.setattr(registry, "_move", fail)
    with pytest.raises(RegistryError, match="the alias could not be set"):
        registry.register(model_uri=uri, run_id=run_id, lineage={}, reason="x", by="test")
    assert [v.version for v in registry.versions()] == [1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.rollback(reason="x", by="t"), "no champion to roll back"),
        (lambda r: r.promote(reason="x", by="t"), "no challenger to promote"),
        (lambda r: r.reject_challenger(reason="x", by="t"), "no challenger to roll back"),
    ],
)
def test_impossible_moves_say_why(registry: Registry, call, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        call(registry)


def test_rollback_to_a_missing_version_is_refused(registry: ControlPlane, tmp_path: Path) -> None:
    register(registry, tmp_path, "first")
    with pytest.raises(RegistryError, match="version 7 does not exist"):
        registry.rollback(to=7, reason="x", by="t")
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback(reason="x", by="t")


def test_an_unreachable_store_is_named(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    registry = Registry(f"sqlite:///{blocked / 'sub' / 'mlflow.db'}", None, tmp_path / "cache")
    with pytest.raises(RegistryError, match="is not writable"):
        registry.check()
    remote = Registry("http://127.0.0.1:1", None, tmp_path / "cache")
    with pytest.raises(RegistryError, match=r"cannot reach the MLflow store http://127\.0\.0\.1:1"):
        remote.check()


def test_two_stores_with_the_same_version_number_never_share_a_cached_model(tmp_path: Path) -> None:
    """Each store has a version 1; one cache directory must still give each store its own files."""
    import mlflow

    cache = tmp_path / "shared-cache"
    first = ControlPlane(f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "a-artifacts", cache)
    second = ControlPlane(f"sqlite:///{tmp_path / 'b.db'}", tmp_path / "b-artifacts", cache)
    assert register(first, tmp_path, "from-a") == register(second, tmp_path, "from-b") == 1
    mlflow.set_tracking_uri(first.tracking_uri)  # another thread's global must not matter either
    a, b = first.download(1), second.download(1)
    assert a != b
    assert json.loads((a / "manifest.json").read_text())["name"] == "from-a"
    assert json.loads((b / "manifest.json").read_text())["name"] == "from-b"


def _moves_from_a_process(uri: str, root: str, cache: str, worker: int, n: int) -> None:
    plane = ControlPlane(uri, root, Path(cache))
    for i in range(n):
        plane.set_canary(2, step=0, fraction=0.01 * (i + 1), mode="ab", reason=f"process {worker} move {i}", by="test")


def test_concurrent_moves_from_threads_and_processes_lose_no_event(registry: ControlPlane, tmp_path: Path) -> None:
    """Four threads and two processes move the canary at once: every move is in the history (the old
    history counted the tags, then wrote the next number, so two moves at once overwrote one)."""
    import multiprocessing
    import threading

    register(registry, tmp_path, "champion")
    register(registry, tmp_path, "challenger")
    before = len(registry.get(2).history)

    def thread_moves(worker: int) -> None:
        plane = ControlPlane(registry.tracking_uri, registry.artifact_root, registry.cache_dir)
        for i in range(5):
            plane.set_canary(2, step=0, fraction=0.5, mode="ab", reason=f"thread {worker} move {i}", by="test")

    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_moves_from_a_process,
                        args=(registry.tracking_uri, str(registry.artifact_root), str(registry.cache_dir), w, 5))
        for w in range(2)
    ]  # fmt: skip
    threads = [threading.Thread(target=thread_moves, args=(w,)) for w in range(4)]
    for worker in [*processes, *threads]:
        worker.start()
    for worker in [*processes, *threads]:
        worker.join(timeout=120)
    assert all(p.exitcode == 0 for p in processes)
    history = registry.get(2).history
    reasons = {event["reason"] for event in history[before:]}
    expected = {f"thread {w} move {i}" for w in range(4) for i in range(5)}
    expected |= {f"process {w} move {i}" for w in range(2) for i in range(5)}
    assert reasons == expected
    assert [e["at"] for e in history] == sorted(e["at"] for e in history)


def test_a_version_without_a_manifest_is_refused_and_leaves_no_temporary_directory(
    registry: ControlPlane, tmp_path: Path
) -> None:
    directory = tmp_path / "not-a-model"
    directory.mkdir()
    (directory / "weights.bin").write_bytes(b"0")
    run_id = registry.start_run("broken", tags={})
    uri = registry.log_model(run_id, directory)
    with pytest.raises(UnservableVersion, match=r"has no manifest\.json"):
        registry.register(model_uri=uri, run_id=run_id, lineage={}, reason="x", by="test")
    with pytest.raises(RegistryError, match=r"has no manifest\.json"):
        registry.download(1)
    assert not [p for p in registry.cache_dir.rglob("*") if p.name.endswith(".tmp")]


def test_the_model_cache_keeps_the_most_recently_used_versions(registry: ControlPlane, tmp_path: Path) -> None:
    versions = [register(registry, tmp_path, name) for name in ("a", "b", "c")]
    registry.cache_keep = 2
    first = registry.download(versions[0])
    registry.download(versions[1])
    registry.download(versions[0])  # used again: now more recent than the second
    registry.download(versions[2])
    kept = sorted(p.name.split("-")[0] for p in registry.cache_dir.glob("v*-*"))
    assert kept == ["v1", "v3"]
    assert (first / "manifest.json").exists()


def test_a_download_that_finishes_second_keeps_the_first_workers_files(registry: ControlPlane, tmp_path: Path) -> None:
    """Two workers of one service download the same version at start-up into one cache. The one that
    finishes second must leave the first one's directory alone: the first is loading from it (the
    race once left a worker with no champion until its next registry poll)."""
    v1 = register(registry, tmp_path, "first")
    other_worker = Registry(registry.tracking_uri, registry.artifact_root, registry.cache_dir)
    client = registry.client()
    loading: list[Path] = []

    def source() -> str:  # while this worker downloads, the other one finishes and starts loading
        loading.append(other_worker.download(v1))
        (loading[0] / "being-read").write_text("the other worker holds this directory")
        return client.get_model_version_download_uri(MODEL_NAME, str(v1))

    run_id = client.get_model_version(MODEL_NAME, str(v1)).run_id
    mine = registry._fetch(source, key=f"v{v1}-{run_id[:12]}", what="version 1")
    assert mine == loading[0]
    assert (mine / "being-read").exists()
    assert (mine / "manifest.json").exists()
    assert not [p for p in registry.cache_dir.iterdir() if p.name.endswith(".tmp")]
