"""Infra validation: a version is loaded and queried in a separate process before any alias points
at it (what TFX's InfraValidator does before a push).

The check is the service's own load path, not a look at file names: the version is downloaded from
the registry, loaded by :class:`recsys_core.scoring.Ranker` (shape checks included), and the smoke
query is run, for a known and an unknown user. It runs in a child Python process so that a version
that crashes the interpreter, exhausts its memory or hangs costs the child, with a time limit, and
never the Dagster run or the CLI that asked. The child imports only this core (numpy, polars, MLflow's
client), as the service does.

Run by hand::

    python -m recsys_core.validation --tracking-uri sqlite:////abs/mlflow.db --version 3 --cache-dir /tmp/c
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from recsys_core.registry import RegistryError

DEFAULT_TIMEOUT_S = 300.0


class UnservableVersion(RegistryError):
    """The version cannot be served: it failed to download, load or answer the smoke query."""

    def __init__(self, version: int, reason: str):
        super().__init__(f"version {version} cannot be served: {reason}")
        self.version = version
        self.reason = reason


@dataclass(frozen=True)
class Validation:
    version: int
    items: int
    users: int
    load_ms: float
    wall_s: float  # the whole check, the child's start included


def validate_in_subprocess(
    tracking_uri: str,
    version: int,
    cache_dir: Path,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Validation:
    """Load ``version`` and run the smoke query in a child process (which inherits this environment,
    and so the service's ``RECSYS_ANN_MIN_ITEMS`` and the store's credentials).

    Raises:
        UnservableVersion: the child failed, with its reason (its last error line), or timed out.
    """
    started = time.perf_counter()
    command = [sys.executable, "-m", "recsys_core.validation", "--tracking-uri", tracking_uri,
               "--version", str(version), "--cache-dir", str(cache_dir)]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise UnservableVersion(version, f"loading it took more than {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        reason = next((line.removeprefix("UNSERVABLE ") for line in reversed(lines) if line.startswith("UNSERVABLE ")),
                      lines[-1] if lines else f"the check exited with status {done.returncode}")  # fmt: skip
        raise UnservableVersion(version, reason)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return Validation(version, report["items"], report["users"], report["load_ms"], time.perf_counter() - started)


def _check(tracking_uri: str, version: int, cache_dir: Path, ann_min_items: int | None) -> dict:
    from recsys_core.registry import Registry
    from recsys_core.scoring import Ranker
    from recsys_core.settings import load_settings

    if ann_min_items is None:
        ann_min_items = load_settings().ann_min_items

    started = time.perf_counter()
    path = Registry(tracking_uri, None, cache_dir).download(version)
    ranker = Ranker.load(path, version, ann_min_items=ann_min_items)
    ranker.smoke_test()
    return {
        "items": int(ranker.n_items),
        "users": len(ranker.artifact.user_ids) - 1,
        "load_ms": round((time.perf_counter() - started) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--ann-min-items", type=int, default=None, help="default: RECSYS_ANN_MIN_ITEMS")
    args = parser.parse_args(argv)
    try:
        report = _check(args.tracking_uri, args.version, args.cache_dir, args.ann_min_items)
    except Exception as exc:  # noqa: BLE001  (any failure at all is the verdict: one line, exit status 1)
        print(f"UNSERVABLE {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
        return 1
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
