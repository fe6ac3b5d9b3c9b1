"""Importers: public listening datasets onto the listening-events contract.

Every importer reads its file line by line in binary, in chunks of ``chunk_lines`` lines, so memory
stays bounded whatever the file's size, and lands each chunk as one warehouse batch through
:meth:`Warehouse.land_events` (the same path as the simulator and the serving feedback). A line that
cannot be read (invalid UTF-8, too long, wrong number of fields) or typed (a timestamp that is no
timestamp, an empty id) is quarantined with the file, its line number, the reason and the original
text; it never stops the import. A file that cannot be read at all (missing, empty, a header without
the needed columns) raises :class:`UnreadableFileError` naming the file and the line.

Ids are kept verbatim as strings, so a split made from the warehouse can be reproduced from the
source file alone. Importing the same file twice adds nothing: each chunk carries a digest of the
file and its index, and event ids are deterministic.

Mappings (documented in the README):

- ``movielens`` (``u.data``: ``user \\t item \\t rating \\t timestamp``; ``ratings.csv``: ``userId,movieId,
  rating,timestamp``): each rating is a complete ``play`` of the movie as a track, at the rating's
  time; a rating of 4 or more also yields a ``like`` at the same instant. ``ms_played`` and
  ``track_duration_ms`` are unknown (null). ``movies.csv`` beside the file fills the catalogue
  (genre = first listed genre).
- ``lastfm-1k`` (``userid \\t timestamp \\t artist-mbid \\t artist-name \\t track-mbid \\t track-name``): a
  ``play``; the track id is the track MBID or, when empty, ``artist-name␟track-name``; the artist id
  the artist MBID or the artist name.
- ``listenbrainz`` (JSON lines of listens): a ``play``; user ``user_name``; time ``listened_at``;
  track ``recording_mbid`` or ``recording_msid`` or ``artist_name␟track_name``; ``duration_ms`` from
  ``additional_info`` when present.
- ``csv``: any CSV with a header, mapped with ``--map contract_column=csv_column,…``. ``user_id``,
  ``track_id`` and ``played_at`` must be mapped; unmapped columns get: ``event_id`` = a digest of
  (user, track, time, type, source file line), ``event_type`` = ``play``, ``source`` = ``organic``,
  the others null. Timestamps are epoch seconds or ISO 8601.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from recsys_core.contracts import LISTENING_EVENTS_SCHEMA, QUARANTINE_SCHEMA, TRACKS_SCHEMA, conform
from recsys_core.warehouse import BatchReport, Warehouse

log = logging.getLogger(__name__)

FORMATS = ("movielens", "lastfm-1k", "listenbrainz", "csv")
MAX_LINE_BYTES = 1 << 20
CHUNK_LINES = 500_000
SEP = "\u241f"  # joins names into an id when a dataset has no id for a track
MAX_VALUE_IN_MESSAGE = 80


class UnreadableFileError(ValueError):
    """The file cannot be imported at all; the message names the file and the line."""


@dataclass
class LineChunk:
    """Decoded lines of one chunk, with their 1-based line numbers, and the lines already rejected."""

    numbers: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, original)
    end_offset: int = 0  # bytes of the file read up to the end of this chunk

    @property
    def size(self) -> int:
        return len(self.lines) + len(self.rejected)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def read_lines(
    path: Path, *, skip: int = 0, chunk_lines: int = CHUNK_LINES, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[LineChunk]:
    """Yield the lines of ``path`` after the first ``skip`` ones, decoded, in chunks.

    Blank lines are ignored (they count in line numbers). Lines that are not UTF-8 or longer than
    ``max_line_bytes`` are rejected with their reason.
    """
    chunk = LineChunk()
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            offset += len(raw)
            if number <= skip:
                continue
            if len(raw) > max_line_bytes:
                chunk.rejected.append(
                    (
                        number,
                        f"line is {len(raw):,} bytes, longer than the {max_line_bytes:,}-byte limit",
                        _preview(raw),
                    )
                )
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    chunk.rejected.append((number, f"invalid UTF-8 at byte {exc.start} of the line", _preview(raw)))
                else:
                    text = text.rstrip("\r\n")
                    if text.strip():
                        chunk.numbers.append(number)
                        chunk.lines.append(text)
            if chunk.size >= chunk_lines:
                chunk.end_offset = offset
                yield chunk
                chunk = LineChunk()
    if chunk.size:
        chunk.end_offset = offset
        yield chunk


def _preview(raw: bytes, limit: int = 300) -> str:
    text = raw[:limit].decode("utf-8", errors="backslashreplace").rstrip("\r\n")
    return text + (f"… ({len(raw):,} bytes)" if len(raw) > limit else "")


def _split(
    chunk: LineChunk, delimiter: str, n_fields: int, names: list[str]
) -> tuple[pl.DataFrame, list[tuple[int, str, str]]]:
    """Split delimited lines into string columns; lines with the wrong field count are rejected."""
    rejected = list(chunk.rejected)
    rows: list[list[str]] = []
    numbers: list[int] = []
    originals: list[str] = []
    reader = csv.reader(
        chunk.lines, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    )
    for number, line, fields in zip(chunk.numbers, chunk.lines, reader, strict=True):
        if len(fields) != n_fields:
            rejected.append(
                (
                    number,
                    f"expected {n_fields} fields separated by {delimiter!r}, found {len(fields)} "
                    "(truncated or malformed line)",
                    line,
                )
            )
            continue
        rows.append(fields)
        numbers.append(number)
        originals.append(line)
    df = (
        pl.DataFrame(rows, schema=names, orient="row") if rows else pl.DataFrame(schema=dict.fromkeys(names, pl.String))
    )
    return df.with_columns(
        pl.Series("line_number", numbers, dtype=pl.Int64), pl.Series("original", originals, dtype=pl.String)
    ), rejected


# --- vectorised field parsing -----------------------------------------------------------------


def _shown(col: str) -> pl.Expr:
    """The raw value of ``col`` for a message: quoted, truncated."""
    value = pl.col(col).fill_null("")
    return (
        pl.when(value.str.len_chars() > MAX_VALUE_IN_MESSAGE)
        .then(pl.concat_str(value.str.slice(0, MAX_VALUE_IN_MESSAGE), pl.lit("…")))
        .otherwise(value)
    )


def parse_timestamp(col: str) -> pl.Expr:
    """Epoch seconds (integer or decimal) or ISO 8601 (``Z``, an offset, or naive meaning UTC)."""
    s = pl.col(col).str.strip_chars()
    epoch = s.cast(pl.Float64, strict=False)
    from_epoch = pl.when(s.str.contains(r"^-?\d+(\.\d+)?$")).then(
        (epoch * 1_000_000).cast(pl.Int64, strict=False).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    )
    iso = s.str.replace(r"Z$", "+00:00").str.replace(" ", "T")
    attempts = [
        iso.str.strptime(pl.Datetime("us", "UTC"), "%Y-%m-%dT%H:%M:%S%.f%:z", strict=False),
        iso.str.strptime(pl.Datetime("us", "UTC"), "%Y-%m-%dT%H:%M:%S%:z", strict=False),
        iso.str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%S%.f", strict=False).dt.replace_time_zone("UTC"),
        iso.str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%S", strict=False).dt.replace_time_zone("UTC"),
    ]
    return pl.coalesce([from_epoch, *attempts])


def parse_int(col: str) -> pl.Expr:
    """An integer (``12``, ``12.0``); null when the text is no integer."""
    s = pl.col(col).str.strip_chars()
    as_float = s.cast(pl.Float64, strict=False)
    return pl.when(as_float.is_finite() & (as_float == as_float.floor())).then(as_float.cast(pl.Int64, strict=False))


def _typed(
    df: pl.DataFrame, columns: Mapping[str, pl.Expr], checks: list[tuple[pl.Expr, pl.Expr]], origin: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Apply typed ``columns``; rows failing a check (first failing reason wins) are rejected."""
    df = df.with_columns(**columns)
    reason = (
        pl.coalesce([pl.when(failed).then(message) for failed, message in checks])
        if checks
        else pl.lit(None, pl.String)
    )
    df = df.with_columns(reason.alias("_reason"))
    good = df.filter(pl.col("_reason").is_null())
    bad = df.filter(pl.col("_reason").is_not_null()).select(
        pl.lit(origin).alias("origin"),
        pl.col("line_number"),
        (pl.col("event_id") if "event_id" in df.columns else pl.lit(None, pl.String)).alias("event_id"),
        pl.col("_reason").alias("reason"),
        pl.col("original"),
    )
    return good, bad


