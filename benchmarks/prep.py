"""Benchmark: the preparation (cleaning + features + training interactions), polars against pandas,
and the product's two engines, polars and Spark, side by side.

    .venv/bin/python benchmarks/prep.py                       # 10M side by side, then 50M polars end to end
    .venv/bin/python benchmarks/prep.py --events 1000000 --big 0   # a quick run
    .venv/bin/python benchmarks/prep.py --engines polars,spark,spark-standalone --events 10000000

With ``--engines`` (any of ``polars``, ``spark`` = ``local[2]``, ``spark-standalone`` = a standalone
cluster of two one-core workers on 127.0.0.1, started from the PySpark distribution for the run), each
engine runs the product's preparation as the assets do, in a fresh process, on the same raw files (one
partition per file): the cleaning with its quarantine, then ``track_features`` and
``training_interactions`` from every clean file. polars runs ``recsys_assets.data`` file by file;
Spark runs the Spark job's own functions (``recsys_assets.spark_jobs.prepare``), all partitions in one
application. The driver samples the memory of each engine's process tree every 0.2 s (for the
standalone cluster, of the executors' JVMs apart), then checks that every output is the same, partition
by partition, and prints one JSON object as its last line: an entry per engine with its ``seconds`` and
``peak_rss_mb``, and ``outputs_equal``.

1. Simulate the events (cached under ``--workdir``) as the extraction writes them: Parquet files of
   2 million rows with their ``batch_id``, with 0.3% of rows made bad (negative or absurd
   ``ms_played``, unknown ``event_type``, future timestamps) and 0.1% re-delivered duplicates.
2. Run the preparation in a fresh process per engine, on the same files: polars with the product's
   own functions (``recsys_assets.data.cleaning`` / ``features``), pandas with
   ``benchmarks/prep_pandas.py``, which implements the same rules. Each process reports its wall time
   and its peak resident memory (``ru_maxrss``); the driver checks that both produce the same row
   counts.
3. Run the product's preparation end to end on ``--big`` events the way the assets do it (one raw
   file at a time, then the features over all clean files with polars' streaming engine), and report
   events/s and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import recsys_assets  # noqa: F401  (environment first)

HERE = Path(__file__).resolve().parent
NOW = datetime(2026, 11, 1, tzinfo=UTC)
ROWS_PER_FILE = 2_000_000


def generate(events: int, directory: Path, seed: int = 11, users: int | None = None, tracks: int | None = None) -> Path:
    """Simulated raw files of about ``events`` events (cached by size and world); ``users`` and ``tracks``:
    the world's (default: one user per 500 events, 1,000 to 20,000, and three tracks a user)."""
    import numpy as np
    import polars as pl

    from recsys_core.contracts import RAW_EVENTS_SCHEMA, conform
    from recsys_sim.simulation import expected_events_per_day
    from recsys_sim.simulator import World

    shape = "" if users is None and tracks is None else f"-{users}x{tracks}"
    target = directory / f"raw-{events}{shape}"
    if (target / "done").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    users = users or max(1000, min(20_000, events // 500))
    tracks = tracks or max(5000, users * 3)
    probe = World.create(users=users, tracks=tracks, seed=seed, start=NOW - timedelta(days=1), end=NOW)
    days = max(1, round(events / expected_events_per_day(probe)))
    start = NOW - timedelta(days=days)
    world = World.create(users=users, tracks=tracks, seed=seed, start=start, end=NOW)
    world.tracks_frame().write_parquet(target / "tracks.parquet")
    world.users_frame().write_parquet(target / "users.parquet")
    rng = np.random.default_rng(seed)
    pending, rows, file_index, total = [], 0, 0, 0
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal pending, rows, file_index, total
        frame = pl.concat(pending)
        n = frame.height
        bad = rng.random(n) < 0.003
        kind = rng.integers(0, 4, n)
        frame = frame.with_columns(
            pl.when(pl.Series(bad & (kind == 0))).then(-1_000).when(pl.Series(bad & (kind == 1))).then(10**11)
            .otherwise(pl.col("ms_played")).alias("ms_played"),
            pl.when(pl.Series(bad & (kind == 2))).then(pl.lit("teleport"))
            .otherwise(pl.col("event_type")).alias("event_type"),
            pl.when(pl.Series(bad & (kind == 3))).then(pl.lit(NOW + timedelta(days=400)))
            .otherwise(pl.col("played_at")).alias("played_at"),
            pl.lit(NOW).alias("ingested_at"),
            pl.lit(file_index + 1, pl.Int64).alias("batch_id"),
        )  # fmt: skip
        duplicates = frame.sample(fraction=0.001, seed=seed + file_index)
        frame = conform(pl.concat([frame, duplicates.with_columns(pl.col("ms_played") + 0)]), RAW_EVENTS_SCHEMA)
        frame.write_parquet(target / f"batches-{file_index + 1:010d}-{file_index + 1:010d}.parquet")
        file_index += 1
        total += frame.height
        pending, rows = [], 0
        print(f"  generated {total:,} events ({total / (time.perf_counter() - t0):,.0f} events/s)", file=sys.stderr)

    for frame in world.generate(start, NOW):
        pending.append(frame)
        rows += frame.height
        if rows >= ROWS_PER_FILE:
            flush()
        if total + rows >= events:
            break
    if pending:
        flush()
    (target / "done").write_text(str(total))
    return target


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def user_features(clean, genres: list[str]):
    """Per-user features: the workload this benchmark has measured since its first run (the product
    dropped the asset: nothing read it; the query tower computes its features per split). One row
    per user: activity, skip rate, completion, recency and genre shares.

    Args:
        clean: clean listening events.
        genres: the genres that get a share column (see :func:`top_genres`); the rest count as
            ``genre_share__other``.
    """
    import polars as pl

    from recsys_assets.data.features import GENRE_PREFIX, genre_column

    reference = clean.select(pl.col("played_at").max()).collect(engine="streaming").item()
    play = pl.col("event_type") == "play"
    skip = pl.col("event_type") == "skip"
    listens = play | skip
    shares = [
        ((pl.col("genre") == g) & play).sum().truediv(play.sum().clip(lower_bound=1)).alias(genre_column(g))
        for g in genres
    ]
    other = (
        (~pl.col("genre").is_in(genres) & play)
        .sum()
        .truediv(play.sum().clip(lower_bound=1))
        .alias(GENRE_PREFIX + "other")
    )
    return (
        clean.group_by("user_id")
        .agg(
            play.sum().alias("plays"),
            skip.sum().alias("skips"),
            (pl.col("event_type") == "like").sum().alias("likes"),
            (pl.col("event_type") == "dislike").sum().alias("dislikes"),
            (skip.sum() / listens.sum().clip(lower_bound=1)).alias("skip_rate"),
            pl.col("completion").filter(listens).mean().alias("completion_mean"),
            pl.col("track_id").filter(play).n_unique().alias("distinct_tracks"),
            pl.col("played_at").dt.date().n_unique().alias("active_days"),
            pl.col("played_at").min().alias("first_played_at"),
            pl.col("played_at").max().alias("last_played_at"),
            pl.col("suspected_bot").any().alias("suspected_bot"),
            *shares,
            other,
        )
        .with_columns(
            ((pl.lit(reference) - pl.col("last_played_at")).dt.total_seconds() / 86400.0).alias("recency_days"),
            (pl.col("plays") / pl.col("active_days").clip(lower_bound=1)).alias("plays_per_active_day"),
        )
        .sort("user_id")
    )


def run_engine(engine: str, directory: Path) -> dict:
    """One engine's preparation of every raw file in ``directory``, in this process."""
    import polars as pl

    from recsys_assets.data.cleaning import CleaningRules

    rules = CleaningRules()
    files = sorted(directory.glob("batches-*.parquet"))
    t0 = time.perf_counter()
    if engine == "polars":
        from recsys_assets.data import features as F
        from recsys_assets.data.cleaning import clean_events

        # Lazy scan: polars reads the files inside the cleaning plan (the assets do the same per file).
        raw = pl.scan_parquet(files)
        tracks = pl.read_parquet(directory / "tracks.parquet")
        result = clean_events(
            raw, tracks, pl.read_parquet(directory / "users.parquet"), now=NOW, origin="bench", rules=rules
        )
        clean = result.clean.lazy()
        genres = F.top_genres(clean)
        users = user_features(clean, genres).collect(engine="streaming")
        tracks = F.track_features(clean).collect(engine="streaming")
        interactions = F.training_interactions(clean).collect(engine="streaming")
        counts = {
            "clean": result.clean.height,
            "quarantined": result.quarantined.height,
            "duplicates": int(result.duplicates["duplicates"].sum()),
            "users": users.height,
            "tracks": tracks.height,
            "interactions": interactions.height,
        }
    else:
        import pandas as pd

        sys.path.insert(0, str(HERE))
        import prep_pandas as P

        raw = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        clean, quarantined, duplicates = P.clean_events(
            raw, pd.read_parquet(directory / "tracks.parquet"), pd.read_parquet(directory / "users.parquet"), NOW, rules
        )
        del raw
        genres = P.top_genres(clean)
        users = P.user_features(clean, genres)
        tracks = P.track_features(clean)
        interactions = P.training_interactions(clean)
        counts = {
            "clean": len(clean),
            "quarantined": len(quarantined),
            "duplicates": int(duplicates.sum()),
            "users": len(users),
            "tracks": len(tracks),
            "interactions": len(interactions),
        }
    return {"engine": engine, "seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb(), "counts": counts}


def run_end_to_end(directory: Path, work: Path) -> dict:
    """The product's preparation as the assets run it: file by file, then streaming features."""
    import shutil

    import polars as pl

    from recsys_assets.data import features as F
    from recsys_assets.data.cleaning import clean_events

    out = work / "clean"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tracks = pl.read_parquet(directory / "tracks.parquet")
    users = pl.read_parquet(directory / "users.parquet")
    t0 = time.perf_counter()
    rows = clean_rows = 0
    for path in sorted(directory.glob("batches-*.parquet")):
        raw = pl.read_parquet(path)
        rows += raw.height
        result = clean_events(raw, tracks, users, now=NOW, origin=str(path))
        clean_rows += result.clean.height
        result.clean.write_parquet(out / path.name)
        print(f"  cleaned {rows:,} events ({rows / (time.perf_counter() - t0):,.0f} events/s)", file=sys.stderr)
    clean_seconds = time.perf_counter() - t0
    scan = pl.scan_parquet(sorted(out.glob("*.parquet")))
    genres = F.top_genres(scan)
    user_features(scan, genres).sink_parquet(work / "user_features.parquet")
    F.track_features(scan).sink_parquet(work / "track_features.parquet")
    F.training_interactions(scan).sink_parquet(work / "training_interactions.parquet")
    seconds = time.perf_counter() - t0
    return {
        "events": rows,
        "clean": clean_rows,
        "seconds": seconds,
        "clean_seconds": clean_seconds,
        "events_per_second": rows / seconds,
        "peak_rss_mb": _peak_rss_mb(),
    }


SPARK_MEMORY = {"driver_local": "12g", "driver_cluster": "2g", "worker": "9g", "executor": "8g"}


def prepare_polars(directory: Path, out: Path) -> dict:
    """The polars engine as the assets run it: each raw file cleaned on its own, then the tables."""
    import shutil

    import polars as pl

    from recsys_assets.data import features as F
    from recsys_assets.data.cleaning import clean_events

    shutil.rmtree(out, ignore_errors=True)
    (out / "clean").mkdir(parents=True)
    (out / "quarantine").mkdir()
    tracks = pl.read_parquet(directory / "tracks.parquet")
    users = pl.read_parquet(directory / "users.parquet")
    t0 = time.perf_counter()
    for path in sorted(directory.glob("batches-*.parquet")):
        result = clean_events(pl.read_parquet(path), tracks, users, now=NOW, origin=str(path))
        result.clean.write_parquet(out / "clean" / path.name)
        result.quarantined.write_parquet(out / "quarantine" / path.name)
    scan = pl.scan_parquet(sorted((out / "clean").glob("*.parquet")))
    F.track_features(scan).sink_parquet(out / "track_features.parquet")
    F.training_interactions(scan).sink_parquet(out / "training_interactions.parquet")
    return {"seconds": time.perf_counter() - t0}


def prepare_spark(directory: Path, out: Path, master: str) -> dict:
    """The Spark engine: the job's own functions, every partition in one application."""
    import shutil

    from recsys_assets.data.store import spark_uri
    from recsys_assets.spark_jobs import prepare as job

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    local = master.startswith("local")
    conf = {"spark.driver.memory": SPARK_MEMORY["driver_local" if local else "driver_cluster"], "spark.master": master,
            "spark.ui.enabled": "false", "spark.log.level": "WARN", "spark.driver.host": "127.0.0.1"}  # fmt: skip
    if not local:
        conf.update({"spark.executor.memory": SPARK_MEMORY["executor"], "spark.executor.cores": "1",
                     "spark.scheduler.minRegisteredResourcesRatio": "1.0"})  # fmt: skip
    t0 = time.perf_counter()
    spark = job.session("recsys-bench-prep", conf)
    started = time.perf_counter() - t0
    files = sorted(directory.glob("batches-*.parquet"))
    metadata = job.clean(
        spark,
        {
            "partitions": [{"key": p.stem, "raw": spark_uri(p), "origin": str(p)} for p in files],
            "tracks": spark_uri(directory / "tracks.parquet"),
            "users": spark_uri(directory / "users.parquet"),
            "staging": spark_uri(out),
            "now": NOW.isoformat(),
            "rules": {
                "max_ms_played": 24 * 3600 * 1000,
                "future_tolerance_seconds": 600,
                "earliest": "2000-01-01T00:00:00+00:00",
                "bot_plays_per_hour": 180,
            },
        },  # fmt: skip
        log=lambda m: print(m, file=sys.stderr),
    )
    clean = [spark_uri(p) for p in sorted((out / "clean").glob("_partition=*"))]
    for task in ("track_features", "training_interactions"):
        job.table(
            spark, {"task": task, "clean": clean, "staging": spark_uri(out)}, log=lambda m: print(m, file=sys.stderr)
        )
    seconds = time.perf_counter() - t0
    parallelism = spark.sparkContext.defaultParallelism
    spark.stop()
    return {"seconds": seconds, "session_start_seconds": started, "parallelism": parallelism,
            "engine_conservation_broken_batches": job.conservation_broken(metadata)}  # fmt: skip


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def _sampled(command: list[str], executors_of: list | None = None) -> dict:
    """Run ``command``; its last JSON line, with the peak RSS of its process tree (and of the
    executors under ``executors_of``, the cluster's workers) sampled every 0.2 s."""
    import psutil

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    me = psutil.Process(proc.pid)
    peak = executors_peak = 0
    workers = [psutil.Process(p.pid) for p in executors_of or []]
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, _tree_rss(me))
        executors = 0
        for worker in workers:
            for child in worker.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    executors += child.memory_info().rss
        executors_peak = max(executors_peak, executors)
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    if executors_of is not None:
        result["executors_peak_rss_mb"] = executors_peak / 2**20
    return result


def outputs_equal(polars_out: Path, spark_out: Path) -> dict:
    """Each partition's clean rows and quarantine, and both tables, compared (floats to 1e-9)."""
    import polars as pl
    from polars.testing import assert_frame_equal

    from recsys_assets.data.cleaning import CLEAN_SCHEMA

    compared = {"partitions": 0, "clean_rows": 0, "quarantined_rows": 0}
    quarantine = pl.read_parquet(spark_out / "quarantine" / "*.parquet")
    for path in sorted((polars_out / "clean").glob("*.parquet")):
        key = path.stem
        spark_clean = pl.read_parquet(spark_out / "clean" / f"_partition={key}" / "*.parquet").select(
            list(CLEAN_SCHEMA)
        )
        expected = pl.read_parquet(path)
        assert_frame_equal(spark_clean.sort("event_id"), expected.sort("event_id"))
        q_expected = pl.read_parquet(polars_out / "quarantine" / path.name)
        q_got = quarantine.filter(pl.col("_partition") == key).drop("_partition")
        order = ["batch_id", "event_id", "reason"]
        assert_frame_equal(q_got.sort(order, nulls_last=True), q_expected.sort(order, nulls_last=True))
        compared["partitions"] += 1
        compared["clean_rows"] += expected.height
        compared["quarantined_rows"] += q_expected.height
    assert_frame_equal(
        pl.read_parquet(spark_out / "track_features" / "*.parquet").sort("track_id"),
        pl.read_parquet(polars_out / "track_features.parquet").sort("track_id"),
        rel_tol=1e-9,
    )
    keys = ["user_id", "track_id", "played_at"]
    got = pl.read_parquet(spark_out / "training_interactions" / "*.parquet").sort(keys)
    expected = pl.read_parquet(polars_out / "training_interactions.parquet").sort(keys)
    assert_frame_equal(got, expected, rel_tol=1e-9)
    compared["interactions"] = expected.height
    return compared


def compare_engines(engines: list[str], raw: Path, workdir: Path) -> dict:
    from recsys_cli.stack.spark import StandaloneCluster

    results: dict[str, dict] = {}
    outputs: dict[str, Path] = {}
    for engine in engines:
        out = workdir / f"out-{engine}"
        outputs[engine] = out
        command = [sys.executable, __file__, "--_prepare", engine, "--_input", str(raw), "--workdir", str(out)]
        print(f"{engine}…", file=sys.stderr)
        if engine == "spark-standalone":
            cluster = StandaloneCluster(workdir / "cluster", workers=2, cores=1, memory=SPARK_MEMORY["worker"]).start()
            try:
                results[engine] = _sampled(
                    [*command, "--_master", cluster.master_url], executors_of=cluster.processes[1:]
                )
            finally:
                cluster.stop()
        else:
            results[engine] = _sampled([*command, "--_master", "local[2]"])
        print(f"{engine}: {results[engine]}", file=sys.stderr)
    summary: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "events": int((raw / "done").read_text()),
        **results,
    }
    spark_engines = [e for e in engines if e != "polars"]
    if "polars" in engines and spark_engines:
        checked = {}
        for engine in spark_engines:
            try:
                checked[engine] = outputs_equal(outputs["polars"], outputs[engine])
            except AssertionError as exc:
                checked[engine] = {"error": str(exc)[:2000]}
        summary["compared"] = checked
        summary["outputs_equal"] = all("error" not in c for c in checked.values())
        for engine in spark_engines:
            summary[f"{engine}_over_polars_seconds"] = results[engine]["seconds"] / results["polars"]["seconds"]
    return summary


def _child(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    sys.stderr.write(result.stderr[-2000:])
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000, help="events of the side-by-side run")
    parser.add_argument("--big", type=int, default=50_000_000, help="events of the end-to-end run (0: skip)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/recsys-bench-prep"))
    parser.add_argument("--engines", help="polars,spark,spark-standalone: the product's engines side by side")
    parser.add_argument("--_prepare", help=argparse.SUPPRESS)
    parser.add_argument("--_master", help=argparse.SUPPRESS)
    parser.add_argument("--_engine", help=argparse.SUPPRESS)
    parser.add_argument("--_e2e", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_input", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._engine:
        print(json.dumps(run_engine(args._engine, args._input)))
        return
    if args._prepare:
        if args._prepare == "polars":
            print(json.dumps(prepare_polars(args._input, args.workdir)))
        else:
            print(json.dumps(prepare_spark(args._input, args.workdir, args._master)))
        return
    if args.engines:
        raw = generate(args.events, args.workdir)
        print(json.dumps(compare_engines(args.engines.split(","), raw, args.workdir)))
        return
    if args._e2e:
        print(json.dumps(run_end_to_end(args._input, args.workdir / "e2e")))
        return

    raw = generate(args.events, args.workdir)
    results = {e: _child(["--_engine", e, "--_input", str(raw)]) for e in ("polars", "pandas")}
    if results["polars"]["counts"] != results["pandas"]["counts"]:
        raise SystemExit(f"the engines disagree: {results['polars']['counts']} vs {results['pandas']['counts']}")
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "events": int((raw / "done").read_text()),
        "polars": results["polars"],
        "pandas": results["pandas"],
        "speed_ratio": results["pandas"]["seconds"] / results["polars"]["seconds"],
        "memory_ratio": results["polars"]["peak_rss_mb"] / results["pandas"]["peak_rss_mb"],
    }
    if args.big:
        big = generate(args.big, args.workdir)
        summary["end_to_end"] = _child(["--_e2e", "--_input", str(big), "--workdir", str(args.workdir)])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
