"""Benchmark: the preparation (cleaning + features + training interactions), polars against pandas.

    .venv/bin/python benchmarks/prep.py                       # 10M side by side, then 50M polars end to end
    .venv/bin/python benchmarks/prep.py --events 1000000 --big 0   # a quick run

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


def generate(events: int, directory: Path, seed: int = 11) -> Path:
    """Simulated raw files of about ``events`` events (cached by size)."""
    import numpy as np
    import polars as pl

    from recsys_core.contracts import RAW_EVENTS_SCHEMA, conform
    from recsys_sim.simulation import expected_events_per_day
    from recsys_sim.simulator import World

    target = directory / f"raw-{events}"
    if (target / "done").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    users = max(1000, min(20_000, events // 500))
    probe = World.create(users=users, tracks=max(5000, users * 3), seed=seed, start=NOW - timedelta(days=1), end=NOW)
    days = max(1, round(events / expected_events_per_day(probe)))
    start = NOW - timedelta(days=days)
    world = World.create(users=users, tracks=max(5000, users * 3), seed=seed, start=start, end=NOW)
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
    parser.add_argument("--_engine", help=argparse.SUPPRESS)
    parser.add_argument("--_e2e", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_input", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._engine:
        print(json.dumps(run_engine(args._engine, args._input)))
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
