"""Group names, asset keys shared across modules, and the platform's default thresholds."""

from __future__ import annotations

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
