"""Benchmark: ``/recommend`` of the BentoML service against a raw Starlette app, same embeddings, same
top-k code, one worker each, loopback, in the same run.

    apt-get install -y wrk
    .venv/bin/python benchmarks/serving.py [--items 10000 --dim 64 --users 20000 --duration 20]

1. A model version with random embeddings (``--items`` × ``--dim``, ``--users`` users, 30 heard tracks
   each) is written in the export format and registered as ``champion`` in a throw-away MLflow store
   (the service reads it from the registry, as in production). Random embeddings cost exactly what
   trained ones cost.
2. Scoring plus top-k alone (``recsys_core.scoring.Ranker.top_rows``), in process: best and median of five
   rounds of 4,000 calls.
3. For each server (``bentoml serve serving.service:Recommender``, with its canary routing, metrics and
   impressions in its write-ahead log, landed by its lander process; and ``benchmarks/raw_app.py``
   under uvicorn): wrk at full
   speed (32 connections, 2 threads) for the peak throughput, then wrk paced (exponential gaps per
   connection, ``benchmarks/wrk/recommend.lua``) at 80% of that server's peak for p50/p99.

``--route feedback`` measures ``POST /feedback`` instead, twice: with the write-ahead log (every
acknowledged event ``fsync``-ed before the 202, calls that arrive together sharing one sync) and
without it (``RECSYS_WAREHOUSE_URI=none``: the service keeps nothing), which is the log's cost.

The service runs one worker here (``RECSYS_SERVING_WORKERS=1``), as the raw app does.

``--steps`` measures the service once per lever of BentoML's request path, cumulatively, in the same
run as the raw app: BentoML's defaults (its metrics middleware, OpenTelemetry spans on every route),
then its metrics off (``serving/metrics.py`` instead), then the hot routes out of tracing, then
``/recommend`` answered by ``serving/fastpath.py`` (the shipped configuration).

wrk runs on the same 2 cores as the server, so absolute numbers are lower than on separate machines;
the ratio between the two servers is the comparison that matters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# This file is named serving.py: take its directory off the path so `serving` is the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(REPO))

import recsys_assets  # noqa: E402, F401  (environment first)

MACHINE = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_version(
    directory: Path, items: int, dim: int, users: int, seen: int = 30, seed: int = 0, ann_min_items: int = 100_000
) -> Path:
    """A model version directory in the export format, with random embeddings."""
    from recsys_core.model_version import FORMAT_VERSION

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    user_ids = ["[OOV]", *[f"u{i:06d}" for i in range(1, users + 1)]]
    item_ids = ["[OOV]", *[f"t{i:07d}" for i in range(1, items + 1)]]
    pl.DataFrame({"user_id": user_ids}).write_parquet(directory / "users.parquet")
    popularity = rng.pareto(1.2, items + 1).astype(np.float32)
    popularity[0] = 0
    pl.DataFrame(
        {
            "track_id": item_ids,
            "artist_id": [f"a{i % 1000}" for i in range(items + 1)],
            "genre": ["g"] * (items + 1),
            "popularity": popularity,
        }  # fmt: skip
    ).write_parquet(directory / "items.parquet")
    # Clustered like trained embeddings (a mixture of 1,024 centres): brute force costs the same on any
    # values, an inverted-file index's lists are as balanced as on a trained model's.
    centres = rng.standard_normal((1024, dim)).astype(np.float32)
    for name, n in (("user_embeddings.npy", users + 1), ("item_embeddings.npy", items + 1)):
        vectors = centres[rng.integers(0, 1024, n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
        np.save(directory / name, vectors.astype(np.float32))
    indices = np.sort(rng.integers(1, items + 1, size=(users + 1, seen)), axis=1).ravel().astype(np.int32)
    indptr = np.arange(0, (users + 2) * seen, seen, dtype=np.int64)
    np.savez(directory / "seen.npz", indptr=indptr, indices=indices)
    manifest = {"format_version": FORMAT_VERSION, "data": {}}
    if items >= ann_min_items:  # as the training run's export does
        from recsys_core import ann

        started = time.perf_counter()
        manifest["ann"] = ann.build(np.load(directory / "item_embeddings.npy"), directory)
        print(f"ANN index: {manifest['ann']} built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def add_ranking_stage(directory: Path, items: int, seed: int = 0) -> None:
    """A ranking stage of random weights and tables, the trained one's sizes (``NEIGHBOURS`` cosine and
    ``NEIGHBOURS`` EASE neighbours a track, every track with both: the worst case; a 32-unit hidden
    layer, one network per fold of the cross-fit): reranking costs the same on any values."""
    from recsys_assets.ml.ranker import FOLDS, HIDDEN
    from recsys_core.ranking import FEATURES, NEIGHBOURS, DcnRanker, RankerTables, save

    rng = np.random.default_rng(seed)
    f = len(FEATURES)
    net = DcnRanker(
        mean=np.zeros(f, np.float32), std=np.ones(f, np.float32),
        cross_kernel=rng.normal(size=(FOLDS, f, f)).astype(np.float32), cross_bias=np.zeros((FOLDS, f), np.float32),
        hidden_kernel=rng.normal(size=(FOLDS, f, HIDDEN)).astype(np.float32),
        hidden_bias=np.zeros((FOLDS, HIDDEN), np.float32),
        out_kernel=rng.normal(size=(FOLDS, HIDDEN, 1)).astype(np.float32), out_bias=np.zeros((FOLDS, 1), np.float32),
    )  # fmt: skip
    tables = RankerTables(
        popularity=rng.random(items + 1).astype(np.float32),
        recent_popularity=rng.random(items + 1).astype(np.float32),
        neighbours=rng.integers(1, items + 1, size=(items + 1, NEIGHBOURS)),
        similarity=rng.random((items + 1, NEIGHBOURS)).astype(np.float32), artist=rng.integers(0, 1000, items + 1),
        ease_neighbours=rng.integers(1, items + 1, size=(items + 1, NEIGHBOURS)),
        ease_weights=rng.random((items + 1, NEIGHBOURS)).astype(np.float32),
    )  # fmt: skip
    save(directory, net, tables)


def scoring_microbenchmark(
    model_dir: Path, users: int, calls: int = 4_000, rounds: int = 5, ann_min_items: int = 100_000
) -> dict:
    """Per-call time of ``Ranker.top_rows`` for random known users: the best and the median of
    ``rounds`` rounds of ``calls`` calls (the best is the code's cost, the median shows the noise)."""
    from recsys_core.scoring import Ranker, single_threaded_blas

    single_threaded_blas()  # as the service does at start
    ranker = Ranker.load(model_dir, 1, ann_min_items=ann_min_items)
    ids = [f"u{i:06d}" for i in np.random.default_rng(1).integers(1, users + 1, calls)]
    for user in ids[:1000]:
        ranker.top_rows(user, 10)
    per_call, each = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for user in ids:
            one = time.perf_counter()
            ranker.top_rows(user, 10)
            each.append(time.perf_counter() - one)
        per_call.append((time.perf_counter() - start) / calls * 1000)
    best, median = min(per_call), float(np.median(per_call))
    ms = np.array(each) * 1000
    return {"calls": calls, "rounds": rounds, "ms_per_call": best, "median_ms_per_call": median,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "path": "ann" if ranker.ann is not None else "exact"}  # fmt: skip


ROUTE = {"name": "recommend"}  # set from --route


def wrk(url: str, duration: int, users: int, delay_ms: float = 0.0, connections: int = 32) -> dict:
    env = {**os.environ, "BENCH_USERS": str(users), "BENCH_DELAY_MS": str(delay_ms), "BENCH_ROUTE": ROUTE["name"]}
    result = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
         "-s", str(HERE / "wrk" / "recommend.lua"), url],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    line = next(x for x in result.stdout.splitlines() if x.startswith("JSON "))
    out = json.loads(line[5:])
    out["rps"] = out["requests"] / out["seconds"]
    return out


