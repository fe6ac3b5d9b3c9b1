"""The preparation steps of ``recsys_assets.data.cleaning`` and ``.features``, written with pandas.

Only the benchmark uses this: it is the peer that ``benchmarks/prep.py`` measures polars against. It
implements the same rules in the same order and must produce the same row counts (the benchmark
checks). pandas runs with ``future.infer_string`` (pyarrow-backed strings, pandas 3's default), its
fastest configuration for this kind of data.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd

from recsys_assets.data.cleaning import CleaningRules
from recsys_assets.data.features import LIKE_WEIGHT, genre_column
from recsys_core.contracts import EVENT_TYPES, POSITIVE_EVENT_TYPES, SOURCES

pd.options.future.infer_string = True


def clean_events(raw: pd.DataFrame, tracks: pd.DataFrame, users: pd.DataFrame, now: datetime, rules: CleaningRules):
    df = raw.copy()
    for col in ("event_id", "user_id", "track_id", "artist_id"):
        df[col] = df[col].str.strip()
    df["event_type"] = df["event_type"].str.strip().str.lower()
    df["source"] = df["source"].str.strip().str.lower().fillna("organic")

    deduped = df.drop_duplicates("event_id", keep="first")
    duplicates = (df.groupby("batch_id").size() - deduped.groupby("batch_id").size()).fillna(0)
    duplicates = duplicates[duplicates > 0]

    now_ts = pd.Timestamp(now)
    checks = [
        deduped["event_id"].isna() | (deduped["event_id"] == ""),
        deduped["user_id"].isna() | (deduped["user_id"] == ""),
        deduped["track_id"].isna() | (deduped["track_id"] == ""),
        deduped["event_type"].isna() | ~deduped["event_type"].isin(EVENT_TYPES),
        deduped["source"].notna() & ~deduped["source"].isin(SOURCES),
        deduped["played_at"].isna(),
        deduped["played_at"] < pd.Timestamp(rules.earliest),
        deduped["played_at"] > now_ts + rules.future_tolerance,
        deduped["ms_played"] < 0,
        deduped["ms_played"] > rules.max_ms_played,
        deduped["track_duration_ms"] <= 0,
    ]
    checks = [c.fillna(False).astype(bool) for c in checks]
    failed = np.zeros(len(deduped), dtype=bool)
    reason = pd.Series(pd.NA, index=deduped.index, dtype="string")
    labels = [
        lambda d: "event_id is empty",
        lambda d: "user_id is empty",
        lambda d: "track_id is empty",
        lambda d: "event_type=" + d["event_type"].fillna("null") + ": not one of " + ", ".join(EVENT_TYPES),
        lambda d: "source=" + d["source"] + ": not one of " + ", ".join(SOURCES),
        lambda d: "played_at is empty",
        lambda d: "played_at=" + d["played_at"].dt.strftime("%Y-%m-%dT%H:%M:%SZ") + ": before 2000-01-01",
        lambda d: "played_at=" + d["played_at"].dt.strftime("%Y-%m-%dT%H:%M:%SZ") + ": in the future",
        lambda d: "ms_played=" + d["ms_played"].astype("string") + ": negative",
        lambda d: "ms_played=" + d["ms_played"].astype("string") + ": absurd",
        lambda d: "track_duration_ms=" + d["track_duration_ms"].astype("string") + ": not positive",
    ]
    for mask, label in zip(checks, labels, strict=True):
        first = mask.to_numpy() & ~failed
        if first.any():
            hit = deduped[first]
            text = label(hit)
            reason[first] = text
        failed |= first
    quarantined = deduped[failed].assign(reason=reason[failed], stage="cleaning")

    good = deduped[~failed]
    catalogue = tracks.rename(columns={"artist_id": "_cat_artist", "duration_ms": "_cat_duration"})[
        ["track_id", "_cat_artist", "genre", "_cat_duration"]
    ]
    enriched = good.merge(catalogue, on="track_id", how="left")
    enriched["known_track"] = enriched["_cat_duration"].notna() | enriched["_cat_artist"].notna()
    enriched["known_user"] = enriched["user_id"].isin(users["user_id"])
    enriched["artist_id"] = enriched["artist_id"].fillna(enriched["_cat_artist"])
    enriched["track_duration_ms"] = enriched["track_duration_ms"].fillna(enriched["_cat_duration"])
    enriched["genre"] = enriched["genre"].fillna("unknown")
    over = (enriched["ms_played"] > enriched["track_duration_ms"]).fillna(False).astype(bool)
    enriched["ms_clipped"] = over
    enriched["ms_played"] = enriched["ms_played"].where(~over, enriched["track_duration_ms"])
    enriched["completion"] = enriched["ms_played"] / enriched["track_duration_ms"]
    enriched = enriched.drop(columns=["_cat_artist", "_cat_duration"])

    listening = enriched[enriched["event_type"].isin(["play", "skip"])]
    per_hour = listening.groupby(["user_id", listening["played_at"].dt.floor("h")]).size()
    bots = per_hour[per_hour > rules.bot_plays_per_hour].index.get_level_values(0).unique()
    enriched["suspected_bot"] = enriched["user_id"].isin(bots)
    return enriched, quarantined, duplicates


def top_genres(clean: pd.DataFrame, limit: int = 24) -> list[str]:
    plays = clean[clean["event_type"] == "play"]
    counts = plays.groupby("genre").size().reset_index(name="n")
    counts = counts.sort_values(["n", "genre"], ascending=[False, True]).head(limit)
    return counts["genre"].tolist()


def user_features(clean: pd.DataFrame, genres: list[str]) -> pd.DataFrame:
    reference = clean["played_at"].max()
    d = clean.assign(
        play=clean["event_type"] == "play",
        skip=clean["event_type"] == "skip",
        like=clean["event_type"] == "like",
        dislike=clean["event_type"] == "dislike",
    )
    d["listen"] = d["play"] | d["skip"]
    g = d.groupby("user_id", sort=True)
    out = pd.DataFrame(
        {
            "plays": g["play"].sum(),
            "skips": g["skip"].sum(),
            "likes": g["like"].sum(),
            "dislikes": g["dislike"].sum(),
            "first_played_at": g["played_at"].min(),
            "last_played_at": g["played_at"].max(),
            "suspected_bot": g["suspected_bot"].any(),
        }
    )
    out["skip_rate"] = out["skips"] / g["listen"].sum().clip(lower=1)
    out["completion_mean"] = d[d["listen"]].groupby("user_id")["completion"].mean()
    out["distinct_tracks"] = d[d["play"]].groupby("user_id")["track_id"].nunique()
    out["distinct_tracks"] = out["distinct_tracks"].fillna(0)
    out["active_days"] = d.assign(day=d["played_at"].dt.date).groupby("user_id")["day"].nunique()
    plays = d[d["play"]]
    by_genre = plays.groupby(["user_id", "genre"]).size().unstack(fill_value=0)
    totals = out["plays"].clip(lower=1)
    for genre in genres:
        column = by_genre[genre] if genre in by_genre.columns else 0
        out[genre_column(genre)] = (column / totals).fillna(0.0) if genre in by_genre.columns else 0.0
    others = [c for c in by_genre.columns if c not in genres]
    out["genre_share__other"] = (by_genre[others].sum(axis=1) / totals).fillna(0.0) if others else 0.0
    out["recency_days"] = (reference - out["last_played_at"]).dt.total_seconds() / 86400.0
    out["plays_per_active_day"] = out["plays"] / out["active_days"].clip(lower=1)
    return out.reset_index()


def track_features(clean: pd.DataFrame) -> pd.DataFrame:
    d = clean.assign(
        play=clean["event_type"] == "play", skip=clean["event_type"] == "skip", like=clean["event_type"] == "like"
    )
    d["listen"] = d["play"] | d["skip"]
    g = d.groupby("track_id", sort=True)
    out = pd.DataFrame(
        {
            "artist_id": g["artist_id"].first(),
            "genre": g["genre"].first(),
            "plays": g["play"].sum(),
            "skips": g["skip"].sum(),
            "likes": g["like"].sum(),
            "last_played_at": g["played_at"].max(),
            "known_track": g["known_track"].all(),
        }
    )
    out["listeners"] = d[d["play"]].groupby("track_id")["user_id"].nunique()
    out["listeners"] = out["listeners"].fillna(0)
    out["skip_rate"] = out["skips"] / g["listen"].sum().clip(lower=1)
    out["completion_mean"] = d[d["listen"]].groupby("track_id")["completion"].mean()
    artists = d[d["artist_id"].notna()]
    a = pd.DataFrame(
        {
            "artist_plays": artists.groupby("artist_id")["play"].sum(),
            "artist_listeners": artists[artists["play"]].groupby("artist_id")["user_id"].nunique(),
        }
    )
    out = out.reset_index().merge(a, left_on="artist_id", right_index=True, how="left")
    out["popularity"] = out["plays"] / max(out["plays"].sum(), 1)
    out["popularity_rank"] = (out["plays"].rank(method="average") - 1) / max(len(out) - 1, 1)
    return out


def training_interactions(clean: pd.DataFrame) -> pd.DataFrame:
    positives = clean[clean["event_type"].isin(POSITIVE_EVENT_TYPES) & ~clean["suspected_bot"]].copy()
    positives["weight"] = np.where(
        positives["event_type"] == "like", LIKE_WEIGHT, positives["completion"].fillna(1.0).clip(0.0, 1.0)
    )
    positives["liked"] = positives["event_type"] == "like"
    positives["organic"] = positives["source"] != "recommendation"
    out = positives.groupby(["user_id", "track_id", "played_at"], sort=False).agg(
        weight=("weight", "sum"), liked=("liked", "any"), organic=("organic", "all")
    )
    return out.reset_index()
