"""Social evaluation on a `sharefeed demo-data` folder (issue #5): influence against degree, and whether share
suggestions recover the shares people went on to make.

(a) Influence: precision@k of the influence score (features.attribution) and of degree (features.social)
    against truth.json's planted influencers, with the planted decoys (many friends, no conversions) present;
    the share of decoys in each top k beside it. Everything as of the end of the data.
(b) Share suggestions: split at the last `--test-days`; the graph, the attribution and an ALS fit
    (training.als.fit_als) see only the past, and so does a bundle `sharefeed train` writes from the past
    events (default parameters). For every user who shares in the test window and is known in the past,
    `serving.share_suggestions.suggest_shares` proposes k items x f friends: as served (the bundle's share
    inputs, items in the order of the user's ranked feed) and with the share-propensity formula that
    bundles without a ranker use (weights picked on the week before the test); the baseline proposes
    the user's most popular recent purchases (padded with their most popular viewed items, then the most
    popular items) to f random people they reach. A test share is recovered at item level when its
    (sharer, item) was proposed, at recipient level when (sharer, item, recipient) was. Same users, same k, f.
    Ratios carry a 95% bootstrap interval over sharers.

    uv run python benchmarks/social_eval.py --data /tmp/h5/demo --out /tmp/h5/social.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.attribution import attribute
from features.dataset import load_dataset
from features.interactions import user_items_matrix
from features.social import EdgeKind, build_social_graph
from features.vocab import Vocabulary
from serving.recommender import Recommender
from serving.share_suggestions import ShareInputs, ShareWeights, open_rates, ranked_feed, suggest_shares
from training.als import fit_als
from training.bundle import load_bundle
from training.params import TrainParams
from training.pipeline import train
from training.settings import TrainingSettings

K_INFLUENCE = (10, 25, 50, 100, 200)


def influence_table(data_dir: Path, events: pd.DataFrame, social: pd.DataFrame | None) -> list[dict[str, Any]]:
    truth = json.loads((data_dir / "truth.json").read_text())
    influencers, decoys = set(truth["influencers"]), set(truth["decoys"])
    cut = events["ts"].max() + pd.Timedelta(1, "ns")
    graph = build_social_graph(social, events, cut)
    attribution = attribute(events, cut)
    ids = graph.users.ids
    scores = {
        "influence": attribution.users["influence"].reindex(ids).fillna(0.0).to_numpy(),
        "conversions driven": attribution.users["conversions"].reindex(ids).fillna(0).to_numpy(float),
        "degree (all ties)": graph.degree().astype(float),
        "degree (friends and follows)": graph.degree(EdgeKind.FRIEND | EdgeKind.FOLLOW).astype(float),
        "shares sent": attribution.users["shares_sent"].reindex(ids).fillna(0).to_numpy(float),
    }
    rows = []
    for k in K_INFLUENCE:
        row: dict[str, Any] = {"k": k, "influencers": len(influencers), "decoys": len(decoys)}
        for name, score in scores.items():
            top = ids[np.argsort(-score, kind="stable")[:k]]
            row[f"{name} precision"] = float(np.mean([u in influencers for u in top]))
            row[f"{name} decoy share"] = float(np.mean([u in decoys for u in top]))
        rows.append(row)
    return rows


def _matrix(frame: pd.DataFrame, users: Vocabulary, items: Vocabulary, values: np.ndarray) -> sp.csr_matrix:
    rows, cols = users.indexes(frame["user_id"]), items.indexes(frame["item_id"])
    keep = (rows >= 0) & (cols >= 0)
    matrix = sp.csr_matrix((values[keep], (rows[keep], cols[keep])), shape=(len(users), len(items)))
    matrix.sum_duplicates()
    return matrix


def past_inputs(events: pd.DataFrame, social: pd.DataFrame | None, cut: pd.Timestamp,
                params: TrainParams) -> tuple[ShareInputs, pd.DataFrame]:
    """Everything share suggestions read, fitted on events before `cut` only."""
    past = events.loc[events["ts"] < cut]
    users, items = Vocabulary.from_ids(past["user_id"]), Vocabulary.from_ids(past["item_id"])
    matrix = user_items_matrix(past, users, items, params.weights, now=cut,
                               half_life_days=params.als.recency_half_life_days)
    factors = fit_als(matrix, params.als)
    buys = past.loc[past["event_type"] == "purchase"]
    bought = _matrix(buys, users, items, np.ones(len(buys)))
    bought.data[:] = 1.0
    positive = past.loc[past["event_type"].map(params.weights).fillna(0.0) > 0]
    last = positive.groupby(["user_id", "item_id"], sort=False)["ts"].max().reset_index()
    recent = _matrix(last, users, items, last["ts"].astype("int64").to_numpy() / 1e9)
    graph = build_social_graph(social, events, cut, users=users)
    attribution = attribute(events, cut)
    rates = open_rates(graph, attribution.users["open_rate"].to_dict(), attribution.rates["open_rate"])
    purchases = _matrix(buys, users, items, np.ones(len(buys)))
    buyers = buys.groupby("item_id")["user_id"].nunique().reindex(items.ids).fillna(0).to_numpy(np.float64)
    inputs = ShareInputs(users=users, items=items, user_factors=factors.user_factors,
                         item_factors=factors.item_factors, bought=bought, recent=recent, graph=graph,
                         open_rate=rates, purchases=purchases, item_popularity=buyers, now=cut.value / 1e9)
    return inputs, past


def baseline_lists(inputs: ShareInputs, past: pd.DataFrame, sharers: np.ndarray, k: int, per_item: int,
                   rng: np.random.Generator) -> dict[int, list[tuple[int, list[int]]]]:
    """Per sharer: their most popular recent purchases (then views, then popular items) to random people."""
    popularity = past.groupby("item_id")["user_id"].nunique()
    item_pop = popularity.reindex(inputs.items.ids).fillna(0).to_numpy()
    by_pop = np.argsort(-item_pop, kind="stable")
    views = _matrix(past.loc[past["event_type"] == "view"], inputs.users, inputs.items,
                    np.ones(int((past["event_type"] == "view").sum()))).tocsr()
    lists = {}
    for u in sharers:
        bought = inputs.bought.getrow(u).indices
        viewed = np.setdiff1d(views.getrow(u).indices, bought)
        ranked = [*bought[np.argsort(-item_pop[bought], kind="stable")],
                  *viewed[np.argsort(-item_pop[viewed], kind="stable")]]
        seen = set(ranked)
        ranked += [int(i) for i in by_pop[: k + len(seen)] if int(i) not in seen]
        reach = inputs.graph.reach(int(u))[0]
        reach = reach[reach != u]
        lists[int(u)] = [(int(i), [int(f) for f in rng.choice(reach, min(per_item, len(reach)), replace=False)])
                         for i in ranked[:k]]
    return lists


Served = tuple[ShareInputs, Recommender]


def model_lists(inputs: ShareInputs, sharers: np.ndarray, k: int, per_item: int,
                weights: ShareWeights, served: Served | None = None) -> dict[int, list[tuple[int, list[int]]]]:
    """Per sharer (an index of `inputs`), the suggestions as indexes of `inputs`: from `inputs` with the
    share-propensity formula, or as the service makes them from a bundle (`served`: its inputs and ranker)."""
    lists = {}
    for u in sharers:
        if served is None:
            found = suggest_shares(inputs, int(u), k, per_item, weights)
        else:
            own, recommender = served
            user_id = inputs.users.id_of(int(u))
            found = suggest_shares(own, own.users.index_of(user_id), k, per_item,
                                   ranked=partial(ranked_feed, recommender, user_id, own))
        # Only items and people the past knows, as the formula and the baseline propose: an id the past does
        # not know has no index to match a test share's with (those map to -1 and would all match each other).
        item_of, user_of = inputs.items.index_of, inputs.graph.users.index_of
        proposed = [(item_of(i.item_id), [user_of(f.user_id) for f in i.friends]) for i in found.items]
        lists[int(u)] = [(int(item), [int(f) for f in friends if f is not None])
                         for item, friends in proposed if item is not None]
    return lists


def past_bundle(events: pd.DataFrame, tables: dict[str, pd.DataFrame | None], cut: pd.Timestamp,
                workdir: Path, params: TrainParams | None = None) -> Served:
    """`sharefeed train` (default parameters unless `params`) on the events before `cut` and the other tables
    as they are; the bundle's share inputs and a recommender over it, as the service holds them."""
    data = workdir / "past"
    data.mkdir()
    past = events.loc[events["ts"] < cut].rename(columns={"ts": "timestamp"})
    past.to_parquet(data / "events.parquet", index=False)
    for name, frame in tables.items():
        if frame is not None and name == "items" and "created_at" in frame.columns:
            frame = frame.loc[~(frame["created_at"] >= cut)]  # the catalog as of the cut (unknown dates kept)
        if frame is not None:
            frame.to_parquet(data / f"{name}.parquet", index=False)
    result = train(data, workdir / "bundle", params or TrainParams(),
                   TrainingSettings(home=workdir / "home", mlflow_uri=None), say=lambda _: None)
    bundle = load_bundle(result.bundle_path)
    return ShareInputs.from_bundle(bundle), Recommender(bundle)


