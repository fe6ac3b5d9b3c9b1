"""The HTTP contract of the recommendation service (DESIGN.md, "Serving contract")."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

# No control characters (NUL, newlines…) in ids: they land in the warehouse and in logs.
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f]+$"
UserId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=NO_CONTROL_CHARACTERS,
        description="The listener's id, as in the warehouse.",
    ),
]
TrackId = Annotated[str, Field(min_length=1, max_length=256, pattern=NO_CONTROL_CHARACTERS)]
# A registry version: positive, and small enough for every store (a 32-bit integer).
ModelVersion = Annotated[int, Field(strict=True, ge=1, le=2**31 - 1, description="From the /recommend item.")]
FEEDBACK_TYPES = ("click", "skip", "like", "dislike", "play")


class Item(BaseModel):
    track_id: str
    artist_id: str
    score: float
    model_version: int = Field(description="The version that recommended this item: send it back with /feedback.")
    variant: Literal["champion", "challenger"] = Field(
        description="The variant that recommended this item (in an interleaved list, the team that picked it)."
    )


class Recommendations(BaseModel):
    user_id: str
    items: list[Item]
    model_version: int = Field(description="The version that ranked the list (interleaved: the challenger's).")
    variant: Literal["champion", "challenger", "interleaved"] = Field(
        description="Which model ranked the list; 'interleaved': both, each item says which (team-draft canary)."
    )
    fallback: bool = Field(
        description="True when the model can personalise nothing for the user (unknown to it, and no play of a "
        "track it knows): popular tracks instead."
    )
    personalised_from_history: bool = Field(
        default=False,
        description="True when the user is unknown to the model and was ranked from their plays since its training.",
    )
    request_id: str


class FeedbackAccepted(BaseModel):
    accepted: bool
    event_id: str


class CanaryState(BaseModel):
    fraction: float
    mode: Literal["ab", "interleaving"]
    step: int | None
    champion_version: int | None
    challenger_version: int | None


class AdminResult(BaseModel):
    ok: bool
    detail: str
    champion_version: int | None
    challenger_version: int | None
