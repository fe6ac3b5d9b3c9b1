"""Infra validation: a version is loaded and queried in a separate process before any alias points
at it (what TFX's InfraValidator does before a push).

The check is the service's own load path, not a look at file names: the version is downloaded from
the registry, loaded by :class:`recsys_core.scoring.Ranker` (shape checks included), and the smoke
query is run, for a known and an unknown user. It runs in a child process so that a version that
crashes the interpreter, exhausts its memory or hangs costs the child, with a time limit, and never
the Dagster run or the CLI that asked. The child runs only this core (numpy, polars, MLflow's
client), as the service does; it is forked from a fork server that imported them once per caller
process, so a check costs the load, not the imports.

Run by hand::

    python -m recsys_core.validation --tracking-uri sqlite:////abs/mlflow.db --version 3 --cache-dir /tmp/c
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.context
import os
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


_PRELOAD = ["recsys_core.validation", "recsys_core.registry", "recsys_core.scoring", "mlflow.artifacts"]
_forkserver: multiprocessing.context.ForkServerContext | None = None


def _context() -> multiprocessing.context.ForkServerContext:
    """Children are forked from a fork server that has imported the loader's libraries once (MLflow,
    polars, numpy: seconds of imports per check otherwise). The server is a fresh interpreter, not a
    fork of this multi-threaded process, so no lock of ours is inherited."""
    global _forkserver
    if _forkserver is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        _forkserver = context
    return _forkserver


def _child(conn, env: dict[str, str], tracking_uri: str, version: int, cache_dir: str) -> None:
    os.environ.clear()
    os.environ.update(env)  # this caller's environment now (the server's is from its start)
    try:
        conn.send(("ok", _check(tracking_uri, version, Path(cache_dir), None)))
    except Exception as exc:  # noqa: BLE001  (any failure at all is the verdict, sent back with its type)
        conn.send(("unservable", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def validate_in_subprocess(
    tracking_uri: str,
    version: int,
    cache_dir: Path,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Validation:
    """Load ``version`` and run the smoke query in a child process, with this process's environment
    (and so the service's ``RECSYS_ANN_MIN_ITEMS`` and the store's credentials).

    Raises:
        UnservableVersion: the check failed, with its reason; the child died (a crash, the OOM
            killer) or took longer than ``timeout_s``.
    """
    started = time.perf_counter()
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, dict(os.environ), tracking_uri, version, str(cache_dir)),
                            daemon=True)  # fmt: skip
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            child.kill()
            raise UnservableVersion(version, f"loading it took more than {timeout_s:.0f} s")
        try:
            status, payload = receiver.recv()
        except EOFError:  # the child died without a word
            child.join(5)
            raise UnservableVersion(version, f"the check died (exit code {child.exitcode})") from None
    finally:
        receiver.close()
        child.join(5)
    if status != "ok":
        raise UnservableVersion(version, payload)
    return Validation(version, payload["items"], payload["users"], payload["load_ms"], time.perf_counter() - started)


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
