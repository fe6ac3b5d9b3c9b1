"""Two TensorFlow workers on 127.0.0.1 (``MultiWorkerMirroredStrategy``, ``TF_CONFIG`` with two tasks)
train one model on a tiny world: both finish, the chief's version serves, and its validation recall
is that of a one-worker training's."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from recsys_assets.ml.distribute import WorkersFailed, local_cluster, resolve, run_local_cluster, tf_config_tasks
from recsys_assets.ml.metrics import build_eval_set, popularity_scorer, ranking_metrics, recommend
from recsys_assets.ml.split import global_temporal_split, validation_split
from recsys_assets.ml.train_worker import default_result
from recsys_assets.ml.two_tower import TwoTowerParams, train_two_tower
from recsys_core.model_version import ModelArtifact
from recsys_core.scoring import Ranker

pytestmark = pytest.mark.slow

PARAMS = TwoTowerParams(embedding_dim=16, batch_size=256, max_epochs=8, patience=2, min_train_pairs=10, seed=7)


def test_auto_resolves_from_tf_config_and_gpus() -> None:
    two = local_cluster([1, 2])[1]
    assert tf_config_tasks(two) == (2, "worker", 1)
    assert resolve("auto", two, gpus=0) == "multi-worker"
    assert resolve("auto", None, gpus=2) == "mirrored"
    assert resolve("auto", None, gpus=1) == "one-device"
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        resolve("multi-worker", None, gpus=0)
    with pytest.raises(ValueError, match="expected one of"):
        resolve("horovod", None, gpus=0)
    with pytest.raises(ValueError, match="not a cluster specification"):
        tf_config_tasks("{not json")


def _best_validation_recall(history: list[dict]) -> float:
    return max(h["val_recall@20"] for h in history if "val_recall@20" in h)


def test_two_workers_train_one_model_that_serves(tiny_world, tmp_path: Path) -> None:
    _, interactions, tracks = tiny_world
    split = global_temporal_split(interactions)
    split.train.write_parquet(tmp_path / "train.parquet")
    tracks.write_parquet(tmp_path / "tracks.parquet")
    out = tmp_path / "chief" / "version"
    argv = [
        sys.executable,
        "-m",
        "recsys_assets.ml.train_worker",
        "--train",
        str(tmp_path / "train.parquet"),
        "--tracks",
        str(tmp_path / "tracks.parquet"),
        "--params",
        json.dumps(asdict(PARAMS)),
        "--out",
        str(out),
        "--strategy",
        "multi-worker",
        "--bucket-rows",
        str(split.train.height // 3),
    ]  # fmt: skip  (the train side streamed in 4 buckets)
    run_local_cluster(argv, workers=2, log_dir=tmp_path / "logs", timeout=300)  # raises with the logs on failure
    result = json.loads(Path(default_result(str(out))).read_text())
    assert (result["strategy"], result["workers"], result["replicas"]) == ("multi-worker", 2, 2)

    # The chief's version is a servable model version.
    ranker = Ranker(ModelArtifact.load(out), version=1)
    user = str(split.train["user_id"][0])
    assert len(ranker.recommend(user, 10).track_ids) == 10
    eval_set = build_eval_set(split.train, split.holdout)
    multi = ranking_metrics(recommend(ranker.scorer(eval_set.items), eval_set, 20), eval_set, ks=(20,))

    # The same training on one worker, in this process: within tolerance on the validation split.
    val = validation_split(split.train, "global")
    single = train_two_tower(split.train, tracks, (val.train, val.holdout), PARAMS)
    multi_recall, single_recall = _best_validation_recall(result["history"]), _best_validation_recall(single.history)
    # (Measured: 0.346 on two workers, 0.341 on one. The two differ by design: a step there sees both
    # workers' batches, so an epoch has half the steps.)
    assert multi_recall == pytest.approx(single_recall, rel=0.15), (multi_recall, single_recall)
    # ... and on the holdout it ranks better than popularity, as the one-worker model does.
    popularity = ranking_metrics(recommend(popularity_scorer(split.train, eval_set.items), eval_set, 20), eval_set,
                                 ks=(20,))  # fmt: skip
    assert multi.metrics["ndcg@20"] > popularity.metrics["ndcg@20"]


def test_a_failing_worker_ends_the_cluster_and_its_log_is_in_the_error(tmp_path: Path) -> None:
    """Worker 1 fails at once; worker 0 would wait for it forever: it is stopped, and the error says why."""
    script = "import json, os, sys, time; i = json.loads(os.environ['TF_CONFIG'])['task']['index']\n" \
             "print('worker', i, 'here'); sys.exit(3) if i == 1 else time.sleep(600)"  # fmt: skip
    with pytest.raises(WorkersFailed, match=r"(?s)exited with \[-9, 3\].*worker 1 here"):
        run_local_cluster([sys.executable, "-c", script], workers=2, log_dir=tmp_path, timeout=60)
