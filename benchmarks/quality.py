"""Benchmark: offline quality of the two-tower model against popularity and EASE, same split, same run.

    .venv/bin/python benchmarks/quality.py --data ../shared/data/ml-latest-small/ratings.csv --format movielens
    .venv/bin/python benchmarks/quality.py --data ../shared/data/ml-latest-small/ratings.csv \
        --format movielens --protocol user
    .venv/bin/python benchmarks/quality.py --simulate 5000:20000:60            # users:tracks:days of simulated data
    .venv/bin/python benchmarks/quality.py --simulate 20000:60000:7 --models two_tower    # training time at ~1M events
    .venv/bin/python benchmarks/quality.py --suite --protocol user       # the robustness suite, 3 seeds each

Built on the product's own code, not a copy: the file goes through the importer into a throw-away
warehouse, the cleaning and the training-interactions features, the split protocol, the two-tower
training and the evaluation. EASE's λ is picked on the validation split (the same one the two-tower
model stops early on). The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import recsys_assets  # noqa: F401  (environment first)

EASE_LAMBDAS = (50.0, 200.0, 500.0, 1000.0, 3000.0)
MAX_EASE_ITEMS = 20_000


def interactions_from(args, workdir: Path):
    """Positive interactions and, for simulated data, the click model."""

    from recsys_assets.data import features as F
    from recsys_assets.data.cleaning import CleaningRules, clean_events
    from recsys_assets.data.importers import import_file
    from recsys_core.contracts import TRACKS_SCHEMA, USERS_SCHEMA
    from recsys_core.warehouse import Warehouse
    from recsys_sim.simulation import simulate_history, world_dir
    from recsys_sim.simulator import World

    warehouse = Warehouse(f"duckdb:///{workdir / 'warehouse.duckdb'}")
    click_model = None
    t0 = time.perf_counter()
    if args.simulate:
        users, tracks, days = (int(x) for x in args.simulate.split(":"))
        simulate_history(warehouse, workdir, users=users, tracks=tracks, days=days, seed=args.seed,
                         end=datetime(2026, 11, 1, tzinfo=UTC))  # fmt: skip
        click_model = World.load(world_dir(workdir)).click_probability
    else:
        import_file(warehouse, args.format, Path(args.data))
    last = warehouse.scalar("SELECT MAX(batch_id) FROM ingest_batches")
    raw, catalogue = variant(
        warehouse.events_between(0, last), warehouse.table("tracks", TRACKS_SCHEMA), args.variant or ""
    )
    # Historical datasets predate the streaming-era default of the "too old" rule (MovieLens starts in 1995).
    rules = CleaningRules(earliest=datetime(1990, 1, 1, tzinfo=UTC))
    result = clean_events(
        raw, catalogue, warehouse.table("users", USERS_SCHEMA),
        now=datetime.now(UTC), origin="benchmark", rules=rules,
    )  # fmt: skip
    if result.quarantined.height:
        print(f"quarantined {result.quarantined.height:,} events", file=sys.stderr)
    clean = result.clean
    interactions = F.training_interactions(clean.lazy()).collect()
    tracks = F.track_features(clean.lazy()).collect()
    print(
        f"data: {raw.height:,} events, {interactions.height:,} positives in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return interactions, tracks, click_model, raw.height


VARIANTS = ("implicit", "day", "nogenre", "sparse:N")


def variant(raw, catalogue, spec: str):
    """The raw events and the catalogue made like a dataset with other properties (``spec``:
    comma-separated, applied in this order): ``implicit``, plays only (no likes, so no ratings either);
    ``day``, timestamps truncated to the day (many events share an instant); ``nogenre``, the catalogue
    without genres; ``sparse:N``, at most N events a user, drawn by a hash of the event (the same sample in
    every run), which leaves a long tail of tracks heard by one or two users."""
    import polars as pl

    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "implicit":
            raw = raw.filter(pl.col("event_type") == "play")
        elif part == "day":
            raw = raw.with_columns(pl.col("played_at").dt.truncate("1d"))
        elif part == "nogenre":
            catalogue = catalogue.with_columns(pl.lit(None, pl.String).alias("genre"))
        elif part.startswith("sparse:"):
            keep = int(part.split(":", 1)[1])
            # A hash of the event, not a shuffle of the rows: the warehouse returns them in no fixed
            # order, and a shuffle over them drew another sample in every process.
            event = pl.struct("user_id", "track_id", "event_type", "played_at").hash(seed=0)
            raw = raw.filter(event.rank("ordinal").over("user_id") <= keep)
        else:
            raise SystemExit(f"--variant {part!r}: expected some of {', '.join(VARIANTS)}")
    return raw, catalogue


# The robustness suite (issue "Quality that holds on data you did not tune on"): datasets with the
# properties of a hidden implicit music set (day-granular timestamps, no likes or ratings, no genres, a
# long tail of items heard by one or two users), next to the data the defaults were chosen on.
ML = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small" / "ratings.csv"
SUITE = {
    "ml-latest-small": ["--data", str(ML)],
    "ml-implicit-day": ["--data", str(ML), "--variant", "implicit,day"],
    "ml-sparse-tail": ["--data", str(ML), "--variant", "implicit,day,nogenre,sparse:45"],
    "sim-day-nogenre": ["--simulate", "2000:8000:30", "--variant", "implicit,day,nogenre"],
}
SUITE_SEEDS = (42, 43, 44)


def suite(protocol: str, seeds: tuple[int, ...], names: list[str], extra: list[str]) -> None:
    """Every dataset of ``SUITE`` with every seed, each run in a fresh process of this script (the
    two-tower, EASE and popularity on the same split); one JSON line per dataset: each model's mean
    NDCG@10 and recall@10 over the seeds, the two-tower's ratios to EASE and popularity of those
    means, and every seed's figures."""
    import subprocess

    import numpy as np

    for name in names:
        runs = []
        t0 = time.perf_counter()
        for seed in seeds:
            command = [sys.executable, __file__, *SUITE[name], "--protocol", protocol, "--seed", str(seed), *extra]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name}, seed {seed}: failed\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        models = {}
        for model in ("two_tower", "ranked", "ease", "popularity"):
            values = [r["models"].get(model, {}) for r in runs]
            if all("ndcg@10" in v for v in values):
                models[model] = {m: float(np.mean([v[m] for v in values])) for m in ("ndcg@10", "recall@10")}
        line = {
            "dataset": name,
            "protocol": protocol,
            "seeds": list(seeds),
            "split": runs[0]["split"],
            "models": models,
            "seconds": round(time.perf_counter() - t0, 1),
            "per_seed": [
                {
                    "seed": seed,
                    **{m: r["models"][m].get("ndcg@10") for m in r["models"]},
                    "two_tower_seconds": r["models"].get("two_tower", {}).get("train_seconds"),
                    "tuning": r["models"].get("two_tower", {}).get("tuning"),
                    "ranker_kept": r["models"].get("ranked", {}).get("ranker_kept"),
                    "ranker_gain_ci": r["models"].get("ranked", {}).get("ranker_gain_ci"),
                    "ranked_if_applied": r["models"].get("ranked", {}).get("ndcg@10_if_applied"),
                    "ranker_seconds": r["models"].get("ranked", {}).get("train_seconds"),
                    "ranker_ease_lambda": r["models"].get("ranked", {}).get("ranker_ease_lambda"),
                }
                for seed, r in zip(seeds, runs, strict=True)
            ],
        }
        for mine in ("two_tower", "ranked"):
            for peer in ("ease", "popularity"):
                if mine in models and peer in models:
                    line[f"{mine}_vs_{peer}"] = {m: models[mine][m] / models[peer][m] for m in models[mine]
                                                 if models[peer][m]}  # fmt: skip
        print(json.dumps(line), flush=True)


