"""Benchmark: the two-tower training on N simulated events: time, memory, throughput and quality.

    .venv/bin/python benchmarks/training.py --events 1000000
    .venv/bin/python benchmarks/training.py --events 1000000 --against 8901d05      # side by side with older code
    .venv/bin/python benchmarks/training.py --events 1000000 --window-days 3 --window-days all
    .venv/bin/python benchmarks/training.py --data ../shared/data/ml-latest-small/ratings.csv --window-days 365,all

1. Simulate about ``--events`` events in the world of the quality benchmark's 1 M reference (20,000
   users, 60,000 tracks; the days grow with the events), and prepare them as the polars engine does
   (``benchmarks/prep.py``: cleaning, quarantine, ``track_features``, ``training_interactions``);
   cached under ``--workdir``. Or ``--data``: a MovieLens ratings file through the product's importer.
2. Train in a fresh process per variant, as ``two_tower_model`` does: the global temporal split, the
   training window, the validation split carved out of the train side, early stopping on its
   recall@20, the warm refit. A variant is the code (this checkout, or ``--against REF``: a git
   worktree of another commit, the same data and parameters) and the window. Each process reports
   its wall time (from reading the prepared tables to the trained model), its training time and
   examples per second, the best validation recall@20, the holdout's recall@20 and NDCG@10 (the same
   holdout whatever the window), and its peak resident memory (``ru_maxrss``).

The last line is one JSON object: ``events``, ``seconds``, ``peak_rss_mb``, ``examples_per_second`` and
``val_recall_at_20`` of this checkout's first variant, and ``variants``: each one's figures (also
``train_seconds``, the epochs and the ``holdout``'s).
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
USERS, TRACKS = 20_000, 60_000  # the quality benchmark's 1 M-event world (docs/benchmarks.md)


def prepared(events: int, workdir: Path) -> Path:
    """``training_interactions.parquet`` and ``track_features.parquet`` of ``events`` simulated events."""
    sys.path.insert(0, str(HERE))
    from prep import generate, prepare_polars

    out = workdir / f"prepared-{events}"
    if not (out / "done").exists():
        raw = generate(events, workdir, users=USERS, tracks=TRACKS)
        prepare_polars(raw, out)
        (out / "done").write_text("")
    return out


def prepared_file(data: Path, workdir: Path) -> Path:
    """The same two tables from a MovieLens ratings file (the product's importer and cleaning)."""
    from datetime import UTC, datetime

    from recsys_assets.data import features as F
    from recsys_assets.data.cleaning import CleaningRules, clean_events
    from recsys_assets.data.importers import import_file
    from recsys_core.contracts import TRACKS_SCHEMA, USERS_SCHEMA
    from recsys_core.warehouse import Warehouse

    out = workdir / f"prepared-{data.stem}"
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    warehouse = Warehouse(f"duckdb:///{out / 'warehouse.duckdb'}")
    import_file(warehouse, "movielens", data)
    raw = warehouse.events_between(0, warehouse.scalar("SELECT MAX(batch_id) FROM ingest_batches"))
    rules = CleaningRules(earliest=datetime(1990, 1, 1, tzinfo=UTC))
    clean = clean_events(raw, warehouse.table("tracks", TRACKS_SCHEMA), warehouse.table("users", USERS_SCHEMA),
                         now=datetime.now(UTC), origin="benchmark", rules=rules).clean  # fmt: skip
    F.training_interactions(clean.lazy()).collect().write_parquet(out / "training_interactions.parquet")
    F.track_features(clean.lazy()).collect().write_parquet(out / "track_features.parquet")
    (out / "done").write_text("")
    return out


def child(directory: Path, window: str, params: dict, protocol: str = "global", bucket_rows: int = 0) -> dict:
    """One training, in this (fresh) process: what ``two_tower_model`` and its worker do before the export.

    The prepared interactions are cut into user buckets by polars' streaming engine, split bucket by
    bucket (the global cutoff over all of them), and trained on one bucket at a time, the examples
    streamed from disk (``recsys_assets.ml.buckets``). The peak memory is read when the model is trained,
    before the evaluation loads the whole split to score the holdout. Code without buckets (``--against``
    an older commit) reads the table whole, as it did."""
    import tempfile

    import polars as pl

    import recsys_assets  # noqa: F401  (environment first)
    from recsys_assets.ml.metrics import build_eval_set, ranking_metrics, recommend
    from recsys_assets.ml.split import recent, temporal_split
    from recsys_assets.ml.two_tower import TwoTowerParams, train_two_tower

    t0 = time.perf_counter()
    tracks = pl.read_parquet(directory / "track_features.parquet").select("track_id", "artist_id", "genre")
    days = 0 if window == "all" else int(window)
    scratch = tempfile.TemporaryDirectory(prefix="recsys-bench-", dir=directory)
    try:
        from recsys_assets.ml.buckets import DEFAULT_BUCKET_ROWS, UserBuckets
        from recsys_assets.ml.split import bucket_splits
    except ImportError:  # older code: the whole table in memory
        interactions = pl.read_parquet(directory / "training_interactions.parquet")
        full = temporal_split(interactions, protocol)
        train = recent(full.train, days)
        from recsys_assets.ml.split import validation_split

        validation = validation_split(train, protocol)
        trained = train_two_tower(train, tracks, (validation.train, validation.holdout), TwoTowerParams(**params))
        train_rows, buckets = train.height, 1
        seconds, peak = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    else:
        work = Path(scratch.name)
        rows = bucket_rows or DEFAULT_BUCKET_ROWS
        everything = UserBuckets.scan(directory / "training_interactions.parquet", work / "all", rows)
        parts = []
        for i, split in enumerate(bucket_splits(everything, protocol)):
            (work / "train" / str(i)).mkdir(parents=True)
            split.train.write_parquet(work / "train" / str(i) / "part.parquet")
            split.holdout.write_parquet(work / f"holdout-{i}.parquet")
            parts.append(work / "train" / str(i))
        del split
        train_side = UserBuckets(tuple(parts))
        window_side = recent(train_side, days)
        trained = train_two_tower(window_side, tracks, protocol, TwoTowerParams(**params), scratch=work)
        train_rows, buckets = sum(b.height for b in window_side), len(parts)
        seconds, peak = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        from recsys_assets.ml.split import Split

        full = Split(protocol, train_side.collect(), pl.read_parquet(work / "holdout-*.parquet"), None)
    scratch.cleanup()
    import numpy as np

    index = {u: i for i, u in enumerate(trained.vocab.users)}
    rows = {t: i for i, t in enumerate(trained.vocab.items)}
    # The same users and the same heard tracks whatever the window: the eval set of the whole train side.
    # A user the window left out gets what the service gives an unknown user: the tracks with the most
    # listeners among the model's users over the whole train side (the version's popularity, export.py).
    eval_set = build_eval_set(full.train, full.holdout)
    item_rows = np.array([rows.get(t, 0) for t in eval_set.items])
    known = full.train.filter(pl.col("user_id").is_in(list(index)))
    counts = known.select("user_id", "track_id").unique().group_by("track_id").len()
    popularity = dict(zip(counts["track_id"].to_list(), counts["len"].to_list(), strict=True))
    fallback = np.array([popularity.get(t, 0) for t in eval_set.items], dtype=np.float32)

    def score(users):
        known = np.array([u in index for u in users])
        scores = trained.user_embeddings[[index.get(u, 0) for u in users]] @ trained.item_embeddings[item_rows].T
        scores[~known] = fallback
        scores[:, item_rows == 0] = -np.inf  # tracks the model does not know
        return scores

    holdout = ranking_metrics(recommend(score, eval_set, 20), eval_set, ks=(10, 20)).metrics
    return {
        "seconds": round(seconds, 1),
        "train_seconds": round(trained.train_seconds, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_rss_with_evaluation_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "buckets": buckets,
        "examples_per_second": round(trained.examples_per_second),
        "epochs": len(trained.history),
        "best_epoch": trained.best_epoch,
        "val_recall_at_20": max((h["val_recall@20"] for h in trained.history if "val_recall@20" in h), default=None),
        "train_interactions": train_rows,
        "holdout": {
            "recall@20": holdout["recall@20"],
            "ndcg@10": holdout["ndcg@10"],
            "users": len(eval_set.users),
            "users_outside_the_window": len(set(eval_set.users) - set(index)),
        },
    }


def profile(directory: Path, params: dict) -> dict:
    """Where an epoch's time goes, in this process: building the examples (histories), reading the input
    pipeline alone, the towers' forward pass alone, a training epoch with and without the history mask,
    and the per-epoch validation (embeddings and recall@20)."""
    from dataclasses import replace

    import polars as pl
    import tensorflow as tf

    import recsys_assets  # noqa: F401  (environment first)
    from recsys_assets.ml import two_tower as T
    from recsys_assets.ml.metrics import ranking_metrics, recommend
    from recsys_assets.ml.split import temporal_split

    interactions = pl.read_parquet(directory / "training_interactions.parquet")
    tracks = pl.read_parquet(directory / "track_features.parquet").select("track_id", "artist_id", "genre")
    split = temporal_split(interactions, "global")
    p = T.TwoTowerParams(**params)
    timings: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 2)
        return out

    data = timed("training data (pairs, features, histories, examples)",
                 lambda: T._prepare(T._parts(split.train, "global"), tracks, p, None))  # fmt: skip
    vocab, items, phase = data.vocab, data.items, data.fit
    state, tables, examples = phase.state, phase.tables(vocab, items), phase.examples
    steps = -(-examples.rows // p.batch_size)
    for mask in (True, False):
        q = replace(p, mask_history_negatives=mask)
        tf.keras.utils.set_random_seed(q.seed)
        model = T._build_model(vocab, items, state["user_features"].shape[1], q)
        dataset = T._dataset(examples, tables, q, q.seed)[0]
        model.fit(dataset.take(2), epochs=1, verbose=0)  # traced once
        timed(f"training epoch, history mask {'on' if mask else 'off'}",
              lambda model=model, dataset=dataset: model.fit(dataset, verbose=0))  # fmt: skip
    timed("input pipeline alone (an epoch)", lambda: sum(1 for _ in T._dataset(examples, tables, p, p.seed)[0]))

    @tf.function
    def forward(batch):
        return model.query_tower(batch), model.candidate_tower(batch)

    batches = T._dataset(examples, tables, p, p.seed)[0]
    forward(next(iter(batches)))
    timed("towers' forward pass alone (an epoch)", lambda: [forward(b) for b in batches])
    validation = data.validation

    def validate():
        user_emb, item_emb = T._embeddings(model, vocab, items, state, p)
        scorer = T._validation_scorer(vocab, user_emb, item_emb, validation.items)
        return ranking_metrics(recommend(scorer, validation, 20), validation, ks=(20,))

    timed(f"validation ({len(validation.users)} users)", validate)
    return {"pairs": examples.rows, "steps_per_epoch": steps, "seconds": timings}


def worktree(ref: str, workdir: Path) -> Path:
    """A checkout of ``ref`` (the code to compare with), made once."""
    path = workdir / f"code-{ref}"
    if not path.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref], check=True)
    return path


