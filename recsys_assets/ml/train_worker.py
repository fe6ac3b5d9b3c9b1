"""One worker of a distributed training: ``python -m recsys_assets.ml.train_worker`` (plain module: no Dagster).

Every worker of a ``MultiWorkerMirroredStrategy`` cluster runs this with the same inputs and its own
``TF_CONFIG`` (given, or built from ``--peers`` and the pod's ``JOB_COMPLETION_INDEX`` in an indexed
Job): it reads the train side and the track table (local paths or object storage), trains under the
strategy (:mod:`recsys_assets.ml.distribute`), and exports the version directory. The chief's export
goes to ``--out`` and its outcome to ``--result`` (what the training asset records); the other workers
export to a temporary directory that is then deleted, because TensorFlow's saving of a distributed
model may run collective operations that every worker must join.

Exit status: 0 when the training finished; 2 when the data cannot train a model (``TrainingError``,
the reason on stderr); 1 on anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import recsys_assets  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from recsys_assets.ml.buckets import DEFAULT_BUCKET_ROWS

RESULT_FILE = "result.json"


def default_result(out: str) -> str:
    """Where the chief writes the training's outcome when ``--result`` is not given: beside ``out``."""
    return f"{str(out).rstrip('/')}.{RESULT_FILE}"


def _read(path: str):
    import polars as pl

    from recsys_core.settings import storage_path

    with storage_path(path).open("rb") as handle:
        return pl.read_parquet(handle)


