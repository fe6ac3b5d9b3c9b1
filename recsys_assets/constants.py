"""Group names, asset keys shared across modules, and the platform's default thresholds."""

from __future__ import annotations

from datetime import timedelta

import dagster as dg

# Asset groups, lowercase, one per stage of the pipeline.
INGESTION = "ingestion"
PREPARATION = "preparation"
FEATURES = "features"
TRAINING = "training"
EVALUATION = "evaluation"
REGISTRY = "registry"
DEPLOYMENT = "deployment"
MONITORING = "monitoring"

# Prepared datasets (directories or files under $RECSYS_HOME/prepared).
RAW_EVENTS_DATASET = "listening_events"
CLEAN_EVENTS_DATASET = "clean_listening_events"

# Rows per extracted Parquet file: bounds the memory of one extraction step.
EXTRACT_ROWS_PER_FILE = 2_000_000

# The tag that the run coordinator limits to one run at a time (dagster.yaml): retrains never overlap.
RETRAIN_TAG = "recsys/retrain"

# Freshness: raw events extracted at least hourly, features rebuilt within two hours of them, and a
# model retrained at least monthly (the monthly schedule's guarantee, plus slack).
RAW_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=1), warn_window=timedelta(minutes=30))
FEATURES_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=2), warn_window=timedelta(hours=1))
MODEL_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(days=35), warn_window=timedelta(days=31))
