"""A seeded simulator of listening behaviour: the embedded default's data source.

The world (see DESIGN.md, "The simulator"):

- genres have centroids in a latent taste space; artists sit near their genre, tracks near their
  artist; every vector is unit length, so a user's affinity for a track is a cosine in [-1, 1];
- track popularity is long-tailed (log-normal), and drives which tracks a user comes across;
- users like one to three genres (a Dirichlet mix) and differ in activity (sessions per day);
- a session is a run of consecutive plays; a user picks the next track among the tracks they come
  across with probability rising with affinity (softmax), completes it or skips it depending on the
  affinity, sometimes likes what they completed and dislikes what they skipped;
- the catalogue grows: new tracks are released every week of the history (and at drift time);
- within a session, taste moves with what the user just played: the session's first play sets its
  mood (a genre), whose tracks the rest of the session prefers (``Behaviour.session_focus``); the
  world remembers each user's latest mood, and the click model uses it;
- drift: ``taste_shift`` pulls every user's taste towards one trending genre, ``new_genre`` adds a
  genre with its own artists and tracks that a share of users take to.

Because the simulator knows every user's taste, :meth:`World.click_probability` answers "would this
user click this recommended track?" with a probability: the simulated CTR of the evaluation report
and the click model of the traffic simulator.

Everything is deterministic for a seed and an end time. Generation is vectorised with numpy, per
block of users and week, and yields polars frames in the listening-events contract.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from recsys_core.contracts import LISTENING_EVENTS_SCHEMA, TRACKS_SCHEMA, USERS_SCHEMA, conform

log = logging.getLogger(__name__)

GENRES = (
    "pop", "rock", "hip-hop", "electronic", "r&b", "indie", "latin", "jazz",
    "classical", "country", "metal", "folk", "k-pop", "reggae", "blues", "soul",
)  # fmt: skip
NEW_GENRE = "hyperpop"
COUNTRIES = ("US", "GB", "DE", "FR", "BR", "MX", "SE", "JP", "KR", "IN", "ES", "NL")
COUNTRY_WEIGHTS = (0.28, 0.1, 0.1, 0.08, 0.1, 0.06, 0.04, 0.06, 0.04, 0.06, 0.04, 0.04)

DIM = 16
POOL_POPULAR = 160  # tracks a user comes across by popularity, per week
POOL_GENRE = 96  # tracks a user comes across in the genres they like, per week
USER_BLOCK = 2048
# Hour-of-day weights of session starts (UTC): quiet nights, a commute bump, busy evenings.
HOUR_WEIGHTS = np.array([2, 1, 1, 1, 1, 2, 4, 7, 8, 6, 5, 5, 6, 6, 5, 5, 6, 8, 9, 10, 10, 9, 7, 4], dtype=np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ids(prefix: str, idx: np.ndarray, width: int) -> pl.Series:
    """``u000042``-style ids (polars formats millions of them far faster than numpy)."""
    return pl.select(pl.lit(prefix) + pl.Series(idx).cast(pl.String).str.zfill(width)).to_series()


def _jitter(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """Gaussian noise whose norm is about ``scale`` (the vectors it perturbs have norm 1)."""
    return scale * rng.normal(size=(n, DIM)) / math.sqrt(DIM)


@dataclass(frozen=True)
class Behaviour:
    """The constants of the behaviour model (documented so that results can be reproduced)."""

    choice_temperature: float = 7.0  # softmax sharpness of picking a track by affinity
    complete_slope: float = 9.0  # P(complete) = sigmoid(slope * (affinity - complete_mid))
    complete_mid: float = 0.15
    like_rate: float = 0.25  # P(like | completed) = like_rate * sigmoid(6 * (affinity - 0.4))
    dislike_rate: float = 0.08  # P(dislike | skipped)
    click_slope: float = 7.0  # P(click) = sigmoid(slope * (affinity - click_mid) + pop * popularity_z)
    click_mid: float = 0.45
    click_popularity: float = 0.2
    mean_session_length: float = 8.0
    mean_sessions_per_day: float = 0.8
    # The short-term taste: within a session, tracks of the genre of its first play get this much more
    # affinity when the user picks the next track (completing and liking stay by the long-term taste),
    # and the click model gives the bonus to the genre of the user's latest session. A model that sees
    # the last plays can follow it; a static one cannot.
    session_focus: float = 0.2


@dataclass(frozen=True)
class Drift:
    """A change of behaviour from ``at`` on.

    Args:
        taste_shift: in [0, 1], how far every user's taste moves towards the trending genre.
        new_genre: in [0, 1], the share of users who take to a new genre (its tracks are added).
    """

    taste_shift: float = 0.0
    new_genre: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> Drift | None:
        """Parse ``taste_shift=0.5,new_genre=0.3`` (the CLI's ``--drift``)."""
        if not text:
            return None
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, raw = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(f"--drift {text!r}: expected taste_shift=X,new_genre=Y, got {part!r}")
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"--drift {key}={raw!r} is not a number") from None
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--drift {key}={value} is outside [0, 1]")
            values[key] = value
        return cls(**values)

    @property
    def active(self) -> bool:
        return self.taste_shift > 0 or self.new_genre > 0


