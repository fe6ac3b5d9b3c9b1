"""The approximate top-k of large catalogues: an inverted-file index (FAISS ``IndexIVFFlat``, inner
product) built by the training run and stored inside the model version, so that it is registered,
served and rolled back with the embeddings.

Why this one: ``benchmarks/ann.py`` compared FAISS (HNSW and IVF), hnswlib, usearch and ScaNN at
10k–1M tracks × 64 (``docs/benchmarks.md``, "Large catalogues"). IVF-Flat builds in about 2 s at 1M
(HNSW: 80–160 s), keeps recall@10 ≥ 0.99 at a p99 under 1 ms, and installs as a wheel beside
TensorFlow. ScaNN was as fast, but its package loads TensorFlow ops built for TensorFlow 2.20 and
cannot be imported beside the 2.21 that trains the model; hnswlib ships no wheel.

Search: ``nprobe`` of the ``√n`` lists, over-fetching the user's already-heard tracks, which the
caller filters out; the caller re-scores the survivors exactly, so the order and the scores served are
the exact ones of the tracks found.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_FILE = "ann/ivf.faiss"
# Below this many tracks, brute force is exact and fast enough (≈1 ms p99 at 100k × 64 on one core,
# docs/benchmarks.md): no index is built or used. RECSYS_ANN_MIN_ITEMS moves it.
DEFAULT_MIN_ITEMS = 100_000
# √n lists; a search probes this share of them, and at least MIN_PROBES (small catalogues have few,
# large lists, and recall falls fast with few probes: 0.94 with 16 of 100 lists at 10,000 tracks, 0.96 with 20).
PROBE_SHARE = 1 / 40
MIN_PROBES = 24


@dataclass
class AnnIndex:
    """A loaded index over item rows ``1..n`` (row 0, the out-of-vocabulary slot, is not in it)."""

    index: object  # faiss.IndexIVFFlat
    nprobe: int

    @classmethod
    def load(cls, version_dir: Path, entry: dict) -> AnnIndex:
        import faiss

        index = faiss.read_index(str(version_dir / INDEX_FILE))
        return cls(index=index, nprobe=int(entry["nprobe"]))

    def search(self, query: np.ndarray, n: int) -> np.ndarray:
        """The item rows of (about) the ``n`` best inner products, best first; fewer if the probed lists
        hold fewer tracks."""
        import faiss

        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        _, ids = self.index.search(np.asarray(query, dtype=np.float32)[None, :], n, params=params)
        ids = ids[0]
        return ids[ids >= 0].astype(np.int64) + 1


def build(item_embeddings: np.ndarray, version_dir: Path, *, seed: int = 0) -> dict:
    """Build the index of ``item_embeddings[1:]`` into ``version_dir`` and return its manifest entry.

    Uses every core (FAISS's OpenMP) for the training of the coarse quantiser and the assignment.
    """
    import faiss

    items = np.ascontiguousarray(item_embeddings[1:], dtype=np.float32)
    n, dim = items.shape
    lists = max(int(math.sqrt(n)), 1)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    # k-means on a sample: FAISS wants 39–256 points per centroid; 64 is plenty and bounds the time.
    sample = items[np.random.default_rng(seed).choice(n, min(n, 64 * lists), replace=False)]
    index.train(sample)
    index.add(items)
    path = version_dir / INDEX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    entry = {"library": "faiss", "type": "IndexIVFFlat", "metric": "inner_product", "items": n, "lists": lists,
             "nprobe": min(max(math.ceil(lists * PROBE_SHARE), MIN_PROBES), lists),
             "faiss_version": faiss.__version__}  # fmt: skip
    (path.parent / "index.json").write_text(json.dumps(entry, indent=2))
    return entry
