"""Benchmark: does the served list follow the simulated users' session mood? (the analysis behind
docs/benchmarks.md, "Simulated CTR@10").

    .venv/bin/python benchmarks/session_mood.py --simulate 5000:15000:7 [--history 20] [--seed 7] \
        [--set session_length=0] [--save-ctr ctr.npz]

A simulated world (``recsys_sim.simulator``; every session has a mood, the genre of its first
play, and the click model rewards the mood of the user's latest session), the product's split, the
two-tower model trained with the given ``history_length`` (and ``--set`` overrides of its other
parameters: ``session_length=0`` turns the session term off, ``mask_history_negatives=0`` the history
mask), ranked by the one scorer (``Ranker``) after each evaluated user's holdout plays, as the service
would rank them then. Per model, printed:

- the share of the top 10 in the genre of the user's latest mood, and the share of the user's last
  five plays in it (how much the mood shows in what the service has seen);
- the simulated CTR@10 of the top 10 without the plays since the cutoff;
- the same CTR if the model's own top 100 were re-ranked with the mood's genre first (an oracle: the
  headroom that following the mood would give);
- the session term's weight picked at training and its next-play validation.

``--save-ctr`` writes each evaluated user's simulated CTR@10 of the list as served (what a canary
would show them) for ``benchmarks/canary.py --models``. The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

import recsys_assets  # noqa: F401  (environment first)


def overrides(pairs: list[str]) -> dict:
    """``["history_decay=0.7", …]`` → typed ``TwoTowerParams`` overrides (the field's default's type)."""
    from recsys_assets.ml.two_tower import TwoTowerParams

    defaults = TwoTowerParams()
    out = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        if key not in TwoTowerParams.__dataclass_fields__:
            raise SystemExit(f"--set {pair}: {key!r} is not a TwoTowerParams field")
        kind = type(getattr(defaults, key))
        out[key] = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulate", default="5000:15000:7", help="USERS:TRACKS:DAYS of simulated history")
    parser.add_argument("--history", type=int, default=20, help="history_length (0: the static model)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--save-ctr", type=Path, help="write the users' simulated CTR@10 as served (npz)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PARAM=VALUE",
        help="override a TwoTowerParams field (repeatable), e.g. --set history_decay=0.7",
    )
    args = parser.parse_args()

    import quality

    from recsys_assets.ml.export import export_model
    from recsys_assets.ml.metrics import build_eval_set
    from recsys_assets.ml.split import temporal_split, validation_split
    from recsys_assets.ml.two_tower import TwoTowerParams, train_two_tower
    from recsys_core.scoring import Ranker
    from recsys_sim.simulation import world_dir
    from recsys_sim.simulator import World

    with tempfile.TemporaryDirectory() as tmp:
        source = argparse.Namespace(simulate=args.simulate, seed=args.seed, data=None, format=None)
        interactions, tracks, click, _ = quality.interactions_from(source, Path(tmp))
        world = World.load(world_dir(Path(tmp)))
        split = temporal_split(interactions, "global")
        eval_set = build_eval_set(split.train, split.holdout)
        val = validation_split(split.train, "global")
        trained = train_two_tower(split.train, tracks, (val.train, val.holdout),
                                  TwoTowerParams(history_length=args.history, **overrides(args.set)))  # fmt: skip
        ranker = Ranker(export_model(trained, split.train, {}, Path(tmp) / "v1", k=10), 1)
        plays = quality.plays_since_cutoff(split)
        mood = world.a["user_mood"]
        top_share, heard_share, ctr, oracle, as_served = [], [], [], [], []
        for user in map(str, eval_set.users):
            heard = plays.get(user, [])
            listed = ranker.recommend(user, 100 + len(heard), recent=heard).track_ids
            as_served.append(click(np.array([user] * 10, dtype=object), np.array(listed[:10], dtype=object)).mean())
            served = [t for t in listed if t not in heard]
            u = world._indices([user], "u", world.n_users)[0]
            in_mood = world.track_genre(world._indices(served, "t", world.n_tracks)) == mood[u]
            p = np.asarray(click(np.array([user] * len(served), dtype=object), np.array(served, dtype=object)))
            top_share.append(in_mood[:10].mean())
            ctr.append(p[:10].mean())
            oracle.append(p[np.argsort(~in_mood, kind="stable")[:10]].mean())
            if heard:
                heard_share.append(
                    (world.track_genre(world._indices(heard[:5], "t", world.n_tracks)) == mood[u]).mean()
                )
    summary = {
        "simulate": args.simulate, "history_length": args.history, "overrides": args.set, "users": len(eval_set.users),
        "top10_in_mood": float(np.mean(top_share)), "last5_plays_in_mood": float(np.mean(heard_share)),
        "sim_ctr@10_unheard": float(np.mean(ctr)), "sim_ctr@10_as_served": float(np.mean(as_served)),
        "sim_ctr@10_mood_first_oracle": float(np.mean(oracle)),
        "session_weight": trained.session_weight, "session_scores": trained.session_scores,
    }  # fmt: skip
    if args.save_ctr:
        np.savez(args.save_ctr, users=np.array(eval_set.users, dtype=str), ctr=np.array(as_served))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
