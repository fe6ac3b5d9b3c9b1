"""The serving plane's tests: they run in the Bento's own environment (``serving/requirements.txt``,
no TensorFlow, Dagster or Evidently; ``make test`` creates it in ``.venv-serving``) as well as in the
main one.

The registry is a real MLflow store with two real model versions (champion v1, challenger v2),
written from arrays in the export format (``versions.py``) and registered through the control plane,
so no training stack is needed. The processes are started with the repository's supervisor
(``recsys_cli.stack``: psutil and httpx only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from recsys_assets_tests.service.versions import with_history, write_version
from recsys_core.control import ControlPlane
from recsys_core.settings import load_settings

ADMIN_TOKEN = "test-admin-token"
USERS, TRACKS, DIM = 120, 400, 16


@dataclass(frozen=True)
class ServingHome:
    home: Path
    env: dict[str, str]
    registry: ControlPlane
    known_user: str


def register_version(registry: ControlPlane, model_dir: Path, name: str) -> int:
    """The version directory as the run's plain artifacts (the training plane logs it as a pyfunc model,
    which needs pandas; the service reads the directory either way)."""
    run_id = registry.start_run(name, tags={})
    client = registry.client()
    client.log_artifacts(run_id, str(model_dir), "model")
    uri = f"{client.get_run(run_id).info.artifact_uri}/model"
    registry.end_run(run_id)
    return registry.register(
        model_uri=uri, run_id=run_id, lineage={}, reason=f"{name} for the tests", by="tests"
    ).version


def random_version(directory: Path, seed: int) -> Path:
    """Users ``u1…u120`` and tracks ``t1…t400`` with random embeddings; each user heard 5–30 tracks."""
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(USERS + 1, DIM))
    items = rng.normal(size=(TRACKS + 1, DIM))
    seen = [[]] + [sorted(rng.choice(np.arange(1, TRACKS + 1), rng.integers(5, 31), replace=False).tolist())
                   for _ in range(USERS)]  # fmt: skip
    return write_version(directory, users, items, seen)


@pytest.fixture(scope="session")
def serving_home(tmp_path_factory: pytest.TempPathFactory) -> ServingHome:
    home = tmp_path_factory.mktemp("serving") / "home"
    settings = load_settings({"RECSYS_HOME": str(home)})
    registry = ControlPlane(settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir, home / "models" / "registry")
    for seed, name in ((3, "champion"), (4, "challenger")):
        # History-aware, as the training exports by default: users are ranked from their plays too.
        register_version(registry, with_history(random_version(home / "exports" / name, seed), 10, seed), name)
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
    return ServingHome(home=home, env=env, registry=registry, known_user="u1")
