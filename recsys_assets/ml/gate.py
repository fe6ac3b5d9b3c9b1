"""The promotion gate: does the candidate beat the champion (or, for the first model, popularity)?

Promote when the primary metric is at least the reference's × (1 + ``min_improvement``), and strictly
better when that margin is 0 or more (a negative one lets a somewhat worse candidate reach the canary),
and no guard metric falls more than its tolerance (relative) below the reference's. Every metric
gets its delta with a bootstrap confidence interval over the evaluated users, so the decision report
says how sure the numbers are. ``force`` promotes regardless and is recorded as forced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from recsys_assets.ml.metrics import Evaluation, bootstrap_delta

# Guard metrics and how far (relative) each may fall. Catalogue coverage is reported but not guarded by
# default: after a drift towards one genre the better model legitimately covers less of the catalogue
# (seen in the demo: NDCG@10 ×11, coverage@10 −76%). Add it to `guards` to protect diversity.
DEFAULT_GUARDS = {"recall@10": 0.05}


@dataclass(frozen=True)
class GateRules:
    primary_metric: str = "ndcg@10"
    min_improvement: float = 0.0
    guards: tuple[tuple[str, float], ...] = tuple(DEFAULT_GUARDS.items())
    force: bool = False
    bootstrap_samples: int = 1000


@dataclass(frozen=True)
class MetricDelta:
    metric: str
    candidate: float
    reference: float
    delta: float
    relative: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True)
class Decision:
    promote: bool
    forced: bool
    reference: str  # "champion v3" or "popularity"
    reasons: list[str]
    deltas: list[MetricDelta] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PROMOTE" if self.promote else "REJECT"
        return (
            f"{verdict} against {self.reference}"
            + (" (forced)" if self.forced else "")
            + ": "
            + "; ".join(self.reasons)
        )


def _delta(metric: str, candidate: Evaluation, reference: Evaluation, samples: int) -> MetricDelta:
    c, r = candidate.metrics[metric], reference.metrics[metric]
    ci_low = ci_high = None
    if metric in candidate.per_user and metric in reference.per_user:
        _, ci_low, ci_high = bootstrap_delta(candidate.per_user[metric], reference.per_user[metric], n=samples)
    return MetricDelta(metric, c, r, c - r, (c - r) / r if r else None, ci_low, ci_high)


def decide(candidate: Evaluation, champion: Evaluation | None, popularity: Evaluation, rules: GateRules,
           champion_label: str = "champion") -> Decision:  # fmt: skip
    """The gate's decision, with per-metric deltas against the reference.

    Args:
        candidate: the new model's evaluation.
        champion: the current champion re-scored on the same holdout (``None`` for the first model).
        popularity: the popularity baseline on the same holdout.
        rules: thresholds.
        champion_label: how the report names the champion (``champion v3``).
    """
    reference, label = (champion, champion_label) if champion is not None else (popularity, "popularity")
    metrics = sorted(m for m in candidate.metrics if m in reference.metrics)
    if rules.primary_metric not in candidate.metrics:
        raise ValueError(f"primary_metric={rules.primary_metric!r} is not computed (have: {', '.join(metrics)})")
    deltas = [_delta(m, candidate, reference, rules.bootstrap_samples) for m in metrics]
    by_metric = {d.metric: d for d in deltas}
    primary = by_metric[rules.primary_metric]
    reasons = []
    # The threshold is the reference × (1 + min_improvement), as the asset check reports it. At 0 or
    # more the candidate must also be strictly better (an equal model is not promoted); a negative
    # margin lets a candidate within it through to the canary, where the online metrics decide.
    threshold = primary.reference * (1 + rules.min_improvement)
    improved = primary.candidate >= threshold and (primary.delta > 0 or rules.min_improvement < 0)
    ci = f", 95% CI [{primary.ci_low:+.4f}, {primary.ci_high:+.4f}]" if primary.ci_low is not None else ""
    if not improved:
        verdict = f"does not improve by the required {rules.min_improvement:.1%}"
    elif primary.delta > 0:
        verdict = "improves"
    else:
        verdict = f"within the allowed {rules.min_improvement:.1%}"
    reasons.append(
        f"{rules.primary_metric} {primary.candidate:.4f} vs {primary.reference:.4f} ({primary.delta:+.4f}"
        f"{'' if primary.relative is None else f', {primary.relative:+.1%}'}{ci}): {verdict}"
    )
    guards_ok = True
    for guard, tolerance in rules.guards:
        d = by_metric.get(guard)
        if d is None:
            raise ValueError(f"guard metric {guard!r} is not computed (have: {', '.join(metrics)})")
        floor = d.reference * (1 - tolerance)
        if d.candidate < floor:
            guards_ok = False
            reasons.append(
                f"guard {guard} {d.candidate:.4f} regresses below {floor:.4f} ({tolerance:.0%} under {d.reference:.4f})"
            )
    if guards_ok:
        listed = ", ".join(f"{g} {t:.0%}" for g, t in rules.guards)
        reasons.append(f"no guard regresses beyond its tolerance ({listed})")
    promote = improved and guards_ok
    if rules.force and not promote:
        reasons.append("forced by the operator (force=True): promoted despite the above")
    return Decision(promote=promote or rules.force, forced=rules.force and not promote, reference=label,
                    reasons=reasons, deltas=deltas)  # fmt: skip
