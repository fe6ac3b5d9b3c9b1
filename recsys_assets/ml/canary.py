"""The canary decision: promote the challenger, roll it back, step its traffic up, or wait.

Why a mixture sequential probability ratio test (mSPRT, Johari, Pekelis & Walsh, "Always valid
inference", 2017/2022): the canary sensor looks at the data every time more traffic has come in, as
often as it likes, and stops at the first conclusive look. A fixed-horizon test looked at ten times
rejects a true null far more often than its α (an A/A simulation of the previous z-test: 27–91%
false decisions, see ``docs/benchmarks.md``). The mSPRT's likelihood ratio against a normal mixture
of alternatives is a nonnegative martingale under the null, so by Ville's inequality
``P(sup_n Λ_n ≥ 1/α) ≤ α``: its p-value ``1/Λ_n`` is valid at every look at once, without a planned
number of looks (which group-sequential α-spending needs and the sensor does not have: it looks
when traffic arrives) and with one parameter, the mixture's scale ``tau`` on the effect, fixed
before the data. The estimator is asymptotically normal, and the test uses its plug-in variance, as
the Optimizely and Eppo implementations do (Waudby-Smith et al., "Time-uniform central limit
theory", 2021, give the asymptotic justification).

The unit of analysis is the **user**. Each user contributes per-user sums (impressions, clicks,
conversions, rejections); a rate is a ratio of the arm's means, and its variance comes from the
delta method over users (Deng et al., "Applying the delta method in metric analytics", 2018), so
clicks that correlate within a user, and heavy users, are accounted for. The effect is the log of the
ratio of the challenger's rate to the champion's (a relative lift), so ``tau`` reads the same for
every metric and both modes.

- **A/B**: users are split by a stable hash; the two arms are independent samples of users.
- **Interleaving** (team-draft): every canary user gets one list with items from both models, each
  credited to the model that contributed it. The comparison is paired within each user (the delta
  method over the user's four sums), which removes the between-user spread that dominates A/B's
  variance: that is where its sensitivity comes from.

**Progressive traffic.** The canary fraction steps up (for example 5% → 20% → 50%) as evidence
accumulates without harm. Users change arms when the fraction grows, and the traffic mix changes
with time, so the data are analysed by step: one estimate per step, each from the users as they
were in that step, combined with inverse-variance weights (a stratified estimator; pooling across
steps would confound the arm with the time of the step).

**Metrics and α.** CTR (clicks per impression) decides both ways; rejections per impression (skips,
dislikes) and conversion (complete plays per click) can only roll back. α is split between them
(Bonferroni: ½, ¼, ¼), so an A/A canary ends on a significant decision with probability ≤ α in all.

**Guardrails.** Serving health is not a statistical question: the challenger's ``/recommend``
latency p99 and error rate must not be worse than the champion's by more than a configured margin,
once each variant has served ``min_requests``. A breach rolls it back at the next look, whatever
the CTR says (Argo Rollouts' analysis does the same).

The distributions come from scipy; the delta method and the mixture ratio are three lines each and
no maintained library offers them for clustered ratio metrics in a sequential setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import optimize, stats
from scipy.special import logsumexp

AB = "ab"
INTERLEAVING = "interleaving"
MODES = (AB, INTERLEAVING)

# (metric, numerator, denominator, which direction may decide, share of α)
METRICS: tuple[tuple[str, str, str, str, float], ...] = (
    ("ctr", "clicks", "impressions", "both", 0.5),
    ("rejection_rate", "rejections", "impressions", "higher_is_harm", 0.25),
    ("conversion", "conversions", "clicks", "lower_is_harm", 0.25),
)
COUNTS = ("impressions", "clicks", "conversions", "rejections")
# The mixture's scales, as multiples of ``tau``, and their weights (see log_likelihood_ratio).
SCALES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
SCALE_WEIGHTS = (0.5, 0.1, 0.1, 0.1, 0.1, 0.1)
_SCALES, _LOG_WEIGHTS = np.array(SCALES), np.log(SCALE_WEIGHTS)


@dataclass(frozen=True)
class Arm:
    """Per-user sums of one variant (or, interleaved, one team) in one step; index ``i`` is a user."""

    impressions: np.ndarray
    clicks: np.ndarray
    conversions: np.ndarray
    rejections: np.ndarray

    @classmethod
    def empty(cls) -> Arm:
        return cls(*(np.zeros(0) for _ in COUNTS))

    @property
    def users(self) -> int:
        return len(self.impressions)

    def total(self, name: str) -> float:
        return float(getattr(self, name).sum())


@dataclass(frozen=True)
class Stratum:
    """One traffic step: the champion's and the challenger's users (``paired``: the same users, in
    the same order, interleaved)."""

    step: int
    fraction: float
    champion: Arm
    challenger: Arm
    paired: bool = False


@dataclass(frozen=True)
class ServingHealth:
    """One variant's ``/recommend`` health since the canary started."""

    requests: int
    errors: int
    latency_p99_seconds: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class CanaryRules:
    """How the canary decides. The defaults of a deployment come from its settings
    (``CanaryPolicyResource.get_rules()`` in the code location); the statistical constants have defaults here."""

    steps: tuple[float, ...]
    min_impressions: int
    max_impressions: int
    alpha: float = 0.05
    tau: float = 0.05
    min_users: int = 20
    latency_margin: float = 0.5
    latency_slack_seconds: float = 0.005
    error_margin: float = 0.01
    min_requests: int = 100

    def __post_init__(self) -> None:
        if not self.steps or any(not 0 < s <= 1 for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise ValueError(f"steps={self.steps!r}: expected increasing fractions in (0, 1]")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha!r}: expected a level in (0, 1)")
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau!r}: expected a positive scale")


