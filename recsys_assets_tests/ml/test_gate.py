"""Gate decisions on constructed metric tables."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_assets.ml.gate import GateRules, decide
from recsys_assets.ml.metrics import Evaluation


def ev(ndcg: float, recall: float = 0.2, coverage: float = 0.5, users: int = 200) -> Evaluation:
    rng = np.random.default_rng(int(ndcg * 1000))
    per_user = {"ndcg@10": np.clip(rng.normal(ndcg, 0.05, users), 0, 1), "recall@10": np.full(users, recall)}
    per_user["ndcg@10"] += ndcg - per_user["ndcg@10"].mean()
    metrics = {"ndcg@10": ndcg, "recall@10": recall, "coverage@10": coverage}
    return Evaluation(metrics=metrics, per_user=per_user, recommendations=np.zeros((users, 10)))


def test_first_model_must_beat_popularity() -> None:
    decision = decide(ev(0.30), None, ev(0.20), GateRules())
    assert decision.promote
    assert decision.reference == "popularity"
    rejected = decide(ev(0.15), None, ev(0.20), GateRules())
    assert not rejected.promote
    assert "does not improve" in rejected.reasons[0]


def test_primary_metric_needs_the_margin() -> None:
    rules = GateRules(min_improvement=0.05)
    assert not decide(ev(0.31), ev(0.30), ev(0.1), rules, "champion v1").promote  # +3.3% < 5%
    assert decide(ev(0.32), ev(0.30), ev(0.1), rules, "champion v1").promote  # +6.7%


def test_a_negative_margin_lets_a_somewhat_worse_candidate_through_and_says_so() -> None:
    # The closed loop's and the benchmarks' permissive gate: the canary, not the holdout, decides.
    rules = GateRules(min_improvement=-0.5)
    within = decide(ev(0.20), ev(0.30), ev(0.1), rules, "champion v1")  # -33% ≥ -50%
    assert within.promote
    assert "within the allowed -50.0%" in within.reasons[0]
    assert not decide(ev(0.14), ev(0.30), ev(0.1), rules, "champion v1").promote  # -53%
    assert "improves" in decide(ev(0.31), ev(0.30), ev(0.1), rules, "champion v1").reasons[0]
    # At 0 an equal candidate is not promoted.
    assert not decide(ev(0.30), ev(0.30), ev(0.1), GateRules()).promote


def test_a_guard_regression_blocks_even_with_a_better_primary() -> None:
    rules = GateRules(guards=(("recall@10", 0.05), ("coverage@10", 0.1)))
    decision = decide(ev(0.40, coverage=0.30), ev(0.30, coverage=0.50), ev(0.1), rules)
    assert not decision.promote
    assert any("guard coverage@10" in r for r in decision.reasons)


def test_force_promotes_and_says_so() -> None:
    decision = decide(ev(0.10), ev(0.30), ev(0.1), GateRules(force=True), "champion v2")
    assert decision.promote
    assert decision.forced
    assert decision.reference == "champion v2"
    assert "forced by the operator" in decision.summary()


def test_deltas_carry_bootstrap_intervals_where_per_user_values_exist() -> None:
    decision = decide(ev(0.35), ev(0.30), ev(0.1), GateRules())
    by_metric = {d.metric: d for d in decision.deltas}
    ndcg = by_metric["ndcg@10"]
    assert ndcg.delta == pytest.approx(0.05)
    assert ndcg.ci_low < 0.05 < ndcg.ci_high
    assert by_metric["coverage@10"].ci_low is None  # a catalogue-level metric has no per-user values


def test_unknown_metrics_are_named() -> None:
    with pytest.raises(ValueError, match="primary_metric='auc'"):
        decide(ev(0.3), None, ev(0.2), GateRules(primary_metric="auc"))
