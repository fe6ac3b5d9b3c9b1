"""Benchmark: the numpy query tower's cost per request (``recsys_core.query_tower``), the price of a
user embedding computed from the user's history at request time instead of read from the version.

    .venv/bin/python benchmarks/query_tower.py [--dim 64 --history 50 --decay 0.9 --session 1 --users 100000]

Random weights cost exactly what trained ones do. Median and p99 of single calls (one request: one
user: the tower, then the session term over the last five plays unless ``--session 0``), five rounds
of 20,000 calls each; the last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys_core.query_tower import QueryTower, unit_directions
from recsys_core.scoring import single_threaded_blas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=27)
    parser.add_argument("--decay", type=float, default=0.9, help="history_decay (1: the plain mean; 0.9 the default)")
    parser.add_argument("--session", type=float, default=1.0, help="session_weight (0: no session term)")
    args = parser.parse_args()
    single_threaded_blas()  # as the service runs it
    rng = np.random.default_rng(0)
    tower = QueryTower(
        user_embedding=rng.standard_normal((args.users, args.dim), dtype=np.float32),
        history_items=rng.standard_normal((args.items, args.dim), dtype=np.float32),
        history_kernel=rng.standard_normal((args.dim, args.dim), dtype=np.float32),
        features_kernel=rng.standard_normal((args.features, args.dim), dtype=np.float32),
        history_decay=args.decay,
        session_weight=args.session,
        session_length=5,
    )
    directions = unit_directions(rng.standard_normal((args.items, args.dim + 1), dtype=np.float32))
    calls = 20_000
    users = rng.integers(1, args.users, calls)
    histories = rng.integers(1, args.items, (calls, args.history)).astype(np.int32)
    features = rng.random((calls, args.features), dtype=np.float32)
    rounds, samples = [], []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            t0 = time.perf_counter_ns()
            query = tower.embed(users[i], features[i], histories[i])
            if args.session:
                tower.with_session(query, histories[i], directions)
            samples.append(time.perf_counter_ns() - t0)
        rounds.append((time.perf_counter() - start) / calls * 1000)
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "dim": args.dim, "history": args.history, "decay": args.decay, "session_weight": args.session,
        "median_of_rounds_ms": float(np.median(rounds)),
        "p50_ms": float(np.percentile(samples, 50)) / 1e6, "p99_ms": float(np.percentile(samples, 99)) / 1e6,
    }  # fmt: skip
    print(f"query tower, d={args.dim}, N={args.history}: {summary['median_of_rounds_ms']:.4f} ms per call "
          f"(p50 {summary['p50_ms']:.4f}, p99 {summary['p99_ms']:.4f})", file=sys.stderr)  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
