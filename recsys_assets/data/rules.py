"""The preparation's rules, written once for every engine (no polars, no Spark here).

The cleaning runs on polars (``data.cleaning``, the embedded default) or on Apache Spark
(``data.spark_prep``, through Dagster Pipes). Both compile the specification below into their own
expressions: the contract's rules and their messages, how a value is shown in a message, the
category of a reason, the bot rule and the weights of the training positives. A parity test on
generated data (``recsys_assets_tests/data/test_spark_parity.py``) holds the two compilations together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from recsys_core.contracts import EVENT_TYPES, POSITIVE_EVENT_TYPES, SOURCES

EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)

# What normalisation strips from both ends of an id, a type or a source: Unicode's White_Space
# characters (what polars' strip_chars() strips; Spark's trim() strips only spaces unless told).
WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)

# How a value appears in a reason: as text, "null" when missing, cut after SHOWN_LIMIT characters
# with SHOWN_ELLIPSIS; a timestamp in ISO 8601 UTC with 0, 3 or 6 fractional digits (the fewest
# that keep it exact) and a "Z" (what polars' "%.f" prints).
SHOWN_LIMIT = 80
SHOWN_ELLIPSIS = "…"
NULL_SHOWN = "null"
# In the quarantine's `original` (JSON of the row as cleaned), a timestamp ends in "+00:00" instead.
ORIGINAL_EXCLUDED = ("ingested_at", "batch_id")

# The category of a reason, for counts: the reason without the value (the first `field=value: `
# becomes `field: `) and with every number written N. `ms_played=-5: negative` → `ms_played: negative`.
REASON_VALUE_PATTERN = r"^([a-z_]+)=.*?: "
REASON_NUMBER_PATTERN = r"\d[\d,]*"

# A user with more than `bot_plays_per_hour` of these events (with a known ms_played) in one clock
# hour is a suspected bot; a burst of ratings (no ms_played) is not.
BOT_EVENT_TYPES = ("play", "skip")

# Training positives: a non-skip play or a like, by a user not flagged as a bot. A play weighs its
# completion (clipped to [0, 1], 1 when unknown), a like LIKE_WEIGHT; a play and a like of the same
# track at the same instant make one interaction with the summed weight.
POSITIVES = POSITIVE_EVENT_TYPES
LIKE_WEIGHT = 2.0

Test = Literal["empty", "missing", "not_in", "present_not_in", "below", "above", "at_most"]


@dataclass(frozen=True)
class CleaningRules:
    """Thresholds of the cleaning rules (documented in the README).

    Args:
        max_ms_played: longer plays are absurd (a day by default).
        future_tolerance: how far in the future a ``played_at`` may be (clock skew).
        earliest: older events are implausible for a streaming service (2000-01-01); a historical
            dataset such as MovieLens (ratings from 1996) sets it earlier.
        bot_plays_per_hour: a user with more plays or skips in one clock hour is flagged as a
            suspected bot (a play every 20 s for an hour); their events are kept but excluded from
            training. Only events with a known ``ms_played`` count (a burst of ratings is no bot).
    """

    max_ms_played: int = 24 * 3600 * 1000
    future_tolerance: timedelta = timedelta(minutes=10)
    earliest: datetime = EARLIEST
    bot_plays_per_hour: int = 180


@dataclass(frozen=True)
class ContractRule:
    """One rule of the contract: which field, which test, and the reason of a row that breaks it.

    Tests (a null value breaks only ``empty``, ``missing`` and ``not_in``):
        ``empty``: null or ``""`` (after stripping); ``missing``: null; ``not_in``: null or not one of
        ``bound``; ``present_not_in``: set and not one of ``bound``; ``below`` / ``above``: less / more
        than ``bound``; ``at_most``: not more than ``bound``.

    ``reason`` may hold ``{value}``: the offending value as shown (see ``SHOWN_LIMIT``).
    """

    field: str
    test: Test
    reason: str
    bound: object = None

    def reason_parts(self) -> tuple[str, str | None]:
        """The reason split around ``{value}``: ``(before, after)``, or ``(reason, None)`` without one."""
        before, sep, after = self.reason.partition("{value}")
        return (before, after) if sep else (before, None)


def contract_rules(now: datetime, rules: CleaningRules) -> list[ContractRule]:
    """The contract's rules in order: a row is quarantined with the reason of the first it breaks."""
    now_shown = f"{now.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
    return [
        ContractRule("event_id", "empty", "event_id is empty"),
        ContractRule("user_id", "empty", "user_id is empty"),
        ContractRule("track_id", "empty", "track_id is empty"),
        ContractRule("event_type", "not_in", f"event_type={{value}}: not one of {', '.join(EVENT_TYPES)}", EVENT_TYPES),
        ContractRule("source", "present_not_in", f"source={{value}}: not one of {', '.join(SOURCES)}", SOURCES),
        ContractRule("played_at", "missing", "played_at is empty"),
        ContractRule("played_at", "below", f"played_at={{value}}: before {rules.earliest:%Y-%m-%d}", rules.earliest),
        ContractRule(
            "played_at",
            "above",
            f"played_at={{value}}: in the future (now is {now_shown})",
            now + rules.future_tolerance,
        ),
        ContractRule("ms_played", "below", "ms_played={value}: negative", 0),
        ContractRule(
            "ms_played",
            "above",
            f"ms_played={{value}}: absurd (more than {rules.max_ms_played:,} ms)",
            rules.max_ms_played,
        ),  # fmt: skip
        ContractRule("track_duration_ms", "at_most", "track_duration_ms={value}: not positive", 0),
    ]
