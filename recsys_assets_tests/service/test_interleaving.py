"""Team-draft interleaving as a pure function."""

from __future__ import annotations

import numpy as np
import pytest

from serving.interleaving import CHALLENGER_TEAM, CHAMPION_TEAM, team_draft


def merged(a: list[str], b: list[str], k: int, seed: int = 0) -> list[tuple[str, int]]:
    return [((a, b)[team][i], team) for team, i in team_draft(a, b, k, np.random.default_rng(seed))]


@pytest.mark.parametrize("seed", range(20))
def test_teams_stay_balanced_and_items_unique(seed: int) -> None:
    a = [f"t{i}" for i in range(10)]
    b = [f"t{i}" for i in (3, 0, 11, 12, 1, 13, 14, 15, 16, 17)]
    out = merged(a, b, 10, seed)
    items = [item for item, _ in out]
    assert len(items) == len(set(items)) == 10
    teams = [team for _, team in out]
    for prefix in range(1, 11):
        picks = teams[:prefix]
        assert abs(picks.count(CHAMPION_TEAM) - picks.count(CHALLENGER_TEAM)) <= 1
    # Each team picks its best item not yet in the list: the champion's picks keep its order.
    champion_picks = [item for item, team in out if team == CHAMPION_TEAM]
    assert champion_picks == sorted(champion_picks, key=a.index)


def test_identical_rankings_keep_the_order_and_split_the_credit() -> None:
    a = [f"t{i}" for i in range(6)]
    out = merged(a, list(a), 6, seed=3)
    assert [item for item, _ in out] == a
    assert sorted(team for _, team in out) == [0, 0, 0, 1, 1, 1]


def test_the_first_pick_is_a_fair_coin() -> None:
    rng = np.random.default_rng(0)
    first = [team_draft(["a"], ["b"], 1, rng)[0][0] for _ in range(2000)]
    assert 0.45 < np.mean(first) < 0.55


def test_a_short_ranking_lets_the_other_team_fill_the_list() -> None:
    out = merged(["x"], ["y", "z", "w"], 4)
    assert sorted(item for item, _ in out) == ["w", "x", "y", "z"]
    assert merged([], [], 5) == []