def _required_id(col: str, label: str | None = None) -> tuple[pl.Expr, pl.Expr]:
    return (pl.col(col).is_null() | (pl.col(col).str.strip_chars() == ""), pl.lit(f"{label or col} is empty"))


def _timestamp_check(raw: str, parsed: str, label: str = "played_at") -> tuple[pl.Expr, pl.Expr]:
    return (
        pl.col(parsed).is_null(),
        pl.format(f"{label}={{}}: not epoch seconds or ISO 8601", _shown(raw)),
    )


def _rejected_frame(rejected: list[tuple[int, str, str]], origin: str) -> pl.DataFrame:
    if not rejected:
        return conform(pl.DataFrame(), QUARANTINE_SCHEMA)
    numbers, reasons, originals = zip(*rejected, strict=True)
    return conform(
        pl.DataFrame(
            {
                "origin": origin,
                "line_number": list(numbers),
                "reason": list(reasons),
                "original": list(originals),
            }
        ),
        QUARANTINE_SCHEMA,
    )


# --- formats ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedChunk:
    events: pl.DataFrame
    rejected: pl.DataFrame
    rows_in: int


def _movielens(chunk: LineChunk, origin: str, delimiter: str) -> ParsedChunk:
    names = ["user", "item", "rating", "ts"]
    df, rejected = _split(chunk, delimiter, 4, names)
    df = df.with_columns(pl.col(n).str.strip_chars() for n in names)
    good, bad = _typed(
        df,
        {"played_at": parse_timestamp("ts"), "rating_value": pl.col("rating").cast(pl.Float64, strict=False)},
        [
            _required_id("user", "userId"),
            _required_id("item", "movieId"),
            (
                pl.col("rating_value").is_null() | ~pl.col("rating_value").is_finite(),
                pl.format("rating={}: not a number", _shown("rating")),
            ),
            _timestamp_check("ts", "played_at", "timestamp"),
        ],
        origin,
    )
    base = good.select(
        pl.col("user").alias("user_id"),
        pl.col("item").alias("track_id"),
        pl.col("played_at"),
        pl.col("rating_value"),
        pl.lit("organic").alias("source"),
        pl.concat_str(pl.lit("ml:"), pl.col("user"), pl.lit(":"), pl.col("item"), pl.lit(":"), pl.col("ts")).alias(
            "key"
        ),
    )
    plays = base.with_columns(pl.lit("play").alias("event_type"), (pl.col("key") + ":play").alias("event_id"))
    likes = base.filter(pl.col("rating_value") >= 4.0).with_columns(
        pl.lit("like").alias("event_type"), (pl.col("key") + ":like").alias("event_id")
    )
    events = conform(pl.concat([plays, likes]), LISTENING_EVENTS_SCHEMA)
    # A rating is one input row; its like is derived, so rows_in counts ratings, and the landing
    # report's arithmetic is on events (plays + likes) — see ``import_file``.
    return ParsedChunk(
        events, pl.concat([_rejected_frame(rejected, origin), conform(bad, QUARANTINE_SCHEMA)]), chunk.size
    )