def ranked_metrics(trained, tracks, split, val, val_set, eval_set, score, click_model, seed) -> dict:
    """The ranking stage (ml/ranker.py) trained on the validation split's candidates of the model before
    its refit, then reranking the final model's top candidates on the holdout (unless it was not kept):
    the metrics, and the ranker's own validation."""
    import numpy as np

    from recsys_assets.ml.metrics import evaluate
    from recsys_assets.ml.ranker import candidates_of, heard_columns, learn_on_validation, ranker_tables
    from recsys_core.ranking import rerank

    t0 = time.perf_counter()
    fitted = learn_on_validation(trained, val.train, val_set, tracks, seed,
                                 progress=lambda r: print(f"  ranker {r}", file=sys.stderr))  # fmt: skip
    train_seconds = time.perf_counter() - t0
    eval_tables = ranker_tables(split.train, tracks, eval_set.items, fitted.ease_lambda)
    heard = heard_columns(eval_set)
    scores = score(eval_set.users)
    candidates, picked = candidates_of(scores, heard)
    reranked = rerank(fitted.ranker, eval_tables, heard, candidates, picked)
    position = {u: i for i, u in enumerate(eval_set.users)}

    def result_of(order: np.ndarray):
        final = np.full(scores.shape, -np.inf, dtype=np.float32)
        places = np.arange(order.shape[1], 0, -1, dtype=np.float32)[None].repeat(len(order), 0)
        np.put_along_axis(final, order, places, axis=1)
        return evaluate(lambda users: final[[position[u] for u in users]], eval_set, click_model=click_model)

    # Not kept (its gain on its own validation is within the noise): the retrieval order is served.
    result = result_of(reranked if fitted.useful else candidates)
    return {**result.metrics, "train_seconds": train_seconds, "ranker_val_ndcg@10": fitted.val_ndcg,
            "retrieval_val_ndcg@10": fitted.val_ndcg_retrieval, "ranker_epochs": fitted.epochs_per_fold,
            "ranker_gain_ci": fitted.gain_ci, "ranker_kept": fitted.useful, "ranker_ease_lambda": fitted.ease_lambda,
            "ndcg@10_if_applied": result_of(reranked).metrics["ndcg@10"]}  # fmt: skip


