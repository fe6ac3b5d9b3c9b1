"""Benchmark: the canary's false-decision rate and power, by simulation (no servers).

    .venv/bin/python benchmarks/canary.py [--aa 500 --power 200 --users 2000]

Three methods, each looked at exactly as ``canary_sensor`` looks (one analysis every
``min_impressions`` more impressions on the smaller variant, up to ``max_impressions``):

- ``old``: the previous decision, kept here verbatim for the comparison: a pooled two-proportion
  z-test on impressions at every look, fixed 30% split;
- ``ab``: the new always-valid user-level test (``recsys_assets.ml.canary``), progressive steps;
- ``interleaving``: team-draft interleaving for the canary users, the same test paired within users.

The simulated users are heterogeneous, as the simulator's are: each has a click propensity drawn from
Beta(1.2, 2.8) (mean 30%), a rejection propensity from Beta(1, 19), a completion propensity from
Beta(6, 4), and an activity (share of the requests) from a log-normal(0, 1.2). A request shows 10
items; a challenger truly better by δ has every item's click probability multiplied by 1 + δ (the
simulator's click model). In interleaving, each list holds 5 items from each model (team draft with
non-overlapping lists); the position effect is balanced by the draft's coin flips and left out.

With ``--models CHAMPION.npz CHALLENGER.npz`` (``benchmarks/session_mood.py --save-ctr``), the users'
click propensities are two real models' instead: each evaluated user of a simulated world clicks
each item of a variant's list with the simulated CTR@10 of the list that model serves them (the
simulator's click model, after their plays since the cutoff); the other propensities and the
activity are drawn as above. Reported: how the canaries end (``--power`` of them per method) and the
median impressions to the decision: can the canary see the difference between the two models?

Reported per method: the A/A false-decision rate (the same model in both variants: the share of
canaries that end on a *significant* promotion or rollback), and for true effects of ±3%, ±5% and
±10% relative CTR the share of correct significant decisions and the median impressions (all traffic,
both variants) to that decision. The last line printed is one JSON object with those numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys_assets.ml.canary import AB, INTERLEAVING, Arm, CanaryRules, Stratum, decide_canary

K = 10
EFFECTS = (-0.10, -0.05, -0.03, 0.03, 0.05, 0.10)
MODES_SEED = {"old": 0, AB: 1, INTERLEAVING: 2}


@dataclass(frozen=True)
class World:
    activity: np.ndarray  # cumulative shares of the requests, for drawing users
    ctr: np.ndarray
    rejection: np.ndarray
    completion: np.ndarray
    hash: np.ndarray  # the user's canary bucket in [0, 1)
    challenger_ctr: np.ndarray | None = None  # per user, with --models (else ctr × (1 + lift))


def world(rng: np.random.Generator, users: int, models: tuple[np.ndarray, np.ndarray] | None = None) -> World:
    """Random heterogeneous users, or with ``models`` (champion's and challenger's CTR per user), those."""
    if models is not None:
        users = len(models[0])
    activity = rng.lognormal(0.0, 1.2, users)
    return World(
        activity=np.cumsum(activity / activity.sum()),
        ctr=rng.beta(1.2, 2.8, users) if models is None else models[0],
        rejection=rng.beta(1.0, 19.0, users),
        completion=rng.beta(6.0, 4.0, users),
        hash=rng.random(users),
        challenger_ctr=None if models is None else models[1],
    )


def model_ctrs(champion: Path, challenger: Path) -> tuple[np.ndarray, np.ndarray]:
    """The per-user CTRs of two ``session_mood.py --save-ctr`` files, on the users both evaluated."""
    with np.load(champion) as a, np.load(challenger) as b:
        _, ia, ib = np.intersect1d(a["users"], b["users"], return_indices=True)
        return a["ctr"][ia], b["ctr"][ib]


# --- the previous test, verbatim in substance (recsys_assets/ml/canary.py before this change) ---------


def two_proportion_test(successes_a: int, n_a: int, successes_b: int, n_b: int) -> tuple[float, float]:
    if n_a == 0 or n_b == 0:
        return 0.0, 1.0
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 0.0, 1.0
    z = (successes_b / n_b - successes_a / n_a) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def old_decision(a: dict, b: dict, min_impressions: int, max_impressions: int, alpha: float = 0.05) -> str:
    fewest = min(a["impressions"], b["impressions"])
    if fewest < min_impressions:
        return "wait"
    ctr_z, ctr_p = two_proportion_test(a["clicks"], a["impressions"], b["clicks"], b["impressions"])
    rej_z, rej_p = two_proportion_test(a["rejections"], a["impressions"], b["rejections"], b["impressions"])
    if rej_p < alpha and rej_z > 0:
        return "rollback"
    if ctr_p < alpha:
        return "promote" if ctr_z > 0 else "rollback"
    if fewest >= max_impressions:
        return "promote-horizon"  # the old rule: no significant difference means no harm
    return "wait"


# --- one simulated canary -------------------------------------------------------------------------


def _responses(rng, w: World, users: np.ndarray, n_items: int, lift: float, challenger: bool = False):
    if challenger and w.challenger_ctr is not None:
        p = w.challenger_ctr[users]
    else:
        p = np.minimum(w.ctr[users] * (1 + (lift if challenger else 0.0)), 1.0)
    clicks = rng.binomial(n_items, p)
    return {
        "impressions": np.full(len(users), n_items, dtype=np.int64),
        "clicks": clicks,
        "conversions": rng.binomial(clicks, w.completion[users]),
        "rejections": rng.binomial(n_items, w.rejection[users]),
    }


def _add(acc: dict[str, np.ndarray], users: np.ndarray, counts: dict[str, np.ndarray]) -> None:
    for name, values in counts.items():
        acc[name] += np.bincount(users, weights=values, minlength=len(acc[name]))


def _arm(acc: dict[str, np.ndarray], who: np.ndarray) -> Arm:
    return Arm(*(acc[name][who] for name in ("impressions", "clicks", "conversions", "rejections")))


def simulate(method: str, lift: float, rng: np.random.Generator, args) -> tuple[str, int, int]:
    """Run one canary to its decision; return (decision, challenger impressions by then, impressions of
    all traffic by then)."""
    w = world(rng, args.users, args.model_ctrs)
    n = len(w.ctr)
    steps = (0.3,) if method == "old" else tuple(args.steps)
    rules = CanaryRules(steps=steps, min_impressions=args.min_impressions, max_impressions=args.max_impressions,
                        tau=args.tau)  # fmt: skip
    zeros = lambda: {name: np.zeros(n) for name in ("impressions", "clicks", "conversions", "rejections")}  # noqa: E731
    per_step: list[tuple[dict, dict]] = [(zeros(), zeros())]  # (champion or team A, challenger or team B)
    step, total_impressions, looks_done = 0, 0, 0
    while True:
        # Requests between two checks of the look schedule: about half a look's worth on the smaller side.
        smaller_per_request = (K // 2) * steps[step] if method == INTERLEAVING else K * min(steps[step], 0.5)
        chunk = max(20, int(args.min_impressions / 2 / smaller_per_request))
        users = np.minimum(np.searchsorted(w.activity, rng.random(chunk)), n - 1)
        in_canary = w.hash[users] < steps[step]
        champion_acc, challenger_acc = per_step[step]
        if method == INTERLEAVING:
            # The other users get the champion's list, outside the test.
            canary = users[in_canary]
            _add(champion_acc, canary, _responses(rng, w, canary, K // 2, 0.0))
            _add(challenger_acc, canary, _responses(rng, w, canary, K // 2, lift, challenger=True))
        else:
            _add(challenger_acc, users[in_canary], _responses(rng, w, users[in_canary], K, lift, challenger=True))
            _add(champion_acc, users[~in_canary], _responses(rng, w, users[~in_canary], K, 0.0))
        total_impressions += chunk * K
        a_total = sum(acc[0]["impressions"].sum() for acc in per_step)
        b_total = sum(acc[1]["impressions"].sum() for acc in per_step)
        fewest = min(a_total, b_total)
        looks_due = int(fewest // args.min_impressions)
        if looks_due <= looks_done:
            continue
        looks_done = looks_due
        if method == "old":
            a = {k: v.sum() for k, v in per_step[0][0].items()}
            b = {k: v.sum() for k, v in per_step[0][1].items()}
            action = old_decision(a, b, args.min_impressions, args.max_impressions)
        else:
            strata = []
            for s, (acc_a, acc_b) in enumerate(per_step):
                if method == INTERLEAVING:
                    who = np.flatnonzero(acc_b["impressions"] > 0)
                    strata.append(Stratum(s, steps[s], _arm(acc_a, who), _arm(acc_b, who), paired=True))
                else:
                    strata.append(Stratum(s, steps[s], _arm(acc_a, np.flatnonzero(acc_a["impressions"] > 0)),
                                          _arm(acc_b, np.flatnonzero(acc_b["impressions"] > 0))))  # fmt: skip
            mode = INTERLEAVING if method == INTERLEAVING else AB
            decision = decide_canary(strata, rules, step=step, mode=mode, intervals=False)
            action = decision.action
            if "no significant difference" in decision.reason:
                action += "-horizon"
            if action == "step_up":
                step += 1
                per_step.append((zeros(), zeros()))
                continue
        if action != "wait":
            return action, int(b_total), total_impressions


def run_models(args) -> dict:
    """``--models``: how the canaries between the two real models end."""
    results: dict[str, dict] = {}
    champion, challenger = args.model_ctrs
    print(f"{len(champion)} users; mean CTR@10 champion {champion.mean():.4f}, challenger {challenger.mean():.4f}")
    for method in args.methods:
        rng = np.random.default_rng([args.seed, MODES_SEED[method]])
        outcomes = [simulate(method, 0.0, rng, args) for _ in range(args.power)]
        ends = {a: sum(1 for action, *_ in outcomes if action == a) / len(outcomes) for a, *_ in outcomes}
        promoted = [(exposed, traffic) for action, exposed, traffic in outcomes if action == "promote"]
        results[method] = {
            "canaries": len(outcomes),
            "ends": ends,
            "impressions_to_promotion": int(np.median([p[0] for p in promoted])) if promoted else None,
            "traffic_impressions_to_promotion": int(np.median([p[1] for p in promoted])) if promoted else None,
        }
        print(f"{method:<13} {ends}; median challenger impressions to promotion "
              f"{results[method]['impressions_to_promotion']}", flush=True)  # fmt: skip
    return {"champion_ctr": float(champion.mean()), "challenger_ctr": float(challenger.mean()),
            "users": len(champion), "methods": results}  # fmt: skip


def run(args) -> dict:
    results: dict[str, dict] = {}
    for method in args.methods:
        rng = np.random.default_rng([args.seed, MODES_SEED[method]])
        started = time.perf_counter()
        aa = [simulate(method, 0.0, rng, args) for _ in range(args.aa)]
        false = sum(1 for action, *_ in aa if action in ("promote", "rollback"))
        row = {
            "aa_false_decision_rate": false / len(aa),
            "aa_canaries": len(aa),
            "impressions_to_decision": {},
            "traffic_impressions_to_decision": {},
            "correct_decision_rate": {},
            "power_canaries": args.power,
        }
        for effect in EFFECTS:
            outcomes = [simulate(method, effect, rng, args) for _ in range(args.power)]
            correct = "promote" if effect > 0 else "rollback"
            hits = [(exposed, traffic) for action, exposed, traffic in outcomes if action == correct]
            key = f"{effect:+.0%}"
            row["correct_decision_rate"][key] = len(hits) / len(outcomes)
            row["impressions_to_decision"][key] = int(np.median([h[0] for h in hits])) if hits else None
            row["traffic_impressions_to_decision"][key] = int(np.median([h[1] for h in hits])) if hits else None
        row["seconds"] = round(time.perf_counter() - started, 1)
        results[method] = row
        print(f"{method:<13} A/A false decisions {row['aa_false_decision_rate']:6.1%} over {len(aa)} canaries "
              f"({row['seconds']} s)", flush=True)  # fmt: skip
        for effect in EFFECTS:
            key = f"{effect:+.0%}"
            print(f"  {key:>5}: correct {row['correct_decision_rate'][key]:6.1%}; median challenger impressions "
                  f"{row['impressions_to_decision'][key]}, all traffic {row['traffic_impressions_to_decision'][key]}",
                  flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aa", type=int, default=500, help="A/A canaries per method")
    parser.add_argument("--power", type=int, default=200, help="canaries per method and true effect")
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--min-impressions", type=int, default=5000)
    parser.add_argument("--max-impressions", type=int, default=400000)
    parser.add_argument("--steps", type=float, nargs="+", default=[0.05, 0.2, 0.5])
    parser.add_argument("--tau", type=float, default=CanaryRules.tau)
    parser.add_argument("--methods", nargs="+", default=["old", AB, INTERLEAVING])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--models", type=Path, nargs=2, metavar=("CHAMPION", "CHALLENGER"),
                        help="per-user CTRs of two models (benchmarks/session_mood.py --save-ctr)")  # fmt: skip
    args = parser.parse_args()
    args.model_ctrs = model_ctrs(*args.models) if args.models else None
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{args.users} users, looks every {args.min_impressions} impressions on the smaller variant up to "
          f"{args.max_impressions}; steps {args.steps} (old: 30%)", flush=True)  # fmt: skip
    results = run_models(args) if args.models else run(args)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
