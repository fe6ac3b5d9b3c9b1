"""Which ``tf.distribute`` strategy trains the two-tower model (plain module: no Dagster).

- ``one-device``: TensorFlow's default strategy (one CPU or one GPU); what a single pod runs.
- ``mirrored``: ``MirroredStrategy`` over the GPUs of one pod.
- ``multi-worker``: ``MultiWorkerMirroredStrategy`` across processes or pods, each one told the cluster
  and its own place in it by ``TF_CONFIG`` (TensorFlow's convention, read by its
  ``TFConfigClusterResolver``); worker 0 (or the ``chief`` task, where there is one) exports the model.
- ``auto`` (the default): ``multi-worker`` when ``TF_CONFIG`` names more than one task, ``mirrored``
  with more than one GPU, else ``one-device``.

The loss under a strategy (``recsys_assets.ml.two_tower``): each replica takes ``batch_size`` pairs
and computes its softmax over its own batch. The in-batch negatives, the logQ correction (each item's
share of all the training pairs: a replica's batch is a uniform sample of them as much as one
worker's batch is) and the history mask (the replica's candidates against its own examples'
histories) are then exactly those of one-device training; the gradients are summed across replicas
(the loss is a sum), so a step sees ``replicas × batch_size`` pairs. A global softmax would gather
every replica's candidate embeddings at every step: more negatives, but the negatives per example
would change with the number of workers, and so would the model's calibration and its tuned
temperature.

``MultiWorkerMirroredStrategy`` must be created before TensorFlow runs any operation in the
process, so a process trains under one strategy only: the worker entry point
(``recsys_assets.ml.train_worker``) is a fresh process per training.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from recsys_core.net import free_port
from recsys_core.settings import TRAIN_STRATEGIES as STRATEGIES  # one list: RECSYS_TRAIN_STRATEGY's


@dataclass(frozen=True)
class Placement:
    """Where this process stands in a training: the strategy and whether it writes the results."""

    strategy: object  # tf.distribute.Strategy
    name: str
    workers: int
    chief: bool

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)


def tf_config_tasks(raw: str | None) -> tuple[int, str | None, int]:
    """(number of tasks in the cluster, this task's type, its index) from a ``TF_CONFIG`` value."""
    if not raw:
        return 0, None, 0
    try:
        config = json.loads(raw)
        cluster = config.get("cluster", {})
        task = config.get("task", {})
        return sum(len(hosts) for hosts in cluster.values()), task.get("type"), int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"TF_CONFIG is not a cluster specification: {exc}") from None


def resolve(name: str, tf_config: str | None, gpus: int) -> str:
    """The strategy ``name`` stands for (``auto`` resolved) with this ``TF_CONFIG`` and GPU count."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
    tasks = tf_config_tasks(tf_config)[0]
    if name == "auto":
        return "multi-worker" if tasks > 1 else "mirrored" if gpus > 1 else "one-device"
    if name == "multi-worker" and tasks < 1:
        raise ValueError("the multi-worker strategy needs TF_CONFIG: the cluster's tasks and this one's place")
    return name


def placement(name: str = "auto") -> Placement:
    """The strategy for this process, created now (before any other TensorFlow operation)."""
    import tensorflow as tf

    raw = os.environ.get("TF_CONFIG")
    resolved = resolve(name, raw, len(tf.config.list_physical_devices("GPU")))
    if resolved == "multi-worker":
        tasks, task_type, index = tf_config_tasks(raw)
        has_chief = "chief" in json.loads(raw).get("cluster", {})
        chief = task_type == "chief" or (task_type == "worker" and index == 0 and not has_chief)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return Placement(strategy, resolved, tasks, chief)
    if resolved == "mirrored":
        return Placement(tf.distribute.MirroredStrategy(), resolved, 1, True)
    return Placement(tf.distribute.get_strategy(), resolved, 1, True)


def tf_config(hosts: list[str], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` of a cluster of ``hosts`` (``host:port``; worker 0 is the chief)."""
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})


def local_cluster(ports: list[int], host: str = "127.0.0.1") -> list[str]:
    """One ``TF_CONFIG`` per worker of a cluster on ``host`` (worker 0 is the chief)."""
    hosts = [f"{host}:{port}" for port in ports]
    return [tf_config(hosts, i) for i in range(len(hosts))]


