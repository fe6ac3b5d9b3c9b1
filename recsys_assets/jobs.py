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


def _executor():
    """RECSYS_EXECUTOR=k8s: every step of a retrain in its own Kubernetes Job (dagster-k8s, in the
    production image), the training step with its GPU (``constants.TRAINING_POD``)."""
    if load_settings().automation.executor != "k8s":
        return None
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor


retrain_job = dg.define_asset_job(
    "retrain",
    selection=RETRAIN_SELECTION,
    tags={RETRAIN_TAG: "true"},
    # RECSYS_RETRAIN_RUN_CONFIG tunes every triggered retrain (hyperparameters, gate, canary fraction).
    config=load_settings().automation.retrain_run_config or None,
    description="Retrain the two-tower model on fresh data and, if the gate passes, canary it.",
    executor_def=_executor(),
)
