"""The canary decision: promote the challenger, roll it back, or wait for more traffic.

Per variant: impressions, clicks, conversions (plays to the end after a click) and
rejections (skips and dislikes). The challenger is judged on CTR with a two-sided two-proportion z-test
once both variants have ``min_impressions``; its rejection rate must not be significantly worse.

- ``promote``: the challenger's CTR is significantly higher, or not significantly different while the
  canary has run ``max_impressions`` impressions (it did no harm: ship it), and its rejection rate is
  not significantly higher;
- ``rollback``: its CTR is significantly lower, or its rejection rate significantly higher;
- ``wait``: not enough impressions yet.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class VariantStats:
    variant: str
    model_version: int | None
    impressions: int
    clicks: int
    conversions: int
    rejections: int

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0

    @property
    def conversion_rate(self) -> float:
        return self.conversions / self.clicks if self.clicks else 0.0

    @property
    def rejection_rate(self) -> float:
        return self.rejections / self.impressions if self.impressions else 0.0


@dataclass(frozen=True)
class CanaryRules:
    min_impressions: int = 2000
    max_impressions: int = 20000
    alpha: float = 0.05


@dataclass(frozen=True)
class CanaryDecision:
    action: str  # promote | rollback | wait
    reason: str
    ctr_z: float | None
    ctr_p: float | None
    rejection_z: float | None
    rejection_p: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def two_proportion_test(successes_a: int, n_a: int, successes_b: int, n_b: int) -> tuple[float, float]:
    """z statistic of (b − a) and its two-sided p-value (pooled standard error)."""
    if n_a == 0 or n_b == 0:
        return 0.0, 1.0
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 0.0, 1.0
    z = (successes_b / n_b - successes_a / n_a) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def decide_canary(champion: VariantStats, challenger: VariantStats, rules: CanaryRules) -> CanaryDecision:
    """The decision for ``challenger`` against ``champion``; see the module docstring."""
    fewest = min(champion.impressions, challenger.impressions)
    if fewest < rules.min_impressions:
        return CanaryDecision(
            "wait",
            f"{fewest:,} impressions on the smaller variant, {rules.min_impressions:,} needed",
            None, None, None, None,
        )  # fmt: skip
    ctr_z, ctr_p = two_proportion_test(champion.clicks, champion.impressions, challenger.clicks, challenger.impressions)
    rej_z, rej_p = two_proportion_test(
        champion.rejections, champion.impressions, challenger.rejections, challenger.impressions
    )
    numbers = (
        f"CTR {challenger.ctr:.2%} vs {champion.ctr:.2%} (z={ctr_z:+.2f}, p={ctr_p:.3g}); "
        f"rejection {challenger.rejection_rate:.2%} vs {champion.rejection_rate:.2%} (z={rej_z:+.2f}, p={rej_p:.3g})"
    )
    if rej_p < rules.alpha and rej_z > 0:
        return CanaryDecision("rollback", f"rejection rate significantly higher: {numbers}", ctr_z, ctr_p, rej_z, rej_p)
    if ctr_p < rules.alpha:
        action = "promote" if ctr_z > 0 else "rollback"
        verdict = "significantly higher" if ctr_z > 0 else "significantly lower"
        return CanaryDecision(action, f"CTR {verdict}: {numbers}", ctr_z, ctr_p, rej_z, rej_p)
    if fewest >= rules.max_impressions:
        return CanaryDecision(
            "promote", f"no significant difference after {fewest:,} impressions (no harm): {numbers}",
            ctr_z, ctr_p, rej_z, rej_p,
        )  # fmt: skip
    return CanaryDecision("wait", f"not significant yet: {numbers}", ctr_z, ctr_p, rej_z, rej_p)
