"""Team-draft interleaving (Radlinski, Kurup & Joachims, "How does clickthrough data reflect
retrieval quality?", CIKM 2008): one list from two rankings, each item credited to the model that
picked it.

Each round, the team with fewer picks so far (a coin flip when even) adds its best item not in the
list yet. The coin flips balance the position advantage between the models, so a click on an item
is a vote for the team that contributed it. Written by hand: it is a dozen lines, and no maintained
library on the package index implements it for a serving path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")
CHAMPION_TEAM, CHALLENGER_TEAM = 0, 1


def team_draft(
    champion: Sequence[T], challenger: Sequence[T], k: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Interleave two rankings into at most ``k`` picks.

    Args:
        champion: the champion's ranking, best first (no duplicates).
        challenger: the challenger's ranking, best first.
        k: the length of the interleaved list.
        rng: the source of the coin flips.

    Returns:
        ``(team, index)`` per position: ``team`` 0 (champion) or 1 (challenger), ``index`` into that
        team's ranking.
    """
    rankings = (champion, challenger)
    cursor = [0, 0]
    picks = [0, 0]
    taken: set = set()
    out: list[tuple[int, int]] = []
    flips = rng.random(k)
    while len(out) < k:
        # Skip what the other team already placed.
        for team in (0, 1):
            while cursor[team] < len(rankings[team]) and rankings[team][cursor[team]] in taken:
                cursor[team] += 1
        left = [cursor[t] < len(rankings[t]) for t in (0, 1)]
        if not any(left):
            break
        # The team with fewer picks goes next; a coin flip when even.
        team = int(picks[1] < picks[0]) if picks[0] != picks[1] else int(flips[len(out)] >= 0.5)
        if not left[team]:
            team = 1 - team
        out.append((team, cursor[team]))
        taken.add(rankings[team][cursor[team]])
        picks[team] += 1
        cursor[team] += 1
    return out