def _lastfm(chunk: LineChunk, origin: str) -> ParsedChunk:
    names = ["user", "ts", "artist_mbid", "artist_name", "track_mbid", "track_name"]
    df, rejected = _split(chunk, "\t", 6, names)
    good, bad = _typed(
        df,
        {"played_at": parse_timestamp("ts")},
        [
            _required_id("user", "userid"),
            _timestamp_check("ts", "played_at", "timestamp"),
            (
                (pl.col("track_mbid").str.strip_chars() == "") & (pl.col("track_name").str.strip_chars() == ""),
                pl.lit("track-mbid and track-name are both empty"),
            ),
        ],
        origin,
    )
    artist = (
        pl.when(pl.col("artist_mbid").str.strip_chars() != "")
        .then(pl.col("artist_mbid"))
        .otherwise(pl.col("artist_name"))
    )
    track = (
        pl.when(pl.col("track_mbid").str.strip_chars() != "")
        .then(pl.col("track_mbid"))
        .otherwise(pl.concat_str(pl.col("artist_name"), pl.lit(SEP), pl.col("track_name")))
    )
    events = good.select(
        pl.concat_str(pl.lit("lfm:"), pl.col("user"), pl.lit(":"), pl.col("ts"), pl.lit(":"), track).alias("event_id"),
        pl.col("user").alias("user_id"),
        track.alias("track_id"),
        artist.alias("artist_id"),
        pl.col("played_at"),
        pl.lit("play").alias("event_type"),
        pl.lit("organic").alias("source"),
    )
    return ParsedChunk(
        conform(events, LISTENING_EVENTS_SCHEMA),
        pl.concat([_rejected_frame(rejected, origin), conform(bad, QUARANTINE_SCHEMA)]),
        chunk.size,
    )