@dataclass
class WorldState:
    """What changes as the world is simulated: persisted with the world."""

    events_generated: int = 0
    stream_batches: int = 0
    last_event_at: str | None = None
    drifts: list[dict] = field(default_factory=list)


class World:
    """The simulated users, catalogue and tastes; see the module docstring.

    Build one with :meth:`World.create`, persist it with :meth:`save` and :meth:`load`.
    """

    def __init__(self, *, seed: int, arrays: dict[str, np.ndarray], genres: list[str], state: WorldState,
                 behaviour: Behaviour | None = None):  # fmt: skip
        self.seed = seed
        self.a = arrays
        self.genres = genres
        self.state = state
        self.behaviour = behaviour or Behaviour()

    # --- creation and persistence -------------------------------------------------------------

    @classmethod
    def create(cls, *, users: int, tracks: int, seed: int, start: datetime, end: datetime) -> World:
        """A new world whose catalogue grows between ``start`` and ``end``.

        Args:
            users: number of users.
            tracks: number of tracks at ``end`` (about 80% exist before ``start``).
            seed: the seed; the same arguments give the same world.
            start: beginning of the listening history.
            end: end of the listening history.
        """
        if users < 1 or tracks < 1:
            raise ValueError(f"the world needs at least one user and one track (users={users}, tracks={tracks})")
        rng = np.random.default_rng([seed, 0])
        n_genres = len(GENRES)
        genre_vec = _unit(rng.normal(size=(n_genres, DIM)))
        genre_share = rng.dirichlet(np.full(n_genres, 1.5))

        n_artists = max(1, tracks // 8)
        artist_genre = rng.choice(n_genres, size=n_artists, p=genre_share)
        artist_vec = _unit(genre_vec[artist_genre] + _jitter(rng, n_artists, 0.7))
        artist_pop = rng.normal(0.0, 1.0, size=n_artists)

        # Prolific artists have more tracks: a Zipf-like draw of the artist of each track.
        artist_weight = 1.0 / np.arange(1, n_artists + 1) ** 0.6
        track_artist = rng.choice(n_artists, size=tracks, p=artist_weight / artist_weight.sum())
        track_vec = _unit(artist_vec[track_artist] + _jitter(rng, tracks, 0.5))
        track_pop = artist_pop[track_artist] + rng.normal(0.0, 1.2, size=tracks)
        duration_ms = np.clip(rng.lognormal(math.log(215_000), 0.28, size=tracks), 45_000, 900_000).astype(np.int64)
        # 80% of the catalogue predates the history; the rest comes out week by week.
        span = (end - start).total_seconds()
        old = rng.random(tracks) < 0.8
        release_s = np.where(
            old,
            start.timestamp() - rng.uniform(0, 15 * 365 * 86400, size=tracks),
            start.timestamp() + np.floor(rng.uniform(0, max(span, 1), size=tracks) / (7 * 86400)) * 7 * 86400,
        )

        taste = rng.dirichlet(np.full(n_genres, 0.25), size=users)
        user_vec = _unit(taste @ genre_vec + _jitter(rng, users, 0.6))
        activity = rng.lognormal(math.log(Behaviour.mean_sessions_per_day) - 0.32, 0.8, size=users)
        country = rng.choice(len(COUNTRIES), size=users, p=np.array(COUNTRY_WEIGHTS) / sum(COUNTRY_WEIGHTS))
        signup_s = start.timestamp() - rng.uniform(0, 5 * 365 * 86400, size=users)

        arrays = {
            "genre_vec": genre_vec,
            "artist_genre": artist_genre,
            "artist_vec": artist_vec,
            "track_artist": track_artist,
            "track_vec": track_vec,
            "track_pop": track_pop,
            "duration_ms": duration_ms,
            "release_s": release_s,
            "user_vec": user_vec,
            "user_taste": taste,
            "activity": activity,
            "country": country,
            "signup_s": signup_s,
            "trending_genre": np.array([int(rng.integers(n_genres))]),
        }
        return cls(seed=seed, arrays=arrays, genres=list(GENRES), state=WorldState())

    def save(self, directory: Path) -> None:
        """Write the world to ``directory`` (``world.npz`` and ``world.json``), atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "world.tmp.npz"
        np.savez(tmp, **self.a)
        tmp.replace(directory / "world.npz")
        meta = {
            "seed": self.seed,
            "genres": self.genres,
            "state": asdict(self.state),
            "behaviour": asdict(self.behaviour),
        }
        tmp_json = directory / "world.json.tmp"
        tmp_json.write_text(json.dumps(meta, indent=2))
        tmp_json.replace(directory / "world.json")

    @classmethod
    def load(cls, directory: Path) -> World:
        """Read a world saved by :meth:`save`."""
        meta_path = directory / "world.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no simulated world in {directory}: run `recsys data simulate` first")
        meta = json.loads(meta_path.read_text())
        with np.load(directory / "world.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls(
            seed=meta["seed"],
            arrays=arrays,
            genres=meta["genres"],
            state=WorldState(**meta["state"]),
            behaviour=Behaviour(**meta["behaviour"]),
        )

    # --- the catalogue ------------------------------------------------------------------------

    @property
    def n_users(self) -> int:
        return len(self.a["user_vec"])

    @property
    def n_tracks(self) -> int:
        return len(self.a["track_vec"])

    @staticmethod
    def user_id(idx: np.ndarray) -> pl.Series:
        return _ids("u", idx, 6)

    @staticmethod
    def track_id(idx: np.ndarray) -> pl.Series:
        return _ids("t", idx, 7)

    @staticmethod
    def artist_id(idx: np.ndarray) -> pl.Series:
        return _ids("a", idx, 6)

    def tracks_frame(self) -> pl.DataFrame:
        """The catalogue's tracks in the ``tracks`` contract."""
        idx = np.arange(self.n_tracks)
        artist = self.a["track_artist"]
        release = (self.a["release_s"] // 86400).astype("datetime64[D]")
        df = pl.DataFrame(
            {
                "track_id": self.track_id(idx),
                "artist_id": self.artist_id(artist),
                "genre": np.array(self.genres, dtype=object)[self.a["artist_genre"][artist]],
                "duration_ms": self.a["duration_ms"],
                "release_date": release,
            }
        )
        return conform(df, TRACKS_SCHEMA)

    def users_frame(self) -> pl.DataFrame:
        """The users in the ``users`` contract."""
        idx = np.arange(self.n_users)
        df = pl.DataFrame(
            {
                "user_id": self.user_id(idx),
                "country": np.array(COUNTRIES, dtype=object)[self.a["country"]],
                "signup_date": (self.a["signup_s"] // 86400).astype("datetime64[D]"),
            }
        )
        return conform(df, USERS_SCHEMA)

    # --- the click model ----------------------------------------------------------------------

    def _indices(self, ids: np.ndarray | list[str], prefix: str, size: int) -> np.ndarray:
        """Indices of simulator ids (``u000042`` → 42); -1 for ids the simulator did not make."""
        s = pl.Series(list(ids) if not isinstance(ids, pl.Series) else ids, dtype=pl.String)
        idx = pl.when(s.str.starts_with(prefix)).then(s.str.slice(1).cast(pl.Int64, strict=False)).otherwise(None)
        out = pl.select(idx.fill_null(-1)).to_series().to_numpy().copy()
        out[(out < 0) | (out >= size)] = -1
        return out

    def affinity(self, user_ids, track_ids) -> np.ndarray:
        """Cosine affinity of each (user, track) pair; NaN where either id is not the simulator's."""
        u = self._indices(user_ids, "u", self.n_users)
        t = self._indices(track_ids, "t", self.n_tracks)
        out = np.full(len(u), np.nan)
        ok = (u >= 0) & (t >= 0)
        out[ok] = np.einsum("ij,ij->i", self.a["user_vec"][u[ok]], self.a["track_vec"][t[ok]])
        return out

    def track_genre(self, tracks: np.ndarray) -> np.ndarray:
        return self.a["artist_genre"][self.a["track_artist"][tracks]]

    def mood_bonus(self, users: np.ndarray, tracks: np.ndarray) -> np.ndarray:
        """``session_focus`` where the track is of the genre of the user's latest session, else 0
        (indices ≥ 0)."""
        mood = self.a.get("user_mood")
        if mood is None or not self.behaviour.session_focus:
            return np.zeros(len(users))
        return self.behaviour.session_focus * (self.track_genre(tracks) == mood[users])

    def click_probability(self, user_ids, track_ids) -> np.ndarray:
        """The true probability that each user clicks each recommended track (NaN if unknown): by the
        user's long-term taste, the mood of their latest session, and the track's popularity."""
        b = self.behaviour
        aff = self.affinity(user_ids, track_ids)
        t = self._indices(track_ids, "t", self.n_tracks)
        u = self._indices(user_ids, "u", self.n_users)
        ok = (u >= 0) & (t >= 0)
        aff[ok] += self.mood_bonus(u[ok], t[ok])
        pop_z = np.zeros(len(t))
        known = t >= 0
        pop = self.a["track_pop"]
        pop_z[known] = (pop[t[known]] - pop.mean()) / (pop.std() or 1.0)
        return _sigmoid(b.click_slope * (aff - b.click_mid) + b.click_popularity * pop_z)

    # --- drift --------------------------------------------------------------------------------

    def apply_drift(self, drift: Drift, at: datetime) -> None:
        """Change tastes (and the catalogue) as ``drift`` says, from ``at`` on."""
        rng = np.random.default_rng([self.seed, 7, len(self.state.drifts)])
        a = self.a
        if drift.new_genre > 0:
            if NEW_GENRE not in self.genres:
                self.genres.append(NEW_GENRE)
                new_vec = _unit(rng.normal(size=(1, DIM)))
                a["genre_vec"] = np.vstack([a["genre_vec"], new_vec])
                a["user_taste"] = np.hstack([a["user_taste"], np.zeros((self.n_users, 1))])
            g = self.genres.index(NEW_GENRE)
            n_artists = max(1, len(a["artist_vec"]) // 10)
            n_tracks = max(1, self.n_tracks // 10)
            first_artist = len(a["artist_vec"])
            new_artist_vec = _unit(a["genre_vec"][g] + _jitter(rng, n_artists, 0.5))
            track_artist = first_artist + rng.integers(n_artists, size=n_tracks)
            all_artist_vec = np.vstack([a["artist_vec"], new_artist_vec])
            a["artist_vec"] = all_artist_vec
            a["artist_genre"] = np.concatenate([a["artist_genre"], np.full(n_artists, g)])
            a["track_artist"] = np.concatenate([a["track_artist"], track_artist])
            new_track_vec = _unit(all_artist_vec[track_artist] + _jitter(rng, n_tracks, 0.4))
            a["track_vec"] = np.vstack([a["track_vec"], new_track_vec])
            a["track_pop"] = np.concatenate([a["track_pop"], rng.normal(1.0, 1.0, size=n_tracks)])
            a["duration_ms"] = np.concatenate(
                [
                    a["duration_ms"],
                    np.clip(rng.lognormal(math.log(160_000), 0.25, size=n_tracks), 45_000, 900_000).astype(np.int64),
                ]
            )
            a["release_s"] = np.concatenate([a["release_s"], np.full(n_tracks, at.timestamp())])
            converts = rng.random(self.n_users) < drift.new_genre
            a["user_vec"][converts] = _unit(0.35 * a["user_vec"][converts] + 0.65 * a["genre_vec"][g])
            a["user_taste"][converts] *= 0.35
            a["user_taste"][converts, g] += 0.65
        if drift.taste_shift > 0:
            g = int(a["trending_genre"][0])
            s = drift.taste_shift
            a["user_vec"] = _unit((1 - s) * a["user_vec"] + s * a["genre_vec"][g])
            a["user_taste"] = (1 - s) * a["user_taste"]
            a["user_taste"][:, g] += s
        self.state.drifts.append({**asdict(drift), "at": at.isoformat()})

    # --- generation ---------------------------------------------------------------------------

    def _week_pools(self, released: np.ndarray):
        """Per-week sampling tables: popularity CDF over released tracks, and per-genre CDFs."""
        a = self.a
        ids = np.flatnonzero(released)
        weight = np.exp(a["track_pop"][ids])
        pop_cdf = np.cumsum(weight / weight.sum())
        genre_of = a["artist_genre"][a["track_artist"][ids]]
        order = np.argsort(genre_of, kind="stable")
        by_genre = ids[order]
        g_sorted = genre_of[order]
        n_genres = len(self.genres)
        starts = np.searchsorted(g_sorted, np.arange(n_genres), side="left")
        ends = np.searchsorted(g_sorted, np.arange(n_genres), side="right")
        w = np.exp(a["track_pop"][by_genre])
        # CDF within each genre's slice, as one array (each slice ends at 1).
        csum = np.cumsum(w)
        base = np.where(starts > 0, csum[np.maximum(starts - 1, 0)], 0.0)
        totals = np.where(ends > starts, csum[np.maximum(ends - 1, 0)] - base, 0.0)
        seg = np.repeat(np.arange(n_genres), ends - starts)
        genre_cdf = (csum - base[seg]) / np.where(totals[seg] > 0, totals[seg], 1.0)
        return ids, pop_cdf, by_genre, genre_cdf, starts, ends, totals > 0

    def generate(
        self,
        start: datetime,
        end: datetime,
        *,
        user_fraction: float = 1.0,
        id_prefix: str | None = None,
    ) -> Iterator[pl.DataFrame]:
        """Yield the listening events of ``[start, end)`` in blocks, in the listening-events contract.

        Args:
            start: first instant.
            end: end instant (excluded).
            user_fraction: expected share of each user's activity to simulate (the stream uses a
                fraction so that a short window is not dominated by session starts).
            id_prefix: prefix of the event ids; defaults to ``sim{seed}-``.
        """
        a = self.a
        prefix = id_prefix if id_prefix is not None else f"sim{self.seed}-"
        week = 7 * 86400.0
        t0, t1 = start.timestamp(), end.timestamp()
        # Absolute calendar weeks: a user's weekly pool of tracks is the same whether the week is
        # simulated in one go (history) or a few minutes at a time (the stream).
        first_week = np.floor(t0 / week) * week
        for w_index, week_start in enumerate(np.arange(first_week, t1, week)):
            ws, we = max(week_start, t0), min(week_start + week, t1)
            if we <= ws:
                continue
            released = a["release_s"] <= ws + 1e-6
            if not released.any():
                continue
            ids, pop_cdf, by_genre, genre_cdf, g_start, g_end, g_ok = self._week_pools(released)
            days = (we - ws) / 86400.0
            for first in range(0, self.n_users, USER_BLOCK):
                users = np.arange(first, min(first + USER_BLOCK, self.n_users))
                pool_rng = np.random.default_rng([self.seed, 1, int(week_start), first])
                rng = np.random.default_rng([self.seed, 2, int(ws * 1000), first])
                frame = self._block(
                    pool_rng,
                    rng,
                    users,
                    ws,
                    we,
                    days * user_fraction,
                    ids,
                    pop_cdf,
                    by_genre,
                    genre_cdf,
                    g_start,
                    g_end,
                    g_ok,
                )
                if frame is None:
                    continue
                n = frame.height
                start_n = self.state.events_generated
                self.state.events_generated += n
                frame = frame.with_columns(
                    (pl.lit(prefix) + (pl.int_range(start_n, start_n + n)).cast(pl.String)).alias("event_id")
                )
                log.debug("week %d users %d..%d: %d events", w_index, users[0], users[-1], n)
                yield conform(frame, LISTENING_EVENTS_SCHEMA)
        self.state.last_event_at = end.isoformat()

    def _block(self, pool_rng, rng, users, ws, we, days, ids, pop_cdf, by_genre, genre_cdf, g_start, g_end, g_ok):
        b = self.behaviour
        a = self.a
        n_u = len(users)
        n_sessions = rng.poisson(a["activity"][users] * days)
        total_sessions = int(n_sessions.sum())
        if total_sessions == 0:
            return None
        session_user = np.repeat(np.arange(n_u), n_sessions)
        session_len = 1 + rng.geometric(1.0 / b.mean_session_length, size=total_sessions) - 1
        session_len = np.maximum(session_len, 1)
        if we - ws >= 86400:
            # Session starts: a uniform day in the window, an hour by the diurnal profile.
            day = np.floor(rng.uniform(0, (we - ws) / 86400.0, size=total_sessions))
            hour = rng.choice(24, size=total_sessions, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
            session_start = ws + day * 86400 + hour * 3600 + rng.uniform(0, 3600, size=total_sessions)
        else:  # a window shorter than a day (the stream): uniform within it
            session_start = rng.uniform(ws, we, size=total_sessions)

        # Candidate pools: popular tracks, plus popular tracks of the genres each user likes.
        pool_pop = ids[np.minimum(np.searchsorted(pop_cdf, pool_rng.random((n_u, POOL_POPULAR))), len(ids) - 1)]
        taste = a["user_taste"][users][:, : len(g_ok)] * g_ok
        taste = taste / np.maximum(taste.sum(axis=1, keepdims=True), 1e-12)
        cum_taste = np.cumsum(taste, axis=1)
        pick_genre = (pool_rng.random((n_u, POOL_GENRE))[:, :, None] > cum_taste[:, None, :]).sum(axis=2)
        pick_genre = np.minimum(pick_genre, len(g_ok) - 1)
        lo, hi = g_start[pick_genre], g_end[pick_genre]
        # Inverse CDF within the genre slice: search the global array restricted to [lo, hi).
        u = pool_rng.random((n_u, POOL_GENRE))
        offset_cdf = genre_cdf + np.repeat(np.arange(len(g_start)), g_end - g_start)
        pos = np.searchsorted(offset_cdf, pick_genre + u)
        pos = np.clip(pos, lo, np.maximum(hi - 1, lo))
        pool_genre = np.where(hi > lo, by_genre[np.minimum(pos, len(by_genre) - 1)], pool_pop[:, :POOL_GENRE])
        pool = np.concatenate([pool_pop, pool_genre], axis=1)

        aff = np.einsum("ud,upd->up", a["user_vec"][users], a["track_vec"][pool])
        logits = b.choice_temperature * aff
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(prob, axis=1)
        cdf /= cdf[:, -1:]

        # One pick per play: the user's pool CDF, searched in one flat, row-offset array.
        play_session = np.repeat(np.arange(total_sessions), session_len)
        play_user = session_user[play_session]
        n_plays = len(play_session)
        first_of_session = np.concatenate([[0], np.cumsum(session_len)[:-1]])
        draws = rng.random(n_plays)
        flat = (cdf + np.arange(n_u)[:, None]).ravel()
        picks = np.searchsorted(flat, play_user + draws) - play_user * pool.shape[1]
        picks = np.clip(picks, 0, pool.shape[1] - 1)
        track = pool[play_user, picks]
        play_aff = aff[play_user, picks]
        if b.session_focus:
            # The session's mood: the genre of its first play. The later plays are drawn again (same
            # uniforms) from the session's pool CDF with the mood's bonus.
            mood = self.track_genre(track[first_of_session])
            session_aff = aff[session_user] + b.session_focus * (self.track_genre(pool[session_user]) == mood[:, None])
            logits = b.choice_temperature * session_aff
            prob = np.exp(logits - logits.max(axis=1, keepdims=True))
            session_cdf = np.cumsum(prob, axis=1)
            session_cdf /= session_cdf[:, -1:]
            later = np.ones(n_plays, dtype=bool)
            later[first_of_session] = False
            s_flat = (session_cdf + np.arange(total_sessions)[:, None]).ravel()
            at = play_session[later]
            later_picks = np.clip(np.searchsorted(s_flat, at + draws[later]) - at * pool.shape[1], 0, pool.shape[1] - 1)
            picks[later] = later_picks
            track = pool[play_user, picks]
            play_aff = aff[play_user, picks]  # completing and liking stay by the long-term taste
            # The world remembers each user's latest mood (the click model's short-term taste).
            latest = np.lexsort((session_start, session_user))
            last_of_user = latest[np.r_[session_user[latest][1:] != session_user[latest][:-1], True]]
            a.setdefault("user_mood", np.full(self.n_users, -1, dtype=np.int64))[users[session_user[last_of_user]]] = (
                mood[last_of_user]
            )

        complete = rng.random(n_plays) < _sigmoid(b.complete_slope * (play_aff - b.complete_mid))
        duration = a["duration_ms"][track]
        ms = np.where(
            complete,
            (duration * rng.uniform(0.92, 1.0, size=n_plays)).astype(np.int64),
            np.minimum(duration, rng.integers(3_000, 35_000, size=n_plays)),
        )
        # Consecutive plays: each starts when the previous one ended, plus a short gap.
        step = (ms + rng.integers(500, 4000, size=n_plays)) / 1000.0
        before = np.cumsum(step) - step
        session_offset = before - before[first_of_session][play_session]
        played_at = session_start[play_session] + session_offset
        keep = played_at < we
        like = complete & (rng.random(n_plays) < b.like_rate * _sigmoid(6 * (play_aff - 0.4)))
        dislike = ~complete & (rng.random(n_plays) < b.dislike_rate)

        user_idx = users[play_user]
        main = {
            "user": user_idx[keep],
            "track": track[keep],
            "at": played_at[keep],
            "ms": ms[keep],
            "type": np.where(complete, 0, 1)[keep],
        }
        extra_mask = (like | dislike) & (played_at + ms / 1000.0 < we)
        extra = {
            "user": user_idx[extra_mask],
            "track": track[extra_mask],
            "at": played_at[extra_mask] + ms[extra_mask] / 1000.0,
            "ms": np.zeros(int(extra_mask.sum()), dtype=np.int64),
            "type": np.where(like[extra_mask], 2, 3),
        }
        cols = {k: np.concatenate([main[k], extra[k]]) for k in main}
        order = np.argsort(cols["at"], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        types = np.array(["play", "skip", "like", "dislike"], dtype=object)
        return pl.DataFrame(
            {
                "user_id": self.user_id(cols["user"]),
                "track_id": self.track_id(cols["track"]),
                "artist_id": self.artist_id(a["track_artist"][cols["track"]]),
                "played_at": (cols["at"] * 1e6).astype("datetime64[us]"),
                "ms_played": cols["ms"],
                "track_duration_ms": a["duration_ms"][cols["track"]],
                "event_type": types[cols["type"]],
                "source": "organic",
            }
        ).with_columns(pl.col("played_at").dt.replace_time_zone("UTC"))


def default_end() -> datetime:
    """Today at 00:00 UTC: simulations of the same day and seed are identical."""
    today = date.today()
    return datetime(today.year, today.month, today.day, tzinfo=UTC)


def history_bounds(days: int, end: datetime | None = None) -> tuple[datetime, datetime]:
    end = end or default_end()
    return end - timedelta(days=days), end