def plays_since_cutoff(split) -> dict[str, list[str]]:
    """Each user's distinct holdout tracks, most recent first: what the service would have seen of
    them since the cutoff."""
    import polars as pl

    recent = (
        split.holdout.sort("played_at", descending=True)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("track_id").unique(maintain_order=True))
    )
    return dict(zip(recent["user_id"].to_list(), recent["track_id"].to_list(), strict=True))


def served_ctr(trained, split, eval_set, click_model) -> dict[str, float]:
    """Simulated CTR@10 of the lists the service would serve at the end of the simulated holdout.

    The version is exported and ranked by the one scorer (``recsys_core.scoring.Ranker``), as
    ``/recommend`` does, with each user's holdout plays as the plays the service has seen since the
    cutoff (``/feedback`` and the warehouse poll feed them to ``serving/user_state.py``): a
    history-aware version moves its query with them and leaves them out of the list, a static one
    does neither. The click model's short-term taste is the mood of each user's latest session, which
    those plays end with. ``sim_ctr@10_as_served``: the lists as served; ``…_unheard``: the top 10
    without the plays since the cutoff for either kind of version, so that only the ranking differs.
    """
    import numpy as np

    from recsys_assets.ml.export import export_model
    from recsys_core.scoring import Ranker

    plays = plays_since_cutoff(split)
    lists: dict[str, tuple[list[str], list[str], list[int]]] = {"as_served": ([], [], []), "unheard": ([], [], [])}
    with tempfile.TemporaryDirectory() as tmp:
        ranker = Ranker(export_model(trained, split.train, {}, Path(tmp) / "v1", k=10), 1)
        for user in map(str, eval_set.users):
            heard = plays.get(user, [])
            served = ranker.recommend(user, 10 + len(heard), recent=heard).track_ids
            heard_set = set(heard)
            unheard = [t for t in served if t not in heard_set][:10]
            for name, tracks in (("as_served", served[:10]), ("unheard", unheard)):
                users, items, counts = lists[name]
                users += [user] * len(tracks)
                items += tracks
                counts.append(len(tracks))
    out = {}
    for name, (users, items, counts) in lists.items():
        probability = np.asarray(click_model(np.array(users, dtype=object), np.array(items, dtype=object)))
        starts = np.cumsum([0, *counts[:-1]])
        out[f"sim_ctr@10_{name}"] = float((np.add.reduceat(probability, starts) / np.maximum(counts, 1)).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a file the importers read")
    source.add_argument("--simulate", help="USERS:TRACKS:DAYS of simulated history")
    source.add_argument("--suite", action="store_true",
                        help=f"the robustness suite: {', '.join(SUITE)}; one JSON line per dataset")  # fmt: skip
    parser.add_argument("--variant", help=f"comma-separated: {', '.join(VARIANTS)} (see variant())")
    parser.add_argument("--datasets", help="with --suite: a comma-separated subset")
    parser.add_argument("--seeds", default=",".join(map(str, SUITE_SEEDS)), help="with --suite: the model seeds")
    parser.add_argument("--format", default="movielens", help="importer format of --data")
    parser.add_argument("--protocol", choices=("global", "user"), default="global")
    parser.add_argument("--models", default="two_tower,popularity,ease", help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, help="override max_epochs")
    parser.add_argument("--dim", type=int, help="override embedding_dim")
    parser.add_argument("--lr", type=float, help="override learning_rate")
    parser.add_argument("--batch", type=int, help="override batch_size")
    parser.add_argument("--temperature", type=float, help="override temperature")
    parser.add_argument("--refit", choices=("warm", "scratch", "none"), help="override refit")
    parser.add_argument("--l2", type=float, help="override l2")
    parser.add_argument("--no-logq", action="store_true", help="turn off the logQ correction")
    parser.add_argument("--no-user-features", action="store_true", help="id embeddings only in the query tower")
    parser.add_argument("--history", type=int, help="override history_length (the query tower's last N tracks)")
    parser.add_argument("--decay", type=float, help="override history_decay (recency weighting of the history)")
    parser.add_argument("--history-attributes", type=int, choices=(0, 1), help="override history_attributes")
    parser.add_argument("--params", default="{}", help="JSON of TwoTowerParams fields to override (any field)")
    parser.add_argument("--tune", type=float, help="search the hyperparameters for this many seconds first")
    parser.add_argument("--ranker", action="store_true", help="also rerank the two-tower's top candidates")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.suite:  # the other options (model overrides) go to every run
        names = args.datasets.split(",") if args.datasets else list(SUITE)
        own = {"--suite": 0, "--datasets": 1, "--seeds": 1, "--protocol": 1}
        extra, rest = [], iter(sys.argv[1:])
        for arg in rest:
            if arg.split("=", 1)[0] in own:
                for _ in range(own[arg.split("=", 1)[0]] if "=" not in arg else 0):
                    next(rest)
            else:
                extra.append(arg)
        suite(args.protocol, tuple(int(s) for s in args.seeds.split(",")), names, extra)
        return

    import numpy as np

    from recsys_assets.ml.baselines import ease_scorer
    from recsys_assets.ml.metrics import build_eval_set, evaluate, popularity_scorer
    from recsys_assets.ml.split import temporal_split, validation_split
    from recsys_assets.ml.two_tower import TwoTowerParams, train_two_tower

    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        interactions, tracks, click_model, events = interactions_from(args, Path(tmp))
    split = temporal_split(interactions, args.protocol)
    eval_set = build_eval_set(split.train, split.holdout)
    val = validation_split(split.train, args.protocol)
    val_set = build_eval_set(val.train, val.holdout)
    summary: dict = {
        "protocol": args.protocol,
        "data": args.data or f"simulated {args.simulate}",
        "events": events,
        "split": {**split.sizes(), **eval_set.sizes(), "cutoff": str(split.cutoff) if split.cutoff else None},
        "models": {},
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}",
    }
    if "popularity" in models:
        t0 = time.perf_counter()
        result = evaluate(popularity_scorer(split.train, eval_set.items), eval_set, click_model=click_model)
        summary["models"]["popularity"] = {**result.metrics, "train_seconds": time.perf_counter() - t0}
    if "ease" in models:
        if eval_set.n_items > MAX_EASE_ITEMS:
            summary["models"]["ease"] = {"skipped": f"{eval_set.n_items} items > {MAX_EASE_ITEMS} (dense inverse)"}
        else:
            best = max(
                EASE_LAMBDAS,
                key=lambda lam: evaluate(ease_scorer(val.train, val_set.items, lam), val_set).metrics["ndcg@10"],
            )
            t0 = time.perf_counter()
            scorer = ease_scorer(split.train, eval_set.items, best)
            seconds = time.perf_counter() - t0
            result = evaluate(scorer, eval_set, click_model=click_model)
            summary["models"]["ease"] = {**result.metrics, "lambda": best, "train_seconds": seconds}
    if "two_tower" in models:
        overrides = {
            k: v
            for k, v in {
                "max_epochs": args.epochs, "embedding_dim": args.dim, "learning_rate": args.lr,
                "batch_size": args.batch, "temperature": args.temperature, "refit": args.refit, "l2": args.l2,
                "logq_correction": False if args.no_logq else None,
                "use_user_features": False if args.no_user_features else None,
                "history_length": args.history, "history_decay": args.decay,
                "history_attributes": None if args.history_attributes is None else bool(args.history_attributes),
            }.items()
            if v is not None
        }  # fmt: skip
        params = TwoTowerParams(**{"seed": args.seed, **overrides, **json.loads(args.params)})
        tuning = None
        if args.tune:  # the per-training search on the train side's validation split (never the holdout)
            from recsys_assets.ml.ranker import served_validation_ndcg
            from recsys_assets.ml.tuning import TUNED, tune

            # With the ranking stage the finalists are judged by what each would serve, as the asset does.
            judge = partial(served_validation_ndcg, window=split.train, tracks=tracks, protocol=args.protocol)
            tuning = tune(split.train, tracks, args.protocol, params, args.tune,
                          on_trial=lambda r: print(f"  trial {r}", file=sys.stderr),
                          judge=judge if args.ranker else None)  # fmt: skip
            params = tuning.params
        t0 = time.perf_counter()
        trained = train_two_tower(
            split.train, tracks, (val.train, val.holdout), params,
            progress=lambda r: print(f"  epoch {r}", file=sys.stderr),
        )  # fmt: skip
        wall = time.perf_counter() - t0
        from recsys_assets.ml.two_tower import Vocabulary

        rows = Vocabulary.index(__import__("polars").Series(eval_set.items), trained.vocab.items)
        candidates = trained.item_embeddings[rows]

        def score(users: np.ndarray) -> np.ndarray:
            user_rows = Vocabulary.index(__import__("polars").Series(users), trained.vocab.users)
            return trained.user_embeddings[user_rows] @ candidates.T

        result = evaluate(score, eval_set, click_model=click_model)
        if args.ranker:
            summary["models"]["ranked"] = ranked_metrics(trained, tracks, split, val, val_set, eval_set, score,
                                                         click_model, args.seed)  # fmt: skip
        summary["models"]["two_tower"] = {
            **result.metrics,
            **(served_ctr(trained, split, eval_set, click_model) if click_model else {}),
            "train_seconds": wall,
            "examples_per_second": trained.examples_per_second,
            "popularity_prior": trained.popularity_prior,
            "session_weight": trained.session_weight,
            "session_scores": trained.session_scores,
            "best_epoch": trained.best_epoch,
            # What the defaults are chosen on (never the holdout): the early-stopping epoch's score.
            "val_recall@20": max((h["val_recall@20"] for h in trained.history if "val_recall@20" in h), default=None),
            "pairs": trained.pairs,
            "params": params.__dict__,
            **(
                {
                    "tuning": {
                        "seconds": tuning.seconds,
                        "trials": len(tuning.trials),
                        "best_val_recall@20": tuning.best_value,
                        "chosen_trial": tuning.chosen_trial,
                        "finalists": tuning.finalists,
                        "chosen": {k: getattr(params, k) for k in TUNED},
                    }
                }
                if tuning
                else {}
            ),  # fmt: skip
        }
    tt = summary["models"].get("two_tower", {})
    for peer in ("popularity", "ease"):
        if tt and "ndcg@10" in summary["models"].get(peer, {}):
            other = summary["models"][peer]
            summary[f"two_tower_vs_{peer}"] = {
                m: tt[m] / other[m] if other[m] else None for m in ("ndcg@10", "recall@10")
            }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
