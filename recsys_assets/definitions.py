"""The code location: every definition under ``defs/``, loaded when Dagster asks for them."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

import recsys_assets  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        # One process per run: a run's steps share the imports (TensorFlow alone costs seconds per process).
        dg.Definitions(executor=dg.in_process_executor),
    )
