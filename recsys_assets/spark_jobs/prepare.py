"""The preparation as a PySpark application, launched through Dagster Pipes.

An ordinary PySpark script: ``spark-submit recsys_assets/spark_jobs/prepare.py``. Dagster launches it
(``PipesSubprocessClient`` with ``spark-submit`` locally or on a standalone cluster, ``PipesK8sClient``
with a driver pod on Kubernetes) and passes the task in the Pipes extras; the script reports its
row counts, quarantine reasons and its own conservation check back through Pipes.

Tasks (``extras["task"]``):

- ``clean``: clean the raw files of one or more partitions in one application. Writes under
  ``extras["staging"]``: ``clean/_partition=<key>/`` (one Parquet file per partition),
  ``quarantine/`` and ``stats/`` (per partition and batch: rows in, clean, quarantined,
  duplicates). The asset then moves the clean files into place and loads the quarantine into the
  warehouse: the commit stays on Dagster's side, where the warehouse is.
- ``track_features`` / ``training_interactions``: the table from every clean partition, written as
  one Parquet file under ``extras["staging"]``.

No Dagster here beyond ``dagster_pipes`` (the lightweight protocol package), and no Python UDF.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from dagster_pipes import open_dagster_pipes
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_assets.data import spark_prep as S
from recsys_assets.data.rules import CleaningRules
from recsys_core.contracts import RAW_EVENTS_SCHEMA, TRACKS_SCHEMA, USERS_SCHEMA

# The name of the asset check the job reports (defs/preparation/assets.py declares it).
CONSERVATION_CHECK = "engine_conservation"

# Settings every run needs, whatever the submit options: UTC (hours and formatted timestamps), and
# timestamps written as Parquet's INT64 microseconds in UTC (what polars writes and reads).
SESSION_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}


def cleaning_rules(raw: dict[str, Any]) -> CleaningRules:
    return CleaningRules(
        max_ms_played=int(raw["max_ms_played"]),
        future_tolerance=timedelta(seconds=float(raw["future_tolerance_seconds"])),
        earliest=datetime.fromisoformat(raw["earliest"]),
        bot_plays_per_hour=int(raw["bot_plays_per_hour"]),
    )


def read_raw(spark: SparkSession, partitions: list[dict[str, str]]) -> DataFrame:
    """The raw files of ``partitions`` with their partition key, row position and origin."""
    origins = spark.createDataFrame([(p["key"], p["origin"]) for p in partitions], [S.GROUP, S.ORIGIN])
    raw = spark.read.schema(S.spark_schema(RAW_EVENTS_SCHEMA)).parquet(*[p["raw"] for p in partitions])
    return raw.select(
        *RAW_EVENTS_SCHEMA,
        F.regexp_extract("_metadata.file_path", r"(batches-\d{10}-\d{10})\.parquet$", 1).alias(S.GROUP),
        F.col("_metadata.row_index").alias(S.ORDER),
    ).join(F.broadcast(origins), on=S.GROUP, how="left")


def clean(spark: SparkSession, extras: dict[str, Any], log=print) -> dict[str, Any]:
    """Clean the partitions of ``extras``; the Pipes metadata of the materialization (with the
    number of batches whose rows in are not their clean + quarantined + duplicates: ``main`` fails
    the job on any, after reporting)."""
    partitions = extras["partitions"]
    staging = extras["staging"].rstrip("/")
    raw = read_raw(spark, partitions)
    result = S.clean_events(
        raw,
        spark.read.schema(S.spark_schema(TRACKS_SCHEMA)).parquet(extras["tracks"]),
        spark.read.schema(S.spark_schema(USERS_SCHEMA)).parquet(extras["users"]),
        now=datetime.fromisoformat(extras["now"]),
        rules=cleaning_rules(extras["rules"]),
        persist=True,
    )
    # One task (so one file) per partition: a partition is at most a few million rows.
    result.clean.repartition(S.GROUP).write.mode("overwrite").partitionBy(S.GROUP).parquet(f"{staging}/clean")
    result.quarantined.coalesce(1).write.mode("overwrite").parquet(f"{staging}/quarantine")
    log(f"cleaned {len(partitions)} partition(s) into {staging}/clean")

    # Counts per partition and batch, from what was written (read back: the plan is not run twice).
    written = spark.read.parquet(f"{staging}/clean")
    quarantined = spark.read.parquet(f"{staging}/quarantine")
    keys = [S.GROUP, "batch_id"]

    def counted(frame: DataFrame, name: str) -> DataFrame:
        return frame.groupBy(*keys).agg(F.count(F.lit(1)).alias(name))

    per_batch = (
        counted(raw, "rows_in")
        .join(counted(written, "clean"), keys, "left")
        .join(counted(quarantined, "quarantined"), keys, "left")
        .join(result.duplicates, keys, "left")
        .fillna(0, ["clean", "quarantined", "duplicates"])
    )
    stats = [row.asDict() for row in per_batch.orderBy(S.GROUP, "batch_id").collect()]
    if stats:  # (an empty list has no schema for Spark to infer; the asset reads no stats as none)
        spark.createDataFrame(stats).coalesce(1).write.mode("overwrite").parquet(f"{staging}/stats")
    result.release()
    reasons = {
        row["category"]: row["count"]
        for row in quarantined.groupBy(S.reason_category(F.col("reason")).alias("category")).count().collect()
    }
    totals = {k: sum(int(s[k]) for s in stats) for k in ("rows_in", "clean", "quarantined", "duplicates")}
    broken = [s for s in stats if s["rows_in"] != s["clean"] + s["quarantined"] + s["duplicates"]]
    return {
        **{k: {"raw_value": v, "type": "int"} for k, v in totals.items()},
        "partitions": {"raw_value": len(partitions), "type": "int"},
        "quarantined_by_reason": {"raw_value": reasons, "type": "json"},
        "engine_conservation_broken_batches": {"raw_value": len(broken), "type": "int"},
        **application(spark),
    }


def conservation_broken(metadata: dict[str, Any]) -> int:
    return int(metadata.get("engine_conservation_broken_batches", {}).get("raw_value", 0))


def table(spark: SparkSession, extras: dict[str, Any], log=print) -> dict[str, Any]:
    """Build the table ``extras["task"]`` from the clean files; the Pipes metadata of the materialization."""
    task = extras["task"]
    build = {"track_features": S.track_features, "training_interactions": S.training_interactions}[task]
    clean_events = spark.read.schema(S.spark_schema(S.CLEAN_SCHEMA)).parquet(*extras["clean"])
    out = f"{extras['staging'].rstrip('/')}/{task}"
    # One file, as the polars engine writes it: the asset moves it into place.
    build(clean_events).coalesce(1).write.mode("overwrite").parquet(out)
    rows = spark.read.parquet(out).count()
    log(f"{task}: {rows} rows into {out}")
    return {"dagster/row_count": {"raw_value": rows, "type": "int"}, **application(spark)}


def application(spark: SparkSession) -> dict[str, Any]:
    """Where the job ran, for the asset's metadata."""
    sc = spark.sparkContext
    return {
        "spark_application_id": {"raw_value": sc.applicationId, "type": "text"},
        "spark_master": {"raw_value": sc.master, "type": "text"},
        "spark_default_parallelism": {"raw_value": sc.defaultParallelism, "type": "int"},
    }


def session(name: str, conf: dict[str, str] | None = None) -> SparkSession:
    """The job's session: the master and settings of spark-submit, with ``SESSION_CONF`` and ``conf``."""
    builder = SparkSession.builder.appName(name)
    for key, value in {**SESSION_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def main() -> None:
    with open_dagster_pipes() as pipes:
        extras = dict(pipes.extras)
        spark = session(f"recsys-{extras['task']}")
        try:
            metadata = (clean if extras["task"] == "clean" else table)(spark, extras, log=pipes.log.info)
            pipes.report_asset_materialization(metadata=metadata)
            if extras["task"] == "clean":
                # The engine's own conservation, an asset check of clean_listening_events (blocking).
                broken = conservation_broken(metadata)
                pipes.report_asset_check(
                    CONSERVATION_CHECK,
                    passed=broken == 0,
                    metadata={
                        "batches_broken": {"raw_value": broken, "type": "int"},
                        **{k: metadata[k] for k in ("rows_in", "clean", "quarantined", "duplicates", "partitions")},
                    },
                )
        finally:
            spark.stop()


if __name__ == "__main__":
    main()
