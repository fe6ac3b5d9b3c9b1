"""The users' state at request time (serving/user_state.py): the bounded store of plays since the
cutoff, and its poll of a real warehouse (DuckDB) by landed batch."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from recsys_core.contracts import LISTENING_EVENTS_SCHEMA
from recsys_core.warehouse import Warehouse
from serving.feedback import event_row
from serving.user_state import RecentPlays, WarehousePoll

CUTOFF = datetime(2026, 11, 1, tzinfo=UTC)


def test_plays_are_distinct_most_recent_first_capped_per_user_and_in_users() -> None:
    evicted = []
    plays = RecentPlays(max_users=2, per_user=3, on_evict=evicted.append)
    plays.add("a", ["t1", "t2"])
    plays.add("a", ["t1", "t3"])  # t1 again keeps its place: histories order tracks by first play
    assert plays.get("a") == ("t3", "t2", "t1")
    plays.add("a", ["t4"])
    assert plays.get("a") == ("t4", "t3", "t2")  # N per user
    plays.add("b", ["t1"])
    plays.add("a", ["t5"])  # a is now the most recently updated
    plays.add("c", ["t1"])  # over the cap: b, the least recently updated, goes
    assert (plays.get("b"), len(plays), plays.evictions, evicted) == ((), 2, 1, [1])
    assert plays.get("a")[0] == "t5"
    assert plays.get("nobody") == ()


def events(batch: str, rows: list[tuple[str, str, str, datetime]]) -> pl.DataFrame:
    return pl.DataFrame(
        [event_row(event_id=f"{batch}-{i}", user_id=u, track_id=t, artist_id=None, event_type=e, model_version=None,
                   variant=None, at=at) for i, (u, t, e, at) in enumerate(rows)],
        schema=list(LISTENING_EVENTS_SCHEMA), orient="row",
    )  # fmt: skip


def test_the_poll_reads_the_positives_played_after_the_cutoff_batch_by_batch(tmp_path: Path) -> None:
    warehouse = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    warehouse.init_schema()
    day = timedelta(days=1)
    # Before the cutoff: in the version's history already. The skip is no positive.
    warehouse.land_events(events("old", [("u1", "t1", "play", CUTOFF - day)]), source="app", origin="test")
    warehouse.land_events(
        events("b1", [("u1", "t2", "play", CUTOFF + day), ("u1", "t3", "skip", CUTOFF + day),
                      ("u2", "t4", "like", CUTOFF + 2 * day), ("u1", "t5", "like", CUTOFF + 3 * day)]),
        source="app", origin="test",
    )  # fmt: skip
    plays = RecentPlays(max_users=100)
    poll = WarehousePoll(warehouse, plays, cutoff=lambda: CUTOFF)
    assert poll.poll() == 3
    assert (plays.get("u1"), plays.get("u2")) == (("t5", "t2"), ("t4",))
    assert poll.poll() == 0  # nothing new: nothing read again
    warehouse.land_events(events("b2", [("new", "t9", "play", CUTOFF + 4 * day)]), source="app", origin="test")
    assert poll.poll() == 1
    assert plays.get("new") == ("t9",)

    # Without a cutoff (a version trained without one): only what lands from now on.
    fresh = RecentPlays(max_users=100)
    later = WarehousePoll(warehouse, fresh, cutoff=lambda: None)
    assert later.poll() == 0
    warehouse.land_events(events("b3", [("u1", "t7", "play", CUTOFF + 5 * day)]), source="app", origin="test")
    assert later.poll() == 1
    assert fresh.get("u1") == ("t7",)


def test_a_failing_poll_is_retried_and_a_stopped_loop_says_so(tmp_path: Path) -> None:
    warehouse = Warehouse(f"duckdb:///{tmp_path / 'missing' / 'w.duckdb'}", lock_timeout=0.1)
    failures = []
    poll = WarehousePoll(warehouse, RecentPlays(max_users=10), cutoff=lambda: None,
                         on_failure=lambda: failures.append(1))  # fmt: skip
    poll.start(0.01)
    try:
        deadline = time.monotonic() + 20
        while len(failures) < 2:  # failed, then retried and failed again
            assert time.monotonic() < deadline, "the poll never failed"
            time.sleep(0.01)
        assert poll.alive
        assert poll.last_error
    finally:
        poll.close()
    assert not poll.alive


def test_a_champion_older_than_the_poll_gets_the_plays_in_between_behind_the_newer_ones(tmp_path: Path) -> None:
    """The service started before its first champion (no cutoff: it polls from the latest batch); the
    champion's cutoff is older: the batches between the two are read once, held behind newer plays."""
    warehouse = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    warehouse.init_schema()
    day = timedelta(days=1)
    warehouse.land_events(events("old", [("u1", "t0", "play", CUTOFF - day)]), source="app", origin="test")
    warehouse.land_events(events("gap", [("u1", "t1", "play", CUTOFF + day), ("u1", "t2", "like", CUTOFF + 2 * day),
                                         ("u2", "t3", "play", CUTOFF + day)]), source="app", origin="test")  # fmt: skip
    champion: list[datetime | None] = [None]
    plays = RecentPlays(max_users=100, per_user=3)
    poll = WarehousePoll(warehouse, plays, cutoff=lambda: champion[0])
    assert poll.poll() == 0  # no champion yet: from the latest batch on
    newer = [("u1", "t3", "play", CUTOFF + 3 * day), ("u1", "t1", "play", CUTOFF + 4 * day)]
    warehouse.land_events(events("new", newer), source="app", origin="test")
    assert poll.poll() == 2
    assert plays.get("u1") == ("t1", "t3")

    champion[0] = CUTOFF  # the first champion loads
    assert poll.poll() == 3  # the batch in between, once
    assert plays.get("u1") == ("t1", "t3", "t2")  # behind the newer plays; t1 held already; N per user
    assert plays.get("u2") == ("t3",)
    assert poll.poll() == 0
    champion[0] = CUTOFF + 10 * day  # a newer champion: nothing to read again
    assert poll.poll() == 0
    champion[0] = CUTOFF  # and a rollback to the first: read already
    assert poll.poll() == 0


