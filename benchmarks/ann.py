"""Benchmark: approximate nearest-neighbour libraries for the serving top-k, against exact search.

    python benchmarks/ann.py --items 1000000 --dim 64 [--libs faiss,hnswlib,usearch,scann]

Each library indexes the same item embeddings for maximum inner product (the two-tower's score) and
answers the same single-user queries, one at a time on one thread, as ``/recommend`` does. Already
heard tracks (30 per user) are excluded by over-fetch plus filter: each library is asked for
``k + heard`` neighbours, the heard ones are dropped, the first ``k`` kept. Recall@10 is measured
against the exact top 10 (numpy, heard tracks excluded), latency is per query (p50, p99), the build
uses every core, and the size is the index serialised to disk.

The embeddings are clustered like trained ones (a mixture of 1,024 Gaussian centres, users drawn from
the same mixture); independent Gaussian vectors would have no neighbourhood structure for any index
to exploit and are not what a trained model produces.

The libraries are not in the product's lock: install them beside it to run this script
(``pip install faiss-cpu==1.15.1 hnswlib==0.8.0 usearch==2.26.6 scann==1.4.2``); the product ships
the one chosen (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 10
HEARD = 30


def clustered(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray) -> np.ndarray:
    which = rng.integers(0, len(centres), n)
    out = centres[which] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
    return out.astype(np.float32)


def exact_top(items: np.ndarray, queries: np.ndarray, heard: np.ndarray, k: int = K) -> tuple[np.ndarray, list]:
    """The exact top-k per query (heard excluded), and the single-query latencies of numpy brute force."""
    tops, seconds = [], []
    items_t = np.ascontiguousarray(items.T)
    for q, h in zip(queries, heard, strict=True):
        started = time.perf_counter()
        scores = q @ items_t
        scores[h] = -np.inf
        kth = np.partition(scores, -k)[-k]
        cand = np.flatnonzero(scores >= kth)
        top = cand[np.argsort(-scores[cand], kind="stable")[:k]]
        seconds.append(time.perf_counter() - started)
        tops.append(top)
    return np.array(tops), seconds


def filtered(ids, heard_row: np.ndarray, k: int = K) -> np.ndarray:
    ids = np.asarray(ids).ravel()
    ids = ids[ids >= 0]
    return ids[~np.isin(ids, heard_row)][:k]


def measure(search, queries, heard, exact) -> dict:
    for q, h in zip(queries[:50], heard[:50], strict=True):  # warm-up
        filtered(search(q), h)
    seconds, hits = [], 0
    for q, h, truth in zip(queries, heard, exact, strict=True):
        started = time.perf_counter()
        got = filtered(search(q), h)
        seconds.append(time.perf_counter() - started)
        hits += len(np.intersect1d(got, truth))
    ms = np.array(seconds) * 1000
    return {"recall_at_10": hits / (K * len(queries)), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}  # fmt: skip


def size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
    return path.stat().st_size / 1e6


def bench_faiss(items, queries, heard, exact, tmp: Path, threads: int) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexHNSWFlat(items.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 128
    started = time.perf_counter()
    index.add(items)
    build = time.perf_counter() - started
    faiss.write_index(index, str(tmp / "faiss.index"))
    faiss.omp_set_num_threads(1)
    rows = []
    for ef in (64, 128, 256):
        index.hnsw.efSearch = ef
        fetch = K + HEARD
        row = measure(lambda q, f=fetch: index.search(q[None, :], f)[1][0], queries, heard, exact)
        rows.append({"library": "faiss HNSW (M=32, efC=128)", "search": f"efSearch={ef}", "build_s": build,
                     "size_mb": size_mb(tmp / "faiss.index"), **row})  # fmt: skip
    return rows


def bench_faiss_ivf(items, queries, heard, exact, tmp: Path, threads: int) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(threads)
    nlist = int(np.sqrt(len(items)))
    quantizer = faiss.IndexFlatIP(items.shape[1])
    index = faiss.IndexIVFFlat(quantizer, items.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    sample = items[np.random.default_rng(1).choice(len(items), min(len(items), 64 * nlist), replace=False)]
    index.train(sample)
    index.add(items)
    build = time.perf_counter() - started
    faiss.write_index(index, str(tmp / "ivf.index"))
    faiss.omp_set_num_threads(1)
    rows = []
    product = min(max(-(-nlist // 40), 24), nlist)  # recsys_core.ann's choice
    for nprobe in sorted({max(nlist // 40, 1), product, int(2 * np.sqrt(nlist)), max(nlist // 10, 1)}):
        index.nprobe = nprobe
        row = measure(lambda q: index.search(q[None, :], K + HEARD)[1][0], queries, heard, exact)
        rows.append({"library": f"faiss IVF-Flat ({nlist} lists)", "search": f"nprobe={nprobe}", "build_s": build,
                     "size_mb": size_mb(tmp / "ivf.index"), **row})  # fmt: skip
    return rows


def bench_hnswlib(items, queries, heard, exact, tmp: Path, threads: int) -> list[dict]:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=items.shape[1])
    index.init_index(max_elements=len(items), ef_construction=128, M=16)
    index.set_num_threads(threads)
    started = time.perf_counter()
    index.add_items(items, np.arange(len(items)))
    build = time.perf_counter() - started
    index.save_index(str(tmp / "hnswlib.bin"))
    index.set_num_threads(1)
    rows = []
    for ef in (64, 128, 256):
        index.set_ef(ef)
        row = measure(lambda q: index.knn_query(q, k=K + HEARD)[0][0], queries, heard, exact)
        rows.append({"library": "hnswlib (M=16, efC=128)", "search": f"ef={ef}", "build_s": build,
                     "size_mb": size_mb(tmp / "hnswlib.bin"), **row})  # fmt: skip
    return rows


def bench_usearch(items, queries, heard, exact, tmp: Path, threads: int) -> list[dict]:
    from usearch.index import Index

    index = Index(ndim=items.shape[1], metric="ip", dtype="f32", connectivity=16, expansion_add=128)
    started = time.perf_counter()
    index.add(np.arange(len(items)), items, threads=threads)
    build = time.perf_counter() - started
    index.save(str(tmp / "usearch.bin"))
    rows = []
    for ef in (64, 128, 256):
        index.expansion_search = ef
        row = measure(lambda q: index.search(q, K + HEARD, threads=1).keys, queries, heard, exact)
        rows.append({"library": "usearch HNSW (M=16, efC=128, f32)", "search": f"expansion={ef}", "build_s": build,
                     "size_mb": size_mb(tmp / "usearch.bin"), **row})  # fmt: skip
    return rows


def bench_scann(items, queries, heard, exact, tmp: Path, threads: int) -> list[dict]:
    import scann

    leaves = int(np.sqrt(len(items)))
    started = time.perf_counter()
    searcher = (
        scann.scann_ops_pybind.builder(items, K + HEARD, "dot_product")
        .tree(num_leaves=leaves, num_leaves_to_search=leaves // 20, training_sample_size=min(len(items), 250_000))
        .score_ah(2, anisotropic_quantization_threshold=0.2)
        .reorder(200)
        .set_n_training_threads(threads)
        .build()
    )
    build = time.perf_counter() - started
    (tmp / "scann").mkdir()
    searcher.serialize(str(tmp / "scann"))
    rows = []
    for fraction in (40, 20, 10):
        to_search = max(leaves // fraction, 1)
        row = measure(lambda q, n=to_search: searcher.search(q, leaves_to_search=n)[0], queries, heard, exact)
        rows.append({"library": f"ScaNN (tree {leaves} leaves, AH, reorder 200)", "search": f"leaves={to_search}",
                     "build_s": build, "size_mb": size_mb(tmp / "scann"), **row})  # fmt: skip
    return rows


BENCHES = {
    "faiss": bench_faiss,
    "faiss-ivf": bench_faiss_ivf,
    "hnswlib": bench_hnswlib,
    "usearch": bench_usearch,
    "scann": bench_scann,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--libs", default=",".join(BENCHES))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1024, args.dim), dtype=np.float32)
    items = clustered(rng, args.items, args.dim, centres)
    queries = clustered(rng, args.queries, args.dim, centres)
    heard = np.array([rng.choice(args.items, HEARD, replace=False) for _ in range(args.queries)])
    exact, seconds = exact_top(items, queries, heard)
    ms = np.array(seconds) * 1000
    exact_row = {"library": "exact (numpy brute force)", "search": "-", "build_s": 0.0,
                 "size_mb": items.nbytes / 1e6, "recall_at_10": 1.0,
                 "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}  # fmt: skip
    print(json.dumps(exact_row), file=sys.stderr)
    rows = [exact_row]
    for name in args.libs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            for row in BENCHES[name](items, queries, heard, exact, Path(tmp), args.threads):
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(json.dumps({"machine": machine, "items": args.items, "dim": args.dim, "queries": args.queries,
                      "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
