"""TF_USE_LEGACY_KERAS is set by importing the package, before TensorFlow, in every entry point."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_the_package_sets_the_variable_in_this_process() -> None:
    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"


@pytest.mark.slow
def test_tfrs_imports_with_legacy_keras_after_the_package() -> None:
    result = _run(
        "import recsys_assets, tensorflow as tf, tensorflow_recommenders as tfrs; "
        "print(tf.keras.__name__.split('.')[0], tfrs.__version__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["tf_keras", "v0.7.7"]


@pytest.mark.slow
def test_importing_tensorflow_first_is_refused_with_a_clear_message() -> None:
    result = _run("import tensorflow, recsys_assets")
    assert result.returncode != 0
    assert "import recsys_assets first" in result.stderr


@pytest.mark.parametrize("module", ["recsys_cli.cli", "recsys_assets.definitions"])
def test_entry_points_pass_through_the_package(module: str) -> None:
    result = _run(f"import {module}, os; print(os.environ['TF_USE_LEGACY_KERAS'])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