def _local(path: str, scratch: Path) -> Path:
    """``path`` on this machine: itself, or an object copied to ``scratch`` in a stream."""
    if "://" not in path:
        return Path(path)
    from recsys_core.settings import storage_path

    local = scratch / "train.parquet"
    with storage_path(path).open("rb") as source, local.open("wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)
    return local


def train_and_export(
    train_side,
    tracks,
    params,
    protocol: str,
    out: Path,
    manifest: dict,
    where,
    ann_min_items: int,
    progress: Callable[[dict], None] | None = None,
    window_days: int = 0,
    bucket_rows: int | None = None,
    scratch: Path | None = None,
) -> dict | None:
    """Train on ``train_side``'s last ``window_days`` days (0: all of it; early stopping on the window's
    validation split) under ``where`` (a :class:`~recsys_assets.ml.distribute.Placement`) and export
    the version with the whole train side's seen lists and popularity: to ``out`` on the chief, to a
    deleted temporary directory on the other workers. The chief gets the training's outcome (what the
    training asset records: epochs, seconds, the session term's validation…); the others ``None``.

    ``train_side``: a table, or its user buckets (:mod:`recsys_assets.ml.buckets`); a table larger than
    ``bucket_rows`` is cut into buckets in memory, so that its examples stream from disk (``scratch``)."""
    import polars as pl

    from recsys_assets.ml.buckets import UserBuckets
    from recsys_assets.ml.export import export_model
    from recsys_assets.ml.ranker import fit_ranking_stage
    from recsys_assets.ml.split import recent
    from recsys_assets.ml.two_tower import train_two_tower

    if isinstance(train_side, pl.DataFrame) and bucket_rows and train_side.height > bucket_rows:
        train_side = UserBuckets.of(train_side, bucket_rows)
    trained = train_two_tower(recent(train_side, window_days), tracks, protocol, params, progress=progress,
                              placement=where, scratch=scratch)  # fmt: skip
    placed = {"strategy": where.name, "workers": where.workers, "replicas": where.replicas}
    manifest = {**manifest, "params": params.__dict__, "best_epoch": trained.best_epoch,
                "train_seconds": trained.train_seconds, "training": placed}  # fmt: skip
    stage, summary = None, None
    if params.ranker and where.chief:
        stage, summary = fit_ranking_stage(trained, recent(train_side, window_days), train_side, tracks, protocol)
    target = Path(out) if where.chief else Path(tempfile.mkdtemp(prefix="recsys-worker-")) / "version"
    try:
        exported = export_model(trained, train_side, manifest, target, ann_min_items=ann_min_items,
                                ranking_stage=stage)  # fmt: skip
    finally:
        if not where.chief:
            shutil.rmtree(target.parent, ignore_errors=True)
    if not where.chief:
        return None
    return {
        **placed,
        "best_epoch": trained.best_epoch,
        "train_seconds": trained.train_seconds,
        "examples_per_second": trained.examples_per_second,
        "pairs": trained.pairs,
        "history": trained.history,
        "session_weight": trained.session_weight,
        "session_scores": trained.session_scores,
        "popularity_prior": trained.popularity_prior,
        "items": len(trained.vocab.items) - 1,
        "ann": exported.manifest.get("ann"),
        "ranker": summary,
    }


def run(train: str, tracks: str, params_json: str, protocol: str, out: str, strategy: str = "auto",
        ann_min_items: int | None = None, manifest_json: str = "{}", result: str | None = None,
        window_days: int = 0, bucket_rows: int = DEFAULT_BUCKET_ROWS) -> dict | None:  # fmt: skip
    """One worker's part: cut the train side into user buckets with polars' streaming engine (it is never
    read whole), :func:`train_and_export`; the chief writes the version to ``out`` and the outcome to
    ``result`` (default: ``<out>.result.json``), each a local path or in object storage."""
    from recsys_assets.data.store import copy_tree, write_json_atomic
    from recsys_assets.ml.buckets import UserBuckets
    from recsys_assets.ml.distribute import placement
    from recsys_assets.ml.two_tower import TwoTowerParams
    from recsys_core.ann import DEFAULT_MIN_ITEMS
    from recsys_core.settings import storage_path

    where = placement(strategy)  # first: MultiWorkerMirroredStrategy before any other TensorFlow operation
    params = TwoTowerParams(**json.loads(params_json))
    track_table = _read(tracks).select("track_id", "artist_id", "genre")
    started = time.perf_counter()
    target = storage_path(out)
    remote = "://" in out
    with tempfile.TemporaryDirectory(prefix="recsys-chief-") as scratch:
        work = Path(scratch)
        buckets = UserBuckets.scan(_local(train, work), work / "buckets", bucket_rows)
        local = work / "version" if remote else Path(out)
        outcome = train_and_export(
            buckets, track_table, params, protocol, local, json.loads(manifest_json), where,
            ann_min_items or DEFAULT_MIN_ITEMS, window_days=window_days, scratch=work,
        )  # fmt: skip
        if outcome is not None and remote:
            copy_tree(local, target)
    if outcome is not None:
        outcome["seconds"] = time.perf_counter() - started
        write_json_atomic(outcome, storage_path(result or default_result(out)))
    return outcome


def main(argv: list[str] | None = None) -> int:
    from recsys_assets.ml.two_tower import TrainingError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="the train side (Parquet: user_id, track_id, played_at, …)")
    parser.add_argument("--tracks", required=True, help="the track_features table (Parquet)")
    parser.add_argument("--params", default="{}", help="TwoTowerParams as JSON (defaults for what is left out)")
    parser.add_argument("--protocol", default="global", help="the holdout protocol the validation split follows")
    parser.add_argument("--out", required=True, help="the chief's version directory (must not exist; or s3://…)")
    parser.add_argument("--strategy", default="auto", help="auto, one-device, mirrored or multi-worker")
    parser.add_argument("--ann-min-items", type=int, default=None)
    parser.add_argument("--manifest", default="{}", help="JSON recorded in the version's manifest (lineage…)")
    parser.add_argument("--result", default=None, help="the chief's outcome (default: <out>.result.json)")
    parser.add_argument("--window-days", type=int, default=0, help="train on the last N days (0: all)")
    parser.add_argument("--bucket-rows", type=int, default=DEFAULT_BUCKET_ROWS,
                        help="interactions per user bucket: what the training holds in memory at once")  # fmt: skip
    parser.add_argument("--peers", help="in a pod of an indexed Job: the workers' address pattern, {index} in it")
    parser.add_argument("--workers", type=int, default=1, help="with --peers: how many workers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.peers:  # deploy/k8s/training.yaml: the pod's place from its completion index
        from recsys_assets.ml.distribute import indexed_tf_config

        os.environ["TF_CONFIG"] = indexed_tf_config(args.peers, args.workers, int(os.environ["JOB_COMPLETION_INDEX"]))
    try:
        run(args.train, args.tracks, args.params, args.protocol, args.out, strategy=args.strategy,
            ann_min_items=args.ann_min_items, manifest_json=args.manifest, result=args.result,
            window_days=args.window_days, bucket_rows=args.bucket_rows)  # fmt: skip
    except TrainingError as exc:
        print(f"cannot train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