def _listenbrainz(chunk: LineChunk, origin: str) -> ParsedChunk:
    rejected = list(chunk.rejected)
    rows = []
    for number, line in zip(chunk.numbers, chunk.lines, strict=True):
        try:
            listen = json.loads(line)
        except json.JSONDecodeError as exc:
            rejected.append((number, f"not JSON: {exc.msg} at column {exc.colno}", line))
            continue
        if not isinstance(listen, dict):
            rejected.append((number, f"expected a JSON object, found {type(listen).__name__}", line))
            continue
        meta = listen.get("track_metadata") if isinstance(listen.get("track_metadata"), dict) else {}
        info = meta.get("additional_info") if isinstance(meta.get("additional_info"), dict) else {}
        artist_mbids = info.get("artist_mbids") or []
        rows.append(
            {
                "line_number": number,
                "original": line,
                "user": _text(listen.get("user_name", listen.get("user_id"))),
                "ts": _text(listen.get("listened_at")),
                "recording": _text(
                    info.get("recording_mbid") or listen.get("recording_msid") or info.get("recording_msid")
                ),
                "artist_name": _text(meta.get("artist_name")),
                "track_name": _text(meta.get("track_name")),
                "artist_mbid": _text(artist_mbids[0] if isinstance(artist_mbids, list) and artist_mbids else None),
                "duration": _text(
                    info.get("duration_ms") if info.get("duration_ms") is not None else info.get("duration")
                ),
                "duration_is_seconds": info.get("duration_ms") is None and info.get("duration") is not None,
            }
        )
    schema = {
        "line_number": pl.Int64, "original": pl.String, "user": pl.String, "ts": pl.String, "recording": pl.String,
        "artist_name": pl.String, "track_name": pl.String, "artist_mbid": pl.String, "duration": pl.String,
        "duration_is_seconds": pl.Boolean,
    }  # fmt: skip
    df = pl.DataFrame(rows, schema=schema)
    track = pl.coalesce(
        pl.when(pl.col("recording").str.strip_chars() != "").then(pl.col("recording")),
        pl.when(pl.col("track_name").fill_null("") != "").then(
            pl.concat_str(pl.col("artist_name").fill_null(""), pl.lit(SEP), pl.col("track_name"))
        ),
    )
    duration = parse_int("duration") * pl.when(pl.col("duration_is_seconds")).then(1000).otherwise(1)
    good, bad = _typed(
        df,
        {"played_at": parse_timestamp("ts"), "track_id": track, "track_duration_ms": duration},
        [
            _required_id("user", "user_name"),
            _timestamp_check("ts", "played_at", "listened_at"),
            (pl.col("track_id").is_null(), pl.lit("no recording_mbid, recording_msid or track_name")),
        ],
        origin,
    )
    events = good.select(
        pl.concat_str(pl.lit("lb:"), pl.col("user"), pl.lit(":"), pl.col("ts"), pl.lit(":"), pl.col("track_id")).alias(
            "event_id"
        ),
        pl.col("user").alias("user_id"),
        pl.col("track_id"),
        pl.coalesce(pl.col("artist_mbid"), pl.col("artist_name")).alias("artist_id"),
        pl.col("played_at"),
        pl.col("track_duration_ms"),
        pl.lit("play").alias("event_type"),
        pl.lit("organic").alias("source"),
    )
    return ParsedChunk(
        conform(events, LISTENING_EVENTS_SCHEMA),
        pl.concat([_rejected_frame(rejected, origin), conform(bad, QUARANTINE_SCHEMA)]),
        chunk.size,
    )


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict | list) else str(value)