@dataclass(frozen=True)
class MetricTest:
    """One metric's always-valid test: relative lift of the challenger, its confidence sequence."""

    metric: str
    champion_rate: float | None
    challenger_rate: float | None
    lift: float | None  # exp(θ̂) − 1
    lift_low: float | None
    lift_high: float | None
    p_value: float  # always valid
    alpha: float
    users: int
    significant: bool
    harmful: bool  # significant in the direction that rolls back

    def describe(self) -> str:
        if self.lift is None:
            return f"{self.metric}: too few users ({self.users})"
        interval = "" if math.isnan(self.lift_low) else f", CI [{self.lift_low:+.1%}, {self.lift_high:+.1%}]"
        return (
            f"{self.metric} {self.challenger_rate:.2%} vs {self.champion_rate:.2%} "
            f"(lift {self.lift:+.1%}{interval}, always-valid p={self.p_value:.3g}, α={self.alpha:.3g})"
        )


@dataclass(frozen=True)
class CanaryDecision:
    action: str  # promote | rollback | step_up | wait
    reason: str
    mode: str
    step: int
    next_fraction: float | None = None
    tests: list[MetricTest] = field(default_factory=list)
    guardrails: list[str] = field(default_factory=list)

    def test(self, metric: str) -> MetricTest | None:
        return next((t for t in self.tests if t.metric == metric), None)

    def as_dict(self) -> dict:
        return asdict(self)


# --- statistics --------------------------------------------------------------------------------


def _log_ratio_independent(num: np.ndarray, den: np.ndarray) -> tuple[float, float] | None:
    """log(Σnum/Σden) over users and the delta-method variance of that log."""
    n = len(num)
    m_num, m_den = num.mean() if n else 0.0, den.mean() if n else 0.0
    if n < 2 or m_num <= 0 or m_den <= 0:
        return None
    cov = np.cov(np.vstack([num, den]), ddof=1)
    gradient = np.array([1 / m_num, -1 / m_den])
    return math.log(m_num / m_den), float(gradient @ cov @ gradient) / n


def log_lift(stratum: Stratum, numerator: str, denominator: str) -> tuple[float, float, int] | None:
    """θ̂ = log(challenger rate / champion rate) in one step, its variance, and the users behind it.

    A/B: independent arms, the variances add. Interleaved: the same users in both teams, so the
    delta method runs over each user's four sums and keeps their covariance.
    """
    a, b = stratum.champion, stratum.challenger
    if stratum.paired:
        n = a.users
        x = np.vstack([getattr(b, numerator), getattr(b, denominator), getattr(a, numerator), getattr(a, denominator)])
        means = x.mean(axis=1) if n else np.zeros(4)
        if n < 2 or (means <= 0).any():
            return None
        gradient = np.array([1 / means[0], -1 / means[1], -1 / means[2], 1 / means[3]])
        theta = math.log(means[0] / means[1]) - math.log(means[2] / means[3])
        return theta, float(gradient @ np.cov(x, ddof=1) @ gradient) / n, n
    ra = _log_ratio_independent(getattr(a, numerator), getattr(a, denominator))
    rb = _log_ratio_independent(getattr(b, numerator), getattr(b, denominator))
    if ra is None or rb is None:
        return None
    return rb[0] - ra[0], ra[1] + rb[1], a.users + b.users


