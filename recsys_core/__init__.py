"""The shared core of the platform: what the training plane (``recsys_assets``, Dagster and
TensorFlow) and the serving plane (``serving``, BentoML) both need, and nothing else.

- :mod:`recsys_core.settings`: the only code that reads the environment;
- :mod:`recsys_core.contracts` and :mod:`recsys_core.warehouse`: the data contracts and the
  warehouse client (DuckDB or PostgreSQL);
- :mod:`recsys_core.model_version` and :mod:`recsys_core.scoring`: the model-version format and the
  one scorer (numpy);
- :mod:`recsys_core.registry` (reads) and :mod:`recsys_core.control` (the one writer): the MLflow
  registry client.

It imports neither Dagster, TensorFlow, BentoML nor Evidently: import-linter contracts in the test
command (``.importlinter``) keep it so, and keep ``serving`` and ``recsys_assets`` apart.
"""

__version__ = "0.1.0"
