"""Jobs: one retrain is one run, from the new events to the canary deployment."""

from __future__ import annotations

import dagster as dg

from recsys_assets.constants import RETRAIN_TAG
from recsys_core.settings import load_settings

# Extraction, cleaning, features, training, evaluation and its gate, registration, the Bento and its
# deployment: everything downstream of the raw events but the monitoring assets (drift report, canary
# analysis), which run on their own cadence.
RETRAIN_SELECTION = dg.AssetSelection.assets("listening_events").downstream() - dg.AssetSelection.assets(
    "canary_analysis", "drift_report"
)

retrain_job = dg.define_asset_job(
    "retrain",
    selection=RETRAIN_SELECTION,
    tags={RETRAIN_TAG: "true"},
    # RECSYS_RETRAIN_RUN_CONFIG tunes every triggered retrain (hyperparameters, gate, canary fraction).
    config=load_settings().automation.retrain_run_config or None,
    description="Retrain the two-tower model on fresh data and, if the gate passes, canary it.",
)
