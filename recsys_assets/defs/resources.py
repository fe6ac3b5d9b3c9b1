"""The code location's resources, built from the settings when the definitions load (never at import)."""

from __future__ import annotations

import dagster as dg

from recsys_assets.resources import build_resources
from recsys_core.settings import load_settings


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=build_resources(load_settings()))