def measure(name: str, url: str, duration: int, users: int) -> dict:
    wrk(url, 5, users)  # warm-up
    peak = wrk(url, duration, users)
    connections = 32
    target = 0.8 * peak["rps"]
    # Calibrate the per-connection pause so that the paced run holds 80% of the peak rate: bisection
    # (the rate is not linear in the pause: the latency falls as the load does).
    delay_ms, low, high = max(connections / target * 1000 - peak["p50_ms"], 0.1), 0.0, None
    for _ in range(8):
        probe = wrk(url, 4, users, delay_ms=delay_ms, connections=connections)
        if abs(probe["rps"] - target) / target < 0.04:
            break
        if probe["rps"] > target:
            low = delay_ms
            delay_ms = delay_ms * 2 if high is None else (delay_ms + high) / 2
        else:
            high = delay_ms
            delay_ms = (low + delay_ms) / 2
    paced = wrk(url, duration, users, delay_ms=delay_ms, connections=connections)
    print(f"{name}: peak {peak['rps']:,.0f} req/s; at {paced['rps']:,.0f} req/s (target 80%: {0.8 * peak['rps']:,.0f}) "
          f"p50 {paced['p50_ms']:.2f} ms, p99 {paced['p99_ms']:.2f} ms", file=sys.stderr)  # fmt: skip
    return {"peak": peak, "at_80_percent": paced}