def stratified(estimates: Sequence[tuple[float, float, int]]) -> tuple[float, float, int] | None:
    """Inverse-variance combination of per-step estimates."""
    usable = [(t, v, n) for t, v, n in estimates if v > 0 and math.isfinite(v)]
    if not usable:
        return None
    weights = np.array([1 / v for _, v, _ in usable])
    theta = float(np.dot(weights, [t for t, _, _ in usable]) / weights.sum())
    return theta, float(1 / weights.sum()), sum(n for _, _, n in usable)


def log_likelihood_ratio(theta: float, variance: float, tau: float) -> float:
    """log Λ of the estimate under the mixture over the null: a weighted sum of normal mixtures
    θ ~ N(0, s²) over the scales ``s`` of :data:`SCALES` × ``tau``.

    One scale ``tau`` is most powerful for lifts near it and nearly blind to lifts far larger when
    the variance is large (a model that halves the CTR, seen on few users, read p = 0.9 with
    ``tau`` = 0.05 alone). A fixed-weight sum of martingales is a martingale, so the sum stays
    always valid; half the weight stays on ``tau``, the design scale.
    """
    mixture = stats.norm.logpdf(theta, scale=np.sqrt(variance + (_SCALES * tau) ** 2))
    return float(logsumexp(mixture + _LOG_WEIGHTS) - stats.norm.logpdf(theta, scale=math.sqrt(variance)))


def msprt_p_value(theta: float, variance: float, tau: float) -> float:
    """Always-valid p-value of H0: θ = 0 (two-sided): ``min(1, 1/Λ)``."""
    return float(min(1.0, math.exp(-log_likelihood_ratio(theta, variance, tau))))


def confidence_sequence(theta: float, variance: float, tau: float, alpha: float) -> tuple[float, float]:
    """The always-valid (1 − α) interval for θ that is dual to :func:`msprt_p_value`: the values θ0
    whose test on θ̂ − θ0 is not rejected (Λ grows with |θ̂ − θ0|, so it is an interval)."""
    target = -math.log(alpha)
    # The widest component alone bounds the radius: w·Λ_s ≤ Λ.
    s2, w = (SCALES[-1] * tau) ** 2, SCALE_WEIGHTS[-1]
    v = variance
    high = math.sqrt(v * (v + s2) / s2 * (math.log((v + s2) / v) + 2 * (target - math.log(w))))
    radius = optimize.brentq(lambda r: log_likelihood_ratio(r, v, tau) - target, 0.0, high)
    return theta - radius, theta + radius


def _rate(arms: Sequence[Arm], numerator: str, denominator: str) -> float | None:
    den = sum(a.total(denominator) for a in arms)
    return sum(a.total(numerator) for a in arms) / den if den else None


def metric_test(strata: Sequence[Stratum], metric: str, rules: CanaryRules, interval: bool = True) -> MetricTest:
    """The always-valid test of one metric over all steps (``interval``: with its confidence sequence,
    for people; the decision needs only the p-value)."""
    _, numerator, denominator, direction, share = next(m for m in METRICS if m[0] == metric)
    alpha = rules.alpha * share
    usable = [
        s for s in strata if min(s.champion.users, s.challenger.users) >= rules.min_users
    ]  # the normal approximation needs users on both sides
    estimates = [e for s in usable if (e := log_lift(s, numerator, denominator)) is not None]
    combined = stratified(estimates)
    champion_rate = _rate([s.champion for s in strata], numerator, denominator)
    challenger_rate = _rate([s.challenger for s in strata], numerator, denominator)
    users = sum(s.champion.users + (0 if s.paired else s.challenger.users) for s in strata)
    if combined is None:
        return MetricTest(metric, champion_rate, challenger_rate, None, None, None, 1.0, alpha, users, False, False)
    theta, variance, _ = combined
    p = msprt_p_value(theta, variance, rules.tau)
    low, high = confidence_sequence(theta, variance, rules.tau, alpha) if interval else (math.nan, math.nan)
    significant = p < alpha
    harmful = significant and (
        (direction in ("both", "lower_is_harm") and theta < 0) or (direction == "higher_is_harm" and theta > 0)
    )
    return MetricTest(
        metric, champion_rate, challenger_rate, math.expm1(theta), math.expm1(low), math.expm1(high),
        p, alpha, users, significant, harmful,
    )  # fmt: skip


