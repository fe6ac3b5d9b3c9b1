"""A real MLflow registry with two real model versions (champion v1, challenger v2) for the service tests."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from recsys_assets.ml.export import export_model
from recsys_assets.ml.split import global_temporal_split
from recsys_assets.ml.two_tower import TwoTowerParams, train_two_tower
from recsys_assets_tests.ml.conftest import simulated_interactions
from recsys_core.control import ControlPlane
from recsys_core.settings import load_settings

FAST = TwoTowerParams(embedding_dim=16, batch_size=256, max_epochs=2, refit="none", min_train_pairs=10, seed=3)
ADMIN_TOKEN = "test-admin-token"


@dataclass(frozen=True)
class ServingHome:
    home: Path
    env: dict[str, str]
    registry: ControlPlane
    known_user: str
    world: object


def register_version(registry: ControlPlane, trained, train, root: Path, name: str) -> int:
    model_dir = export_model(trained, train, {"data": {"train_interactions": train.height}}, root / name, k=20).path
    run_id = registry.start_run(name, tags={})
    uri = registry.log_model(run_id, model_dir)
    registry.end_run(run_id)
    return registry.register(
        model_uri=uri, run_id=run_id, lineage={}, reason=f"{name} for the tests", by="tests"
    ).version


@pytest.fixture(scope="session")
def serving_home(tmp_path_factory: pytest.TempPathFactory) -> ServingHome:
    home = tmp_path_factory.mktemp("serving") / "home"
    settings = load_settings({"RECSYS_HOME": str(home)})
    registry = ControlPlane(settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir, home / "models" / "registry")
    world, interactions, tracks = simulated_interactions(users=120, tracks=400, days=14, seed=21)
    split = global_temporal_split(interactions)
    for seed, name in ((3, "champion"), (4, "challenger")):
        trained = train_two_tower(split.train, tracks, None, replace(FAST, seed=seed))
        register_version(registry, trained, split.train, home / "exports", name)
    registry.set_canary(2, step=0, fraction=0.5, mode="ab", reason="the tests' canary", by="tests")
    env = settings.child_env({})
    env.update(
        RECSYS_ADMIN_TOKEN=ADMIN_TOKEN,
        RECSYS_MODEL_POLL_SECONDS="3600",
        # One worker: these tests swap models with /admin/reload, which reaches one worker (with
        # several, the others follow at their next poll; test_workers.py runs two).
        RECSYS_SERVING_WORKERS="1",
        RECSYS_FEEDBACK_FLUSH_SECONDS="0.5",
    )
    known = split.train["user_id"][0]
    return ServingHome(home=home, env=env, registry=registry, known_user=known, world=world)