def indexed_tf_config(peers: str, workers: int, index: int) -> str:
    """The ``TF_CONFIG`` of the pod of completion index ``index`` of an indexed Job: ``peers`` is the
    pattern of every worker's address, ``{index}`` standing for its index
    (``job-{index}.service:2222``: a pod of an indexed Job is ``<job>-<index>`` in its subdomain)."""
    if not 0 <= index < workers:
        raise ValueError(f"completion index {index} outside 0..{workers - 1}")
    return tf_config([peers.format(index=i) for i in range(workers)], index)


class WorkersFailed(RuntimeError):
    """A worker of a local cluster exited with an error, or the cluster ran past its time."""


def run_local_cluster(
    argv: list[str], workers: int, log_dir: Path, timeout: float, env: dict[str, str] | None = None
) -> None:
    """Run ``argv`` as ``workers`` processes on 127.0.0.1, each with its ``TF_CONFIG`` (free ports; worker 0
    is the chief), until all have exited. Each one's output goes to ``log_dir/worker-<i>.log``.

    A worker that fails ends the others (they would wait for it at the next collective operation until
    their own timeout); so does ``timeout``. Stopped by PID (each worker leads its own process group).

    Raises:
        WorkersFailed: with each worker's exit status and the end of its log.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    configs = local_cluster([free_port() for _ in range(workers)])
    base = dict(os.environ if env is None else env)
    procs: list[subprocess.Popen] = []
    logs = [log_dir / f"worker-{i}.log" for i in range(workers)]
    try:
        for config, log in zip(configs, logs, strict=True):
            with log.open("w") as out:
                procs.append(subprocess.Popen(argv, env={**base, "TF_CONFIG": config}, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    codes = [p.returncode for p in procs]
    if any(c != 0 for c in codes):
        tails = "\n".join(f"--- worker {i} (exit {c}):\n{log.read_text()[-2000:]}"
                          for i, (c, log) in enumerate(zip(codes, logs, strict=True)))  # fmt: skip
        raise WorkersFailed(f"the training's {workers} workers exited with {codes} (negative: killed)\n{tails}")


WORKER_PORT = 2222  # the port of each worker pod (deploy/k8s/training.yaml)


def render_kubernetes_job(documents: list[dict], name: str, workers: int, args: list[str]) -> list[dict]:
    """The headless Service and the indexed Job of one training, from the templates of
    ``deploy/k8s/training.yaml`` (``documents``): named ``name``, ``workers`` pods, each running the worker
    with ``args`` and finding its peers at ``<name>-<index>.<name>``."""
    service = copy.deepcopy(next(d for d in documents if d["kind"] == "Service"))
    job = copy.deepcopy(next(d for d in documents if d["kind"] == "Job"))
    service["metadata"]["name"] = job["metadata"]["name"] = name
    service["spec"]["selector"] = {"recsys/training-job": name}
    job["spec"]["completions"] = job["spec"]["parallelism"] = workers
    pod = job["spec"]["template"]
    pod["metadata"]["labels"]["recsys/training-job"] = name
    pod["spec"]["subdomain"] = name
    peers = f"{name}-{{index}}.{name}:{WORKER_PORT}"
    pod["spec"]["containers"][0]["args"] = [*args, "--peers", peers, "--workers", str(workers)]
    return [service, job]


def run_kubernetes_job(documents: list[dict], timeout: float, poll_seconds: float = 5.0) -> None:
    """Create the Service and the Job of :func:`render_kubernetes_job` in this pod's namespace, wait until
    every pod has succeeded, then delete both (also on failure or timeout).

    Raises:
        WorkersFailed: a pod failed (the Job's backoffLimit is 0), or ``timeout`` passed.
    """
    from kubernetes import client, config

    config.load_incluster_config()
    namespace = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
    core, batch = client.CoreV1Api(), client.BatchV1Api()
    service, job = documents
    name, workers = job["metadata"]["name"], job["spec"]["completions"]
    core.create_namespaced_service(namespace, service)
    try:
        batch.create_namespaced_job(namespace, job)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = batch.read_namespaced_job_status(name, namespace).status
            if (status.succeeded or 0) >= workers:
                return
            if status.failed:
                raise WorkersFailed(f"a pod of the training Job {namespace}/{name} failed: kubectl -n {namespace} "
                                    f"logs -l recsys/training-job={name}")  # fmt: skip
            time.sleep(poll_seconds)
        raise WorkersFailed(f"the training Job {namespace}/{name} ran past {timeout:.0f} s")
    finally:  # what was created goes, whatever happened (a Job that was never created: nothing to delete)
        with contextlib.suppress(client.exceptions.ApiException):
            batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        core.delete_namespaced_service(name, namespace)