def test_a_worker_follows_what_its_siblings_logged_complete_lines_only(tmp_path: Path) -> None:
    """The other workers' write-ahead segments (serving/feedback.py's format), read from where the last
    read stopped: positives added, impressions and skips not, a torn last line only once complete, this
    worker's own segment never (its feedback is added as it comes), a deleted segment forgotten."""
    from serving.feedback import _row_to_json
    from serving.user_state import SiblingFeedback

    def line(user: str, track: str, kind: str) -> str:
        return _row_to_json(event_row(event_id=f"{user}-{track}", user_id=user, track_id=track, artist_id=None,
                                      event_type=kind, model_version=1, variant="champion")) + "\n"  # fmt: skip

    plays = RecentPlays(max_users=100)
    follower = SiblingFeedback(tmp_path, plays)
    assert follower.poll() == 0  # no segment yet
    sibling = tmp_path / "feedback-wal-999999-1.jsonl"
    impressions = '["i", "r1", "u1", "2026-11-01T00:00:00+00:00", [["t9", "a", 1, "champion"]]]\n'
    torn = line("u2", "t5", "like")
    sibling.write_text(line("u1", "t1", "like") + impressions + line("u1", "t2", "skip") + line("u1", "t3", "play")
                       + torn[:10])  # fmt: skip
    (tmp_path / f"feedback-wal-{os.getpid()}-1.jsonl").write_text(line("u3", "t4", "like"))  # this worker's own
    assert follower.poll() == 2
    assert (plays.get("u1"), plays.get("u2"), plays.get("u3")) == (("t3", "t1"), (), ())
    with sibling.open("a") as segment:
        segment.write(torn[10:])
    assert follower.poll() == 1  # the rest of the line, not what was read before
    assert plays.get("u2") == ("t5",)
    sibling.unlink()  # landed by its lander
    assert follower.poll() == 0
    assert not follower._offsets