def recovered(lists: dict[int, list[tuple[int, list[int]]]], test: pd.DataFrame) -> pd.DataFrame:
    """Per test share: was its (sharer, item) proposed, and its (sharer, item, recipient)?"""
    pairs = {(u, i) for u, items in lists.items() for i, _ in items}
    triples = {(u, i, f) for u, items in lists.items() for i, friends in items for f in friends}
    keys = zip(test["sharer"], test["item"], test["recipient"], strict=True)
    hits = [((u, i) in pairs, (u, i, r) in triples) for u, i, r in keys]
    return pd.DataFrame(hits, columns=["item_hit", "recipient_hit"], index=test.index).assign(sharer=test["sharer"])


def _ratio_ci(model: pd.DataFrame, base: pd.DataFrame, column: str, rng: np.random.Generator,
              rounds: int = 1000) -> tuple[float, float, float]:
    m = model.groupby("sharer")[column].sum()
    b = base.groupby("sharer")[column].sum().reindex(m.index)
    picks = rng.integers(0, len(m), (rounds, len(m)))
    ratios = m.to_numpy()[picks].sum(axis=1) / np.maximum(b.to_numpy()[picks].sum(axis=1), 1e-9)
    point = float(m.sum() / max(b.sum(), 1e-9))
    return point, float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


