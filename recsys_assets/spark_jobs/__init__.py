"""PySpark applications launched through Dagster Pipes (spark-submit, or a driver pod on Kubernetes)."""
