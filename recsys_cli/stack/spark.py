"""A Spark standalone cluster on one machine, from the PySpark distribution: a master and N workers.

For the tests and the benchmarks (and for trying the Spark engine against a real cluster, not only
``local[*]``): each daemon is a JVM started with the distribution's ``spark-class`` in the foreground,
bound to 127.0.0.1 on free ports, and stopped by its PID. The cluster's state comes from the master's
JSON status page (``http://127.0.0.1:<ui port>/json/``).

    with StandaloneCluster(work_dir, workers=2) as cluster:
        ...  # RECSYS_SPARK_MASTER=cluster.master_url
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from recsys_cli.stack.supervisor import free_port

HOST = "127.0.0.1"


def spark_home() -> str:
    """The PySpark distribution's directory (its ``bin/`` and ``jars/``), without importing PySpark."""
    return importlib.util.find_spec("pyspark").submodule_search_locations[0]


class StandaloneCluster:
    """A master and ``workers`` workers of ``cores`` cores and ``memory`` each.

    Args:
        work_dir: logs and the workers' scratch space.
        workers: number of worker daemons.
        cores: cores each worker offers.
        memory: memory each worker offers to executors (``1g``).
    """

    def __init__(self, work_dir: Path, workers: int = 2, cores: int = 1, memory: str = "1g"):
        self.work_dir = Path(work_dir)
        self.workers = workers
        self.cores = cores
        self.memory = memory
        self.port = 0
        self.ui_port = 0
        self.processes: list[subprocess.Popen] = []

    @property
    def master_url(self) -> str:
        return f"spark://{HOST}:{self.port}"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.ui_port}"

    def _start(self, name: str, *args: str) -> None:
        home = spark_home()
        env = {**os.environ, "SPARK_HOME": home, "SPARK_LOCAL_IP": HOST, "SPARK_LOG_DIR": str(self.work_dir / "logs")}
        log = open(self.work_dir / f"{name}.log", "wb")  # noqa: SIM115  (the daemon writes it until stopped)
        self.processes.append(
            subprocess.Popen(
                [f"{home}/bin/spark-class", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )

    def status(self) -> dict:
        """The master's status: ``aliveworkers``, ``workers``, ``activeapps``, ``completedapps``…"""
        with urllib.request.urlopen(f"{self.ui_url}/json/", timeout=5) as response:
            return json.load(response)

    def start(self, timeout: float = 120.0) -> StandaloneCluster:
        """Start the master, then the workers; return once every worker has registered."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port, self.ui_port = free_port(), free_port()
        self._start("master", "org.apache.spark.deploy.master.Master", "--host", HOST,
                    "--port", str(self.port), "--webui-port", str(self.ui_port))  # fmt: skip
        self._wait(lambda s: True, timeout, "the master's status page")
        for i in range(self.workers):
            scratch = self.work_dir / f"worker-{i}"
            scratch.mkdir(exist_ok=True)
            self._start(f"worker-{i}", "org.apache.spark.deploy.worker.Worker", "--host", HOST,
                        "--port", str(free_port()), "--webui-port", str(free_port()), "--cores", str(self.cores),
                        "--memory", self.memory, "--work-dir", str(scratch), self.master_url)  # fmt: skip
        self._wait(lambda s: s.get("aliveworkers") == self.workers, timeout, f"{self.workers} alive workers")
        return self

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"a Spark daemon exited ({proc.returncode}); see {self.work_dir}/*.log")
            try:
                if ready(self.status()):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"no {what} after {timeout:.0f} s; see {self.work_dir}/*.log")

    def stop(self) -> None:
        """Stop every daemon by its PID, with its children (a worker's executors): SIGTERM to the process
        group it leads, then SIGKILL after 20 s."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes = []

    def __enter__(self) -> StandaloneCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