def guardrail_breaches(champion: ServingHealth, challenger: ServingHealth, rules: CanaryRules) -> list[str]:
    """What the challenger's serving health breaks, once both variants have served enough requests."""
    if min(champion.requests, challenger.requests) < rules.min_requests:
        return []
    breaches = []
    if champion.latency_p99_seconds is not None and challenger.latency_p99_seconds is not None:
        limit = champion.latency_p99_seconds * (1 + rules.latency_margin) + rules.latency_slack_seconds
        if challenger.latency_p99_seconds > limit:
            breaches.append(
                f"latency p99 {challenger.latency_p99_seconds * 1000:.1f} ms > {limit * 1000:.1f} ms "
                f"(champion {champion.latency_p99_seconds * 1000:.1f} ms × {1 + rules.latency_margin:g} "
                f"+ {rules.latency_slack_seconds * 1000:g} ms)"
            )
    if challenger.error_rate > champion.error_rate + rules.error_margin:
        breaches.append(
            f"error rate {challenger.error_rate:.2%} > {champion.error_rate:.2%} + {rules.error_margin:.2%} "
            f"({challenger.errors} of {challenger.requests} requests)"
        )
    return breaches


# --- the decision ------------------------------------------------------------------------------


def decide_canary(
    strata: Sequence[Stratum],
    rules: CanaryRules,
    *,
    step: int,
    mode: str = AB,
    health: tuple[ServingHealth, ServingHealth] | None = None,
    intervals: bool = True,
) -> CanaryDecision:
    """The decision at one look.

    Args:
        strata: the user-level data, one stratum per traffic step seen so far (the current one last).
        rules: thresholds, α, steps.
        step: the index of the current step in ``rules.steps``.
        mode: ``ab`` or ``interleaving``.
        health: the champion's and the challenger's serving health, when known.
        intervals: compute each metric's confidence sequence (for the reason and the UI; the
            simulation benchmark turns it off, the decision does not use it).

    Returns:
        ``rollback`` on a guardrail breach or a significant harm; ``promote`` on a significantly
        higher CTR; at ``max_impressions`` with no significant difference, ``promote`` if the CTR's
        estimate is not lower (it did no harm: ship it) and ``rollback`` otherwise; ``step_up`` once
        the current step has ``min_impressions`` on the challenger and a larger step is planned;
        else ``wait``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    breaches = guardrail_breaches(*health, rules) if health is not None else []
    if breaches:
        return CanaryDecision("rollback", "guardrail: " + "; ".join(breaches), mode, step, guardrails=breaches)
    tests = [metric_test(strata, name, rules, intervals) for name, *_ in METRICS]
    numbers = "; ".join(t.describe() for t in tests)
    challenger_impressions = sum(s.challenger.total("impressions") for s in strata)
    champion_impressions = sum(s.champion.total("impressions") for s in strata)
    fewest = int(min(champion_impressions, challenger_impressions))
    if fewest < rules.min_impressions:
        return CanaryDecision(
            "wait", f"{fewest:,} impressions on the smaller variant, {rules.min_impressions:,} needed",
            mode, step, tests=tests,
        )  # fmt: skip
    if harmful := [t for t in tests if t.harmful]:
        what = ", ".join(f"{t.metric} significantly {'higher' if t.metric == 'rejection_rate' else 'lower'}"
                         for t in harmful)  # fmt: skip
        return CanaryDecision("rollback", f"{what}: {numbers}", mode, step, tests=tests)
    ctr = tests[0]
    if ctr.significant:
        return CanaryDecision("promote", f"ctr significantly higher: {numbers}", mode, step, tests=tests)
    if fewest >= rules.max_impressions:
        # Inconclusive at the horizon: a challenger that did no significant harm and whose CTR is not
        # below the champion's ships (it was trained on newer data); one whose CTR looks lower does not.
        if ctr.lift is not None and ctr.lift >= 0:
            return CanaryDecision(
                "promote", f"no significant difference after {fewest:,} impressions, CTR not lower (no harm): "
                f"{numbers}", mode, step, tests=tests,
            )  # fmt: skip
        return CanaryDecision(
            "rollback", f"no significant difference after {fewest:,} impressions, CTR lower or unknown: the "
            f"champion stays: {numbers}", mode, step, tests=tests,
        )  # fmt: skip
    current = strata[-1] if strata else None
    in_step = int(current.challenger.total("impressions")) if current and current.step == step else 0
    if step + 1 < len(rules.steps) and in_step >= rules.min_impressions:
        nxt = rules.steps[step + 1]
        return CanaryDecision(
            "step_up", f"no harm after {in_step:,} challenger impressions at {rules.steps[step]:.0%}: "
            f"{rules.steps[step]:.0%} → {nxt:.0%}; {numbers}", mode, step, next_fraction=nxt, tests=tests,
        )  # fmt: skip
    return CanaryDecision("wait", f"not conclusive yet: {numbers}", mode, step, tests=tests)