def run_variant(directory: Path, window: str, params: dict, code: Path | None, protocol: str,
                bucket_rows: int = 0) -> dict:  # fmt: skip
    env = dict(os.environ)
    if code is not None:  # the other commit's packages first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(directory), "--window-days", window,
               "--params", json.dumps(params), "--protocol", protocol, "--bucket-rows", str(bucket_rows)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the training failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--data", type=Path, help="a MovieLens ratings.csv instead of simulated events")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/recsys-bench-training"))
    parser.add_argument("--window-days", default="all", help="comma-separated: days, or all")
    parser.add_argument("--against", help="a git ref whose code trains the same data too, side by side")
    parser.add_argument("--params", default="{}", help="TwoTowerParams overrides as JSON (both codes)")
    parser.add_argument("--protocol", default="global", help="the holdout protocol: global or user")
    parser.add_argument("--bucket-rows", type=int, default=0,
                        help="interactions per user bucket (default: RECSYS_TRAIN_BUCKET_ROWS's)")  # fmt: skip
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="where an epoch's time goes (this checkout)")
    args = parser.parse_args()
    if args.profile:
        args.workdir.mkdir(parents=True, exist_ok=True)
        directory = prepared_file(args.data, args.workdir) if args.data else prepared(args.events, args.workdir)
        print(json.dumps(profile(directory, json.loads(args.params))))
        return
    if args.child:
        print(json.dumps(child(args.child, args.window_days, json.loads(args.params), args.protocol, args.bucket_rows)))
        return
    import recsys_assets  # noqa: F401  (environment first)

    args.workdir.mkdir(parents=True, exist_ok=True)
    directory = prepared_file(args.data, args.workdir) if args.data else prepared(args.events, args.workdir)
    import polars as pl

    events = pl.scan_parquet(directory / "training_interactions.parquet").select(pl.len()).collect().item()
    codes = {"this checkout": None}
    if args.against:
        codes[args.against] = worktree(args.against, args.workdir)
    results = {}
    for window in args.window_days.split(","):
        for name, code in codes.items():
            key = f"{name}, window {window}"
            print(f"training: {key} …", file=sys.stderr)
            results[key] = run_variant(directory, window, json.loads(args.params), code, args.protocol,
                                       args.bucket_rows)  # fmt: skip
            print(f"  {json.dumps(results[key])}", file=sys.stderr)
    first = next(iter(results.values()))  # this checkout, the first window: the top-level figures
    summary = {
        "events": args.events if not args.data else str(args.data),
        "positives": events,
        "protocol": args.protocol,
        **{k: first[k] for k in ("seconds", "peak_rss_mb", "examples_per_second", "val_recall_at_20")},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "variants": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