# Share-propensity weights tried on the validation window (the week before the test); the best is then
# applied to the test window once.
WEIGHT_GRID = [ShareWeights(recency=r, purchases=b, affinity=a, popularity=p, conversions=c)
               for r in (0.5, 1.0, 2.0) for b in (1.0, 2.0) for a in (0.3, 0.6) for p in (0.0, 0.3)
               for c in (0.0, 0.5)]


def _shares_after(events: pd.DataFrame, inputs: ShareInputs, start: pd.Timestamp,
                  end: pd.Timestamp | None = None) -> tuple[pd.DataFrame, int]:
    window = (events["ts"] >= start) & (events["event_type"] == "share") & events["target_user_id"].notna()
    if end is not None:
        window &= events["ts"] < end
    shares = events.loc[window]
    test = pd.DataFrame({"sharer": inputs.users.indexes(shares["user_id"]),
                         "item": inputs.items.indexes(shares["item_id"]),
                         "recipient": inputs.graph.users.indexes(shares["target_user_id"])})
    return test.loc[test["sharer"] >= 0].reset_index(drop=True), len(test)


def pick_weights(events: pd.DataFrame, social: pd.DataFrame | None, cut: pd.Timestamp, test_days: float,
                 ks: list[int], per_item: int, params: TrainParams) -> tuple[ShareWeights, int]:
    """The grid point recovering the most validation shares (summed over k), fitted before the validation."""
    start = cut - pd.Timedelta(days=test_days)
    inputs, _ = past_inputs(events.loc[events["ts"] < cut], social, start, params)
    valid, _ = _shares_after(events, inputs, start, cut)
    sharers = np.unique(valid["sharer"].to_numpy())

    def hits(weights: ShareWeights) -> int:
        lists = model_lists(inputs, sharers, max(ks), per_item, weights)  # shorter lists are its prefixes
        return sum(int(recovered({u: found[:k] for u, found in lists.items()}, valid)["item_hit"].sum())
                   for k in ks)

    scored = [(hits(w), w) for w in WEIGHT_GRID]
    best = max(scored, key=lambda pair: pair[0])
    return best[1], best[0]


