"""Group names, asset keys shared across modules, and the platform's default thresholds."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import dagster as dg

# The checkout (an editable install): the Bento's build context and the Kubernetes templates.
REPO_ROOT = Path(__file__).resolve().parents[1]

# Asset groups, lowercase, one per stage of the pipeline (and per folder of defs/).
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


# On Kubernetes (RECSYS_EXECUTOR=k8s: dagster-k8s's k8s_job_executor), the training step runs in a
# pod of its own with a GPU; dagster-k8s reads this tag (recsys_assets_tests/deploy/ builds the Job
# with dagster-k8s itself and validates it against Kubernetes' schemas). Inert elsewhere.
# The preparation's steps on Kubernetes with RECSYS_PREP_ENGINE=spark: the step's pod is the Spark
# driver (client mode) and asks Kubernetes for executor pods, so it runs as the `recsys-spark`
# service account (deploy/k8s/spark.yaml) and tells the executors its address (POD_IP) and its name
# (the executors are owned by it, and go when it goes). Without Spark the same pod cleans with polars.
PREPARATION_POD = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "12Gi"}},
            "env": [
                {"name": "POD_IP", "value_from": {"field_ref": {"field_path": "status.podIP"}}},
                {"name": "POD_NAME", "value_from": {"field_ref": {"field_path": "metadata.name"}}},
            ],
        },
        "pod_spec_config": {"service_account_name": "recsys-spark"},
    }
}

TRAINING_POD = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {
                "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                "limits": {"memory": "24Gi", "nvidia.com/gpu": "1"},
            },
            "env": [{"name": "TF_FORCE_GPU_ALLOW_GROWTH", "value": "true"}],
        },
        "pod_spec_config": {
            # It creates the indexed Job of a training on several pods (deploy/k8s/training.yaml).
            "service_account_name": "recsys-training",
            "node_selector": {"recsys/node-pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
}
