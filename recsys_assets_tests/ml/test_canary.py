"""Canary decisions on constructed per-variant counts."""

from __future__ import annotations

import pytest

from recsys_assets.ml.canary import CanaryRules, VariantStats, decide_canary, two_proportion_test

RULES = CanaryRules(min_impressions=1000, max_impressions=50_000, alpha=0.05)


def stats(variant: str, impressions: int, clicks: int, rejections: int = 0) -> VariantStats:
    return VariantStats(variant, 1 if variant == "champion" else 2, impressions, clicks, clicks // 2, rejections)


def test_two_proportion_test_against_a_hand_computed_case() -> None:
    # 10% vs 12% on 5,000 each: pooled p = 0.11, se = sqrt(0.11*0.89*(2/5000)) = 0.006258 → z = 3.196
    z, p = two_proportion_test(500, 5000, 600, 5000)
    assert z == pytest.approx(3.196, abs=1e-3)
    assert p == pytest.approx(0.00139, abs=1e-4)


@pytest.mark.parametrize(
    ("champion", "challenger", "action"),
    [
        (stats("champion", 500, 50), stats("challenger", 500, 90), "wait"),  # too few impressions
        (stats("champion", 5000, 500), stats("challenger", 5000, 600), "promote"),  # significantly better
        (stats("champion", 5000, 600), stats("challenger", 5000, 500), "rollback"),  # significantly worse
        (stats("champion", 5000, 500), stats("challenger", 5000, 510), "wait"),  # not significant yet
        (stats("champion", 60000, 6000), stats("challenger", 60000, 6010), "promote"),  # no harm after max
        (stats("champion", 5000, 500, 100), stats("challenger", 5000, 600, 200), "rollback"),  # more rejections
    ],
)
def test_decisions(champion: VariantStats, challenger: VariantStats, action: str) -> None:
    decision = decide_canary(champion, challenger, RULES)
    assert decision.action == action, decision.reason


def test_the_reason_gives_the_numbers() -> None:
    decision = decide_canary(stats("champion", 5000, 500), stats("challenger", 5000, 600), RULES)
    assert "CTR 12.00% vs 10.00%" in decision.reason
    assert "p=0.00139" in decision.reason