def suggestion_table(events: pd.DataFrame, tables: dict[str, pd.DataFrame | None], test_days: float,
                     ks: list[int], per_item: int, seed: int) -> dict[str, Any]:
    social = tables["social"]
    cut = (events["ts"].max() - pd.Timedelta(days=test_days)).floor("D")
    params = TrainParams()
    weights, valid_hits = pick_weights(events, social, cut, test_days, ks, per_item, params)
    started = time.perf_counter()
    inputs, past = past_inputs(events, social, cut, params)
    fit_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="social-eval-") as workdir:
        started = time.perf_counter()
        served = past_bundle(events, tables, cut, Path(workdir))
        train_seconds = time.perf_counter() - started
    test, all_test = _shares_after(events, inputs, cut)
    sharers = np.unique(test["sharer"].to_numpy())
    rng = np.random.default_rng(seed)
    rows = []
    for k in ks:
        base = recovered(baseline_lists(inputs, past, sharers, k, per_item, rng), test)
        row: dict[str, Any] = {"k": k, "friends_per_item": per_item}
        for name, way in (("served", served), ("formula", None)):
            started = time.perf_counter()
            model = recovered(model_lists(inputs, sharers, k, per_item, weights, way), test)
            row[f"{name} ms_per_user"] = (time.perf_counter() - started) / max(len(sharers), 1) * 1000
            for column in ("item_hit", "recipient_hit"):
                point, low, high = _ratio_ci(model, base, column, rng)
                row |= {f"{name} {column}s": int(model[column].sum()), f"{name} {column} ratio": point,
                        f"{name} {column} ratio ci": [low, high]}
        row |= {f"baseline {column}s": int(base[column].sum()) for column in ("item_hit", "recipient_hit")}
        rows.append(row)
    return {"cut": cut.isoformat(), "test_days": test_days, "weights": asdict(weights),
            "validation_item_hits": valid_hits, "train_seconds": train_seconds,
            "test_shares": all_test,
            "test_shares_by_known_sharers": len(test), "sharers": len(sharers),
            "recipient_known_in_past_share": float((test["recipient"] >= 0).mean()) if len(test) else 0.0,
            "unseen_item_share": float((test["item"] < 0).mean()) if len(test) else 0.0,
            "fit_seconds": fit_seconds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--test-days", type=float, default=7.0)
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--friends-per-item", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = TrainParams()
    data = load_dataset(args.data, params.weights.keys())
    started = time.perf_counter()
    influence = influence_table(args.data, data.events, data.social)
    influence_seconds = time.perf_counter() - started
    tables = {"items": data.items, "users": data.users, "social": data.social}
    suggestions = suggestion_table(data.events, tables, args.test_days, args.k, args.friends_per_item, args.seed)
    result = {"data": str(args.data), "events": len(data.events),
              "social_rows": 0 if data.social is None else len(data.social),
              "influence_seconds": influence_seconds, "influence": influence, "share_suggestions": suggestions}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(pd.DataFrame(influence).round(3).to_string(index=False))
    print({k: v for k, v in suggestions.items() if k != "rows"})
    print(pd.DataFrame(suggestions["rows"]).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