def backlog(url: str) -> float | None:
    """``recsys_feedback_backlog_events`` from the service's /metrics (None: the service has none)."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("recsys_feedback_backlog_events "):
            return float(line.split()[1])
    return None


def landing(url: str, timeout: float = 300) -> dict:
    """The impressions not landed yet when the load stops, and how long the lander takes to land
    them (the gauge is refreshed every flush)."""
    start, left = time.monotonic(), backlog(url)
    while left and time.monotonic() - start < timeout:
        time.sleep(0.5)
        now = backlog(url)
        if now == 0:
            break
    caught_up = time.monotonic() - start if not left or now == 0 else None
    print(f"  landing: backlog {left} when the load stopped, landed {caught_up} s later", file=sys.stderr)
    return {"backlog_at_end": left, "caught_up_seconds": caught_up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--scoring-only", action="store_true", help="only the in-process scoring benchmark")
    parser.add_argument("--no-feedback", action="store_true", help="the service writes no impressions")
    parser.add_argument("--bento-env", nargs="*", default=[], help="KEY=VALUE for the servers' environment")
    parser.add_argument("--steps", action="store_true", help="one service run per lever (see the docstring)")
    parser.add_argument("--ann-min-items", type=int, default=None, help="RECSYS_ANN_MIN_ITEMS (default: the product's)")
    parser.add_argument("--route", choices=("recommend", "feedback"), default="recommend")
    parser.add_argument("--ranker", action="store_true", help="the version carries a ranking stage (top 100 reranked)")
    args = parser.parse_args()
    ROUTE["name"] = args.route
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")

    from recsys_cli.stack.services import bento_spec
    from recsys_cli.stack.supervisor import ServiceSpec, Stack, free_port
    from recsys_core.control import ControlPlane
    from recsys_core.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from recsys_core.ann import DEFAULT_MIN_ITEMS

        ann_min_items = args.ann_min_items or DEFAULT_MIN_ITEMS
        model_dir = write_version(tmp / "version", args.items, args.dim, args.users, ann_min_items=ann_min_items)
        if args.ranker:
            add_ranking_stage(model_dir, args.items)
        micro = scoring_microbenchmark(model_dir, args.users, ann_min_items=ann_min_items)
        print(
            f"scoring + top-k ({micro['path']}): {micro['ms_per_call']:.4f} ms per request "
            f"(median of the rounds {micro['median_ms_per_call']:.4f}; p50 {micro['p50_ms']:.4f}, "
            f"p99 {micro['p99_ms']:.4f})",
            file=sys.stderr,
        )
        if args.scoring_only:
            print(json.dumps({"machine": MACHINE, "items": args.items, "dim": args.dim, "ranker": args.ranker,
                              "scoring": micro}))  # fmt: skip
            return

        settings = load_settings({"RECSYS_HOME": str(tmp / "home"), "RECSYS_BENTO_PORT": str(free_port())})
        registry = ControlPlane(settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir, tmp / "cache")
        run_id = registry.start_run("serving-benchmark", tags={})
        uri = registry.log_model(run_id, model_dir)
        registry.end_run(run_id)
        registry.register(model_uri=uri, run_id=run_id, lineage={}, reason="benchmark", by="benchmarks/serving.py")

        env = {**settings.child_env(), "RECSYS_ANN_MIN_ITEMS": str(ann_min_items), "RECSYS_SERVING_WORKERS": "1"}
        if args.no_feedback:
            env["RECSYS_WAREHOUSE_URI"] = "none"
        extra = dict(kv.split("=", 1) for kv in args.bento_env)
        raw_port = free_port()
        raw = ServiceSpec(
            name="raw-starlette",
            argv=[
                str(Path(sys.executable).parent / "uvicorn"),
                "benchmarks.raw_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(raw_port),
                "--workers",
                "1",
                "--no-access-log",
                "--log-level",
                "warning",
            ],  # fmt: skip
            port=raw_port,
            ready=lambda: (
                subprocess.run(
                    [
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-X",
                        "POST",
                        "-d",
                        '{"user_id":"u000001"}',
                        f"http://127.0.0.1:{raw_port}/recommend",
                    ]
                ).returncode
                == 0
            ),  # fmt: skip
            env={"RAW_MODEL_DIR": str(model_dir)},
        )
        levers = {"RECSYS_BENTOML_METRICS": "0", "RECSYS_TRACE_REQUESTS": "0"}
        runs = [("bentoml", bento_spec(settings), settings.url("bento"), {})]
        if args.steps:
            runs = [
                ("bentoml_defaults", bento_spec(settings), settings.url("bento"),
                 {"RECSYS_BENTOML_METRICS": "1", "RECSYS_TRACE_REQUESTS": "1", "RECSYS_FAST_PATH": "0"}),
                ("bentoml_own_metrics", bento_spec(settings), settings.url("bento"),
                 {"RECSYS_TRACE_REQUESTS": "1", "RECSYS_FAST_PATH": "0"}),
                ("bentoml_untraced", bento_spec(settings), settings.url("bento"), {"RECSYS_FAST_PATH": "0"}),
                ("bentoml", bento_spec(settings), settings.url("bento"), {}),
            ]  # fmt: skip
        if args.route == "feedback":
            runs = [
                ("feedback_with_log", bento_spec(settings), settings.url("bento"), {}),
                ("feedback_without_log", bento_spec(settings), settings.url("bento"), {"RECSYS_WAREHOUSE_URI": "none"}),
            ]
        else:
            runs.append(("raw_starlette", raw, f"http://127.0.0.1:{raw_port}", {}))
        results = {}
        for name, spec, url, overrides in runs:
            stack = Stack(tmp / f"run-{name}", env={**env, **levers, **overrides, **extra}, cwd=REPO)
            stack.start([spec], timeout=180)
            try:
                results[name] = measure(name, url, args.duration, args.users)
                if name.startswith("bentoml") and not args.no_feedback:
                    results[name]["landing"] = landing(url)
            finally:
                stack.stop()
    baseline = "feedback_without_log" if args.route == "feedback" else "raw_starlette"
    raw_peak = results[baseline]["peak"]["rps"]
    summary = {
        "machine": MACHINE,
        "items": args.items,
        "dim": args.dim,
        "scoring": micro,
        **results,
        "throughput_ratio": {name: r["peak"]["rps"] / raw_peak for name, r in results.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
