"""A self-retraining music recommender, built as a Dagster asset graph.

Importing this package is the one place where ``TF_USE_LEGACY_KERAS=1`` is set: TensorFlow
Recommenders 0.7 refuses Keras 3, and the variable must be in the environment before TensorFlow is
first imported. Every entry point (the ``recsys`` CLI, the Dagster code location and its run
workers, the BentoML service, the tests and the benchmarks) imports this package first, and child
processes inherit the variable.
"""

from __future__ import annotations

import os
import sys

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    raise ImportError(
        "tensorflow was imported before recsys_assets, without TF_USE_LEGACY_KERAS=1: "
        "import recsys_assets first (TensorFlow Recommenders needs the legacy Keras)"
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's C++ start-up chatter (oneDNN notices, CPU feature lists) drowns real logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