CSV_REQUIRED = ("user_id", "track_id", "played_at")


def parse_mapping(text: str | None) -> dict[str, str]:
    """Parse ``event_id=id,user_id=user,…`` into {contract column: CSV column}."""
    mapping: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        target, sep, source = part.partition("=")
        target, source = target.strip(), source.strip()
        if not sep or not source:
            raise ValueError(f"--map {part!r}: expected contract_column=csv_column")
        if target not in LISTENING_EVENTS_SCHEMA:
            raise ValueError(
                f"--map {target}={source}: {target!r} is not a column of the contract "
                f"({', '.join(LISTENING_EVENTS_SCHEMA)})"
            )
        mapping[target] = source
    missing = [c for c in CSV_REQUIRED if c not in mapping]
    if missing:
        raise ValueError(f"--map must map {', '.join(missing)} (required by the contract)")
    return mapping


def _generic_csv(chunk: LineChunk, origin: str, header: list[str], mapping: Mapping[str, str]) -> ParsedChunk:
    df, rejected = _split(chunk, ",", len(header), [f"c{i}" for i in range(len(header))])
    col = {target: f"c{header.index(source)}" for target, source in mapping.items()}
    columns: dict[str, pl.Expr] = {"played_at": parse_timestamp(col["played_at"])}
    checks = [
        _required_id(col["user_id"], mapping["user_id"]),
        _required_id(col["track_id"], mapping["track_id"]),
    ]
    checks.append(_timestamp_check(col["played_at"], "played_at", mapping["played_at"]))
    for name in ("ms_played", "track_duration_ms"):
        if name in col:
            columns[name] = parse_int(col[name])
            checks.append(
                (
                    pl.col(col[name]).str.strip_chars().fill_null("").ne("") & pl.col(name).is_null(),
                    pl.format(f"{mapping[name]}={{}}: not an integer", _shown(col[name])),
                )
            )
    if "event_id" in col:
        checks.insert(0, _required_id(col["event_id"], mapping["event_id"]))
    good, bad = _typed(df, columns, checks, origin)
    text_col = {
        name: pl.col(col[name])
        for name in ("user_id", "track_id", "artist_id", "event_type", "source", "model_version", "variant")
        if name in col
    }
    event_type = text_col.get("event_type", pl.lit("play")).str.strip_chars().str.to_lowercase()
    events = good.select(
        *[expr.alias(name) for name, expr in text_col.items() if name not in ("event_type",)],
        event_type.alias("event_type"),
        *[pl.col(name) for name in columns],
        (pl.col(col["event_id"]) if "event_id" in col else pl.lit(None, pl.String)).alias("event_id_raw"),
        pl.col("line_number"),
    )
    if "source" not in text_col:
        events = events.with_columns(pl.lit("organic").alias("source"))
    digest = (
        pl.concat_str(
            pl.col("user_id"),
            pl.col("track_id"),
            pl.col("played_at").cast(pl.String),
            pl.col("event_type"),
            pl.lit(origin),
            pl.col("line_number").cast(pl.String),
            separator="\x1f",
        )
        .hash(seed=0)
        .cast(pl.String)
    )
    events = events.with_columns(pl.coalesce(pl.col("event_id_raw"), pl.lit("csv:") + digest).alias("event_id"))
    return ParsedChunk(
        conform(events, LISTENING_EVENTS_SCHEMA),
        pl.concat([_rejected_frame(rejected, origin), conform(bad, QUARANTINE_SCHEMA)]),
        chunk.size,
    )


# --- catalogue side files -----------------------------------------------------------------------


