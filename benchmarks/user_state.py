"""Benchmark: the serving plane's user state (``serving/user_state.py``): memory per user and the cost
of an update, at a million users.

    .venv-serving/bin/python benchmarks/user_state.py [--users 1000000 --per-user 20 --tracks 100000]

Every user gets ``--per-user`` distinct plays from a catalogue of ``--tracks`` (track ids as the
simulator writes them), one ``add`` per play as ``/feedback`` does. Memory is what ``tracemalloc``
counts as allocated by the store (the interned track ids included); the last line printed is the JSON
summary.

    .venv-serving/bin/python benchmarks/user_state.py --siblings [--rate 2700]

Instead: the cost of following another worker's write-ahead log (``SiblingFeedback.poll``), for a
sibling serving ``--rate`` requests a second (ten impressions a list, one like every 19 lists), one
poll every 0.25 s of its log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving.user_state import FOLLOW_SECONDS, RecentPlays, SiblingFeedback


def siblings(rate: int) -> None:
    import statistics
    import tempfile

    from serving.feedback import _row_to_json, event_row

    lists = int(rate * FOLLOW_SECONDS)
    impressions = json.dumps(["i", "0123456789abcdef0123456789abcdef", "u000123", "2026-11-01T00:00:00.000000+00:00",
                              [[f"t{i:07d}", f"a{i:06d}", 3, "champion"] for i in range(10)]]) + "\n"  # fmt: skip
    like = _row_to_json(event_row(event_id="fb-1", user_id="u1", track_id="t1", artist_id=None, event_type="like",
                                  model_version=3, variant="champion")) + "\n"  # fmt: skip
    chunk = (impressions * 19 + like) * (lists // 20)
    follower = SiblingFeedback(Path(tempfile.mkdtemp()), RecentPlays(200_000))
    seconds = []
    with (follower.spill_dir / "feedback-wal-999999-1.jsonl").open("a") as segment:
        for _ in range(200):
            segment.write(chunk)
            segment.flush()
            start = time.perf_counter()
            follower.poll()
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "rate": rate, "kilobytes_per_poll": len(chunk) / 1e3, "poll_ms": median * 1e3,
        "share_of_a_core": median / FOLLOW_SECONDS,
    }  # fmt: skip
    print(
        f"following a sibling at {rate:,} req/s: {summary['kilobytes_per_poll']:.0f} KB a poll, "
        f"{summary['poll_ms']:.2f} ms a poll, {summary['share_of_a_core']:.2%} of a core",
        file=sys.stderr,
    )
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--per-user", type=int, default=20)
    parser.add_argument("--tracks", type=int, default=100_000)
    parser.add_argument("--siblings", action="store_true", help="measure following a sibling's log instead")
    parser.add_argument("--rate", type=int, default=2700, help="the sibling's requests a second (--siblings)")
    args = parser.parse_args()
    if args.siblings:
        siblings(args.rate)
        return
    rng = np.random.default_rng(0)
    plays = rng.integers(0, args.tracks, (args.users, args.per_user))
    store = RecentPlays(max_users=args.users, per_user=args.per_user)
    tracemalloc.start()
    for i, row in enumerate(plays):
        user = f"u{i:07d}"  # a new string per request, as the service gets them
        for track in row:
            store.add(user, (f"t{track:06d}",))
    allocated, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The cost of an add, untraced: a million plays of users already held (each pushes one track out).
    users = rng.integers(0, args.users, 1_000_000)
    tracks = rng.integers(0, args.tracks, 1_000_000)
    start = time.perf_counter()
    for user, track in zip(users, tracks, strict=True):
        store.add(f"u{user:07d}", (f"t{track:06d}",))
    seconds = time.perf_counter() - start
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "users": args.users, "per_user": args.per_user, "tracks": args.tracks,
        "megabytes": allocated / 1e6, "bytes_per_user": allocated / args.users,
        "add_microseconds": seconds / len(users) * 1e6,
    }  # fmt: skip
    print(f"{args.users:,} users × {args.per_user} plays: {summary['megabytes']:.0f} MB "
          f"({summary['bytes_per_user']:.0f} B a user), {summary['add_microseconds']:.2f} µs an add",
          file=sys.stderr)  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
