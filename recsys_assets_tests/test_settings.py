from __future__ import annotations

import re
from pathlib import Path

import pytest

from recsys_core.settings import load_settings


def test_defaults_root_everything_in_recsys_home(tmp_path: Path) -> None:
    settings = load_settings({"RECSYS_HOME": str(tmp_path)})
    assert settings.home == tmp_path
    assert settings.dagster_home == tmp_path / "dagster"
    assert settings.warehouse_uri == f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    assert settings.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert dict(settings.ports) == {"dagster": 3000, "bento": 3001, "mlflow": 5000, "prometheus": 9090}
    assert settings.serving_url == "http://127.0.0.1:3001"
    assert settings.environment == "embedded"


def test_relative_home_is_made_absolute() -> None:
    settings = load_settings({"RECSYS_HOME": "some/dir"})
    assert settings.home.is_absolute()
    assert settings.home.parts[-2:] == ("some", "dir")


def test_a_postgres_warehouse_means_production() -> None:
    settings = load_settings({"RECSYS_HOME": "/x", "RECSYS_WAREHOUSE_URI": "postgresql://u:p@db/recsys"})
    assert settings.environment == "production"


def test_ports_override_and_follow_through_to_the_serving_url() -> None:
    settings = load_settings({"RECSYS_HOME": "/x", "RECSYS_BENTO_PORT": "4001"})
    assert settings.ports["bento"] == 4001
    assert settings.serving_url == "http://127.0.0.1:4001"


@pytest.mark.parametrize(("value", "message"), [("abc", "'abc' is not a port number"), ("70000", "outside 1..65535")])
def test_bad_ports_name_the_variable_and_the_value(value: str, message: str) -> None:
    with pytest.raises(ValueError, match="RECSYS_DAGSTER_PORT") as err:
        load_settings({"RECSYS_HOME": "/x", "RECSYS_DAGSTER_PORT": value})
    assert message in str(err.value)


def test_child_env_reproduces_the_settings(tmp_path: Path) -> None:
    settings = load_settings({"RECSYS_HOME": str(tmp_path), "RECSYS_MLFLOW_PORT": "5050"})
    assert load_settings(settings.child_env({})) == settings
    assert settings.child_env({})["TF_USE_LEGACY_KERAS"] == "1"


def test_canary_settings_parse_and_name_what_is_wrong() -> None:
    from recsys_core.settings import load_settings

    defaults = load_settings({}).automation
    assert (defaults.canary_steps, defaults.canary_mode) == ((0.05, 0.2, 0.5), "ab")
    custom = load_settings({"RECSYS_CANARY_STEPS": "0.1,0.3", "RECSYS_CANARY_MODE": "interleaving"}).automation
    assert (custom.canary_steps, custom.canary_mode) == ((0.1, 0.3), "interleaving")
    for env, message in [
        ({"RECSYS_CANARY_STEPS": "0.5,0.2"}, "RECSYS_CANARY_STEPS='0.5,0.2': expected increasing"),
        ({"RECSYS_CANARY_STEPS": "half"}, "RECSYS_CANARY_STEPS='half': expected comma-separated"),
        ({"RECSYS_CANARY_MODE": "bandit"}, "RECSYS_CANARY_MODE='bandit': expected one of ab, interleaving"),
        ({"RECSYS_CANARY_ALPHA": "x"}, "RECSYS_CANARY_ALPHA='x' is not a number"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_settings(env)


def test_serving_settings() -> None:
    from recsys_core.settings import load_settings

    knobs = load_settings({"RECSYS_FAULT_CHALLENGER_DELAY_MS": "40", "RECSYS_WAREHOUSE_URI": "none"}).serving
    assert knobs.fault_delay_seconds == pytest.approx(0.04)
    assert not knobs.warehouse_enabled
    assert load_settings({}).serving.model_poll_seconds == 5.0
    home = load_settings({"RECSYS_HOME": "/srv/recsys"})
    assert home.feedback_log_dir == Path("/srv/recsys/serving/spill")
    volume = load_settings({"RECSYS_HOME": "/srv/recsys", "RECSYS_FEEDBACK_LOG_DIR": "/var/lib/recsys/wal"})
    assert volume.feedback_log_dir == Path("/var/lib/recsys/wal")
    with pytest.raises(ValueError, match="RECSYS_MODEL_POLL_SECONDS='soon' is not a number"):
        load_settings({"RECSYS_MODEL_POLL_SECONDS": "soon"})


def test_the_home_is_private_to_its_owner(recsys_env) -> None:
    assert recsys_env.home.stat().st_mode & 0o777 == 0o700


def test_the_dagster_storage_uri_names_dagster_postgres_driver() -> None:
    settings = load_settings({"RECSYS_DAGSTER_STORAGE_URI": "postgresql://u:p@db:5432/dagster"})
    assert settings.dagster_storage_uri == "postgresql+psycopg2://u:p@db:5432/dagster"
    assert settings.child_env({})["RECSYS_DAGSTER_STORAGE_URI"] == settings.dagster_storage_uri
    assert load_settings({}).dagster_storage_uri is None


def test_training_settings() -> None:
    defaults = load_settings({}).training
    assert (defaults.window_days, defaults.strategy, defaults.workers, defaults.launcher) == (None, "auto", 1, "local")
    custom = load_settings({"RECSYS_TRAIN_WINDOW_DAYS": "30", "RECSYS_TRAIN_STRATEGY": "multi-worker",
                            "RECSYS_TRAIN_WORKERS": "4", "RECSYS_TRAIN_LAUNCHER": "kubernetes"}).training  # fmt: skip
    assert (custom.window_days, custom.strategy, custom.workers, custom.launcher) == (
        30,
        "multi-worker",
        4,
        "kubernetes",
    )
    assert load_settings({"RECSYS_TRAIN_WINDOW_DAYS": "ALL"}).training.window_days is None
    assert defaults.bucket_rows == 2_000_000
    assert defaults.tuning_budget_seconds == 10
    assert load_settings({"RECSYS_TUNING_BUDGET_SECONDS": "0"}).training.tuning_budget_seconds == 0
    assert load_settings({"RECSYS_TRAIN_BUCKET_ROWS": "50000"}).training.bucket_rows == 50_000
    for env, message in [
        (
            {"RECSYS_TRAIN_WINDOW_DAYS": "0"},
            "RECSYS_TRAIN_WINDOW_DAYS='0': expected a number of days (1 or more) or all",
        ),
        ({"RECSYS_TRAIN_WINDOW_DAYS": "a week"}, "RECSYS_TRAIN_WINDOW_DAYS='a week': expected a number of days"),
        ({"RECSYS_TRAIN_STRATEGY": "horovod"}, "RECSYS_TRAIN_STRATEGY='horovod': expected one of auto, one-device"),
        ({"RECSYS_TRAIN_WORKERS": "0"}, "RECSYS_TRAIN_WORKERS=0: expected a positive number"),
        ({"RECSYS_TRAIN_LAUNCHER": "slurm"}, "RECSYS_TRAIN_LAUNCHER='slurm': expected one of local, kubernetes"),
        ({"RECSYS_TRAIN_BUCKET_ROWS": "-1"}, "RECSYS_TRAIN_BUCKET_ROWS=-1: expected a positive number"),
        ({"RECSYS_TUNING_BUDGET_SECONDS": "-5"}, "RECSYS_TUNING_BUDGET_SECONDS=-5: expected 0 or more"),
        ({"RECSYS_TUNING_BUDGET_SECONDS": "a minute"}, "RECSYS_TUNING_BUDGET_SECONDS='a minute' is not a number"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_settings(env)
