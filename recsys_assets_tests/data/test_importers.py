"""Importers: real formats onto the contract, bad lines quarantined with file, line and reason."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from recsys_assets.data.importers import UnreadableFileError, import_file, parse_mapping
from recsys_core.warehouse import Warehouse


def quarantine(wh: Warehouse) -> list[tuple[int, str]]:
    return wh.fetch("SELECT line_number, reason FROM quarantine ORDER BY line_number").rows()


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


# --- MovieLens ---------------------------------------------------------------------------------


def test_movielens_ratings_become_plays_and_likes(warehouse: Warehouse, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ratings.csv",
        "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n1,20,2.5,964982224\n2,10,5.0,964983815\n",
    )
    write(tmp_path, "movies.csv", 'movieId,title,genres\n10,"A, film (1995)",Comedy|Drama\n20,B (1990),Horror\n')
    report = import_file(warehouse, "movielens", path)
    assert report.totals == {"rows_in": 5, "landed": 5, "quarantined": 0, "duplicates": 0}
    df = warehouse.fetch(
        "SELECT event_id, user_id, track_id, event_type, played_at FROM listening_events ORDER BY event_id"
    )
    assert df.filter(pl.col("event_type") == "play").height == 3
    assert sorted(df.filter(pl.col("event_type") == "like")["track_id"].to_list()) == ["10", "10"]
    assert df["user_id"].dtype == pl.String
    assert "ml:1:10:964982703:play" in df["event_id"].to_list()
    assert df["played_at"].min().timestamp() == 964982224
    genres = dict(warehouse.fetch("SELECT track_id, genre FROM tracks").rows())
    assert genres == {"10": "Comedy", "20": "Horror"}


def test_movielens_u_data_tab_separated(warehouse: Warehouse, tmp_path: Path) -> None:
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t4\t891717742\n")
    report = import_file(warehouse, "movielens", path)
    assert report.totals["landed"] == 3
    assert warehouse.scalar("SELECT COUNT(DISTINCT user_id) FROM listening_events") == 2


def test_importing_the_same_file_twice_adds_nothing(warehouse: Warehouse, tmp_path: Path) -> None:
    path = write(tmp_path, "u.data", "1\t2\t5\t881250949\n1\t3\t1\t881250950\n")
    import_file(warehouse, "movielens", path)
    again = import_file(warehouse, "movielens", path)
    assert all(b.skipped for b in again.batches)
    # A copy with one more line: the known events are duplicates, only the new one lands.
    bigger = write(tmp_path, "u2.data", "1\t2\t5\t881250949\n1\t3\t1\t881250950\n9\t9\t1\t881250999\n")
    third = import_file(warehouse, "movielens", bigger)
    assert (third.totals["landed"], third.totals["duplicates"]) == (1, 3)
    assert warehouse.scalar("SELECT COUNT(*) FROM listening_events") == 4


# --- bad input, each on its own ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        (
            b"1\t2\t5\t881250949\n1\t2\n",
            2,
            "expected 4 fields separated by '\\t', found 2 (truncated or malformed line)",
        ),
        (b"1\t2\t5\t881250949\n1\t2\t4\t88125", None, None),  # a truncated last line that still parses
        (b"1\t2\t5\tyesterday\n", 1, "timestamp=yesterday: not epoch seconds or ISO 8601"),
        (b"1\t2\tfive\t881250949\n", 1, "rating=five: not a number"),
        (b"\t2\t5\t881250949\n", 1, "userId is empty"),
        (b"1\t2\t5\t881250949\n1\t\xff\xfe\t5\t881250949\n", 2, "invalid UTF-8 at byte 2 of the line"),
        (
            b"1\t2\t5\t881250949\n1\t" + b"x" * (2 << 20) + b"\t5\t881250949\n",
            2,
            "line is 2,097,167 bytes, longer than the 1,048,576-byte limit",
        ),
    ],
    ids=[
        "truncated-last-line",
        "truncated-but-valid",
        "bad-timestamp",
        "bad-rating",
        "null-id",
        "invalid-utf8",
        "enormous-line",
    ],
)
def test_bad_lines_are_quarantined_with_their_line_and_reason(
    warehouse: Warehouse, tmp_path: Path, content: bytes, line: int | None, reason: str | None
) -> None:
    path = write(tmp_path, "u.data", content)
    report = import_file(warehouse, "movielens", path)
    totals = report.totals
    assert totals["rows_in"] == totals["landed"] + totals["quarantined"] + totals["duplicates"]
    if reason is None:
        assert totals["quarantined"] == 0
        return
    assert quarantine(warehouse) == [(line, reason)]
    origin = warehouse.scalar("SELECT origin FROM quarantine")
    assert origin == str(path.resolve())


def test_an_empty_file_is_an_error_naming_file_and_line(warehouse: Warehouse, tmp_path: Path) -> None:
    path = write(tmp_path, "empty.csv", b"")
    with pytest.raises(UnreadableFileError, match=rf"{path}: line 1: the file is empty"):
        import_file(warehouse, "movielens", path)


def test_a_header_only_file_is_an_error(warehouse: Warehouse, tmp_path: Path) -> None:
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n")
    with pytest.raises(UnreadableFileError, match="line 2: no data lines after the header"):
        import_file(warehouse, "movielens", path)


def test_a_missing_file_is_named(warehouse: Warehouse, tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError, match=r"nope\.csv: no such file"):
        import_file(warehouse, "movielens", tmp_path / "nope.csv")


# --- generic CSV ---------------------------------------------------------------------------------

MAPPING = "event_id=id,user_id=user,track_id=track,played_at=ts,ms_played=ms,event_type=kind"


def test_csv_mapping_with_epoch_and_iso_timestamps(warehouse: Warehouse, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "events.csv",
        "id,user,track,ts,ms,kind,extra\n"
        "a,u1,t1,1714564800,1000,play,x\n"
        "b,u1,t2,2024-05-01T12:00:00Z,2000,SKIP,x\n"
        'c,"=HYPERLINK(""http://evil"")",t3,2024-05-01 12:00:00+02:00,,like,x\n',
    )
    report = import_file(warehouse, "csv", path, mapping=parse_mapping(MAPPING))
    assert report.totals["landed"] == 3
    df = warehouse.fetch(
        "SELECT event_id, user_id, played_at, ms_played, event_type, source FROM listening_events ORDER BY event_id"
    )
    assert df["event_type"].to_list() == ["play", "skip", "like"]
    assert df["user_id"][2] == '=HYPERLINK("http://evil")'
    assert df["ms_played"].to_list() == [1000, 2000, None]
    assert [t.isoformat() for t in df["played_at"]] == [
        "2024-05-01T12:00:00+00:00",
        "2024-05-01T12:00:00+00:00",
        "2024-05-01T10:00:00+00:00",
    ]
    assert df["source"].to_list() == ["organic"] * 3


def test_csv_wrong_types_and_null_ids_are_quarantined(warehouse: Warehouse, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "events.csv",
        "id,user,track,ts,ms,kind\n"
        "a,u1,t1,1714564800,lots,play\n"
        ",u1,t1,1714564800,1,play\n"
        "c,u1,,1714564800,1,play\n"
        "d,u1,t1,31/12/2024,1,play\n"
        "e,u1,t1,1714564800,1,play,surplus\n",
    )
    report = import_file(warehouse, "csv", path, mapping=parse_mapping(MAPPING))
    assert report.totals == {"rows_in": 5, "landed": 0, "quarantined": 5, "duplicates": 0}
    assert quarantine(warehouse) == [
        (2, "ms=lots: not an integer"),
        (3, "id is empty"),
        (4, "track is empty"),
        (5, "ts=31/12/2024: not epoch seconds or ISO 8601"),
        (6, "expected 6 fields separated by ',', found 7 (truncated or malformed line)"),
    ]


def test_csv_missing_mapped_column_is_an_error_naming_it(warehouse: Warehouse, tmp_path: Path) -> None:
    path = write(tmp_path, "events.csv", "id,user,track\na,u,t\n")
    with pytest.raises(UnreadableFileError, match=r"events.csv: line 1: the header has no column 'ts', 'ms', 'kind'"):
        import_file(warehouse, "csv", path, mapping=parse_mapping(MAPPING))


def test_csv_without_event_ids_gets_stable_ones(warehouse: Warehouse, tmp_path: Path) -> None:
    path = write(tmp_path, "events.csv", "user,track,ts\nu,t,1714564800\nu,t,1714564800\n")
    mapping = parse_mapping("user_id=user,track_id=track,played_at=ts")
    import_file(warehouse, "csv", path, mapping=mapping)
    ids = warehouse.fetch("SELECT event_id FROM listening_events")["event_id"].to_list()
    assert len(set(ids)) == 2
    assert all(i.startswith("csv:") for i in ids)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("user_id=user,track_id=track", "--map must map played_at"),
        ("user=u", "'user' is not a column of the contract"),
        ("user_id", "expected contract_column=csv_column"),
    ],
)
def test_bad_mappings_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_mapping(text)


# --- Last.fm 1K and ListenBrainz -------------------------------------------------------------------


def test_lastfm_1k_log(warehouse: Warehouse, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "userid-timestamp-artid-artname-traid-traname.tsv",
        "user_000001\t2009-05-04T23:08:57Z\tf1b1cf71-bd35-4e99-8624-24a6e15f133a\tDeep Dish\t\t"
        "Fuck Me Im Famous (Pacha Ibiza)-09-28-2007\n"
        "user_000001\t2009-05-04T13:54:10Z\ta7f7df4a-77d8-4f12-8acd-5c60c93f4de8\t坂本龍一\t"
        "f7c1f8f8-b935-45ed-8fc8-7def69d92a10\tThe Last Emperor (Theme)\n"
        "user_000002\tnot-a-time\t\tX\t\tY\n",
    )
    report = import_file(warehouse, "lastfm-1k", path)
    assert report.totals == {"rows_in": 3, "landed": 2, "quarantined": 1, "duplicates": 0}
    tracks = warehouse.fetch("SELECT track_id, artist_id FROM listening_events ORDER BY played_at")
    assert tracks.rows() == [
        ("f7c1f8f8-b935-45ed-8fc8-7def69d92a10", "a7f7df4a-77d8-4f12-8acd-5c60c93f4de8"),
        ("Deep Dish\u241fFuck Me Im Famous (Pacha Ibiza)-09-28-2007", "f1b1cf71-bd35-4e99-8624-24a6e15f133a"),
    ]
    assert quarantine(warehouse) == [(3, "timestamp=not-a-time: not epoch seconds or ISO 8601")]


def test_listenbrainz_json_lines(warehouse: Warehouse, tmp_path: Path) -> None:
    listens = [
        {"user_name": "rob", "listened_at": 1600000000, "recording_msid": "m1",
         "track_metadata": {"artist_name": "A", "track_name": "T",
                            "additional_info": {"recording_mbid": "r1", "duration_ms": 200000,
                                                "artist_mbids": ["a1"]}}},
        {"user_name": "rob", "listened_at": 1600000300, "track_metadata": {"artist_name": "A", "track_name": "U"}},
        {"listened_at": 1600000600, "track_metadata": {"artist_name": "A", "track_name": "U"}},
    ]  # fmt: skip
    lines = [json.dumps(x) for x in listens] + ['{"user_name": "rob", "listened_at": ']
    path = write(tmp_path, "listens.jsonl", "\n".join(lines) + "\n")
    report = import_file(warehouse, "listenbrainz", path)
    assert report.totals == {"rows_in": 4, "landed": 2, "quarantined": 2, "duplicates": 0}
    df = warehouse.fetch("SELECT track_id, artist_id, track_duration_ms FROM listening_events ORDER BY played_at")
    assert df.rows() == [("r1", "a1", 200000), ("A\u241fU", "A", None)]
    assert [r for _, r in quarantine(warehouse)] == ["user_name is empty", "not JSON: Expecting value at column 37"]