def movielens_tracks(path: Path) -> pl.DataFrame | None:
    """The catalogue from ``movies.csv`` (or ``u.item``) beside a MovieLens ratings file."""
    movies = path.with_name("movies.csv")
    if movies.exists():
        df = pl.read_csv(movies, schema_overrides={"movieId": pl.String}, infer_schema=False)
        return conform(
            df.select(
                pl.col("movieId").alias("track_id"),
                pl.col("genres").str.split("|").list.first().alias("genre"),
            ),
            TRACKS_SCHEMA,
        )
    return None


# --- the import -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportReport:
    path: str
    format: str
    batches: list[BatchReport]

    @property
    def totals(self) -> dict[str, int]:
        keys = ("rows_in", "landed", "quarantined", "duplicates")
        return {k: sum(getattr(b, k) for b in self.batches) for k in keys}


def _header(path: Path, delimiter: str = ",") -> list[str]:
    with open(path, "rb") as f:
        first = f.readline()
    if not first.strip():
        raise UnreadableFileError(f"{path}: line 1: the file is empty, expected a header line")
    try:
        text = first.decode("utf-8").lstrip("\ufeff").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise UnreadableFileError(f"{path}: line 1: the header is not UTF-8 (byte {exc.start})") from None
    return next(csv.reader([text], delimiter=delimiter))


def import_file(
    warehouse: Warehouse,
    fmt: str,
    path: Path,
    *,
    mapping: Mapping[str, str] | None = None,
    chunk_lines: int = CHUNK_LINES,
    progress: Callable[[int, int, BatchReport], None] | None = None,
) -> ImportReport:
    """Import ``path`` in format ``fmt`` into ``warehouse``, chunk by chunk.

    Args:
        warehouse: where to land the events.
        fmt: one of :data:`FORMATS`.
        path: the file.
        mapping: for ``csv``, {contract column: CSV column}.
        chunk_lines: lines per landed batch.
        progress: called with (bytes read so far, file size, the chunk's report) after each chunk.

    Raises:
        UnreadableFileError: the file is missing, empty, or its header lacks a needed column.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise UnreadableFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise UnreadableFileError(f"{path}: line 1: the file is empty")
    origin = str(path.resolve())
    skip = 0
    parse: Callable[[LineChunk], ParsedChunk]
    if fmt == "movielens":
        header = _header(path)
        if header[:2] == ["userId", "movieId"]:
            skip = 1
            if header != ["userId", "movieId", "rating", "timestamp"]:
                raise UnreadableFileError(
                    f"{path}: line 1: expected userId,movieId,rating,timestamp, found {','.join(header)}"
                )
            parse = lambda c: _movielens(c, origin, ",")  # noqa: E731
        else:
            parse = lambda c: _movielens(c, origin, "\t")  # noqa: E731
    elif fmt == "lastfm-1k":
        parse = lambda c: _lastfm(c, origin)  # noqa: E731
    elif fmt == "listenbrainz":
        parse = lambda c: _listenbrainz(c, origin)  # noqa: E731
    else:
        header = _header(path)
        mapping = dict(mapping or {})
        missing = [source for source in mapping.values() if source not in header]
        if missing:
            raise UnreadableFileError(
                f"{path}: line 1: the header has no column {', '.join(map(repr, missing))} (it has {', '.join(header)})"
            )
        skip = 1
        parse = lambda c: _generic_csv(c, origin, header, mapping)  # noqa: E731

    warehouse.init_schema()
    if fmt == "movielens" and (tracks := movielens_tracks(path)) is not None:
        warehouse.upsert_catalog(tracks=tracks)

    digest = file_digest(path)
    batches = []
    for index, chunk in enumerate(read_lines(path, skip=skip, chunk_lines=chunk_lines)):
        parsed = parse(chunk)
        # A MovieLens rating can yield two events (play and like): the batch counts events.
        rows_in = parsed.events.height + parsed.rejected.height
        report = warehouse.land_events(
            parsed.events,
            source=fmt,
            origin=origin,
            rejected=parsed.rejected,
            rows_in=rows_in,
            content_hash=f"{digest}:{chunk_lines}:{index}",
        )
        batches.append(report)
        if progress is not None:
            progress(chunk.end_offset, size, report)
    if not batches:
        raise UnreadableFileError(f"{path}: line {skip + 1}: no data lines after the header")
    return ImportReport(str(path), fmt, batches)
