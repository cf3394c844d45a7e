"""Segment quality on a time holdout: does a propensity segment find the users who buy a category next?

For each data set: the holdout cut of training (training.split.time_holdout), ALS fitted on the past
(training.als.fit_als, the data set's tuned parameters when given), and for every category with at least
MIN_BUYERS future buyers among the users the past knows:

- base rate: share of those users who buy the category after the cut; ceiling lift = 1 / base rate;
- propensity lift at the top 1% / 5%: buy rate of the best-scored users over the base rate, scored as the
  service scores them (serving.segments.rescore: the ALS score u . buyer-weighted mean of the category's top
  items, standardised, plus the user's past purchases of the category and their recency); "_max" uses the
  best single item's ALS score instead of the mean; "als" columns are the ALS score alone;
- baseline lift: past buyers of the category ranked by purchase count then recency (the rest after them,
  most recently active first);
- lookalike lift: seeds = past buyers of the category, members = the others by cosine to the seeds'
  centroid, measured on future buyers among non-seeds (lift over the non-seeds' base rate).

A 95% interval for the top-1% propensity lift comes from resampling users (bootstrap, 200 draws).

    uv run python benchmarks/segment_eval.py amazon=../shared/data/amazon:benchmarks/params/amazon-tuned.yaml \
        epinions=../shared/data/epinions demo=/tmp/h6/demo --out /tmp/h6/segment_eval.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from features.dataset import load_dataset
from features.interactions import user_items_matrix
from features.vocab import Vocabulary
from features.weights import CONVERSION_TYPES
from serving.segments import propensity_query, rescore, target_vectors
from training.als import fit_als
from training.params import load_params
from training.split import time_holdout

MIN_BUYERS = 50
TOPS = (0.01, 0.05)
BOOTSTRAP = 200


def _lift(scores: np.ndarray, future: np.ndarray, share: float, base: float) -> float:
    k = max(1, round(len(scores) * share))
    top = np.argpartition(-scores, k - 1)[:k]
    return float(future[top].mean() / base) if base > 0 else float("nan")


def _bootstrap_lift(scores: np.ndarray, future: np.ndarray, share: float,
                    rng: np.random.Generator) -> tuple[float, float]:
    out = []
    for _ in range(BOOTSTRAP):
        sample = rng.integers(0, len(scores), len(scores))
        base = future[sample].mean()
        out.append(_lift(scores[sample], future[sample], share, base))
    return float(np.nanpercentile(out, 2.5)), float(np.nanpercentile(out, 97.5))


def evaluate(name: str, data_dir: Path, params_file: Path | None) -> pd.DataFrame:
    params = load_params(params_file)
    started = time.perf_counter()
    data = load_dataset(data_dir, params.weights.keys())
    holdout = time_holdout(data.events, params.split)
    past, future = holdout.train, holdout.test
    users = Vocabulary.from_ids(past["user_id"])
    items = Vocabulary.from_ids(past["item_id"])
    factors = fit_als(user_items_matrix(past, users, items, params.weights), params.als)
    if data.items is None or "category" not in data.items.columns:
        raise SystemExit(f"{name}: no item categories")
    category_of = data.items.drop_duplicates("item_id").set_index("item_id")["category"]
    item_category = category_of.reindex(pd.Index(items.ids)).to_numpy(dtype=object)
    n = len(users)

    bought = past.loc[past["event_type"].isin(CONVERSION_TYPES)]
    bu, bi = users.indexes(bought["user_id"]), items.indexes(bought["item_id"])
    bought_ts = bought["ts"].astype("int64").to_numpy() / 1e9
    item_buyers = pd.Series(bu).groupby(bi).nunique().reindex(range(len(items)), fill_value=0).to_numpy()
    last_seen = pd.Series(past["ts"].astype("int64").to_numpy() / 1e9).groupby(users.indexes(past["user_id"])).max()
    activity = last_seen.reindex(range(n), fill_value=0).to_numpy()

    fut = future.loc[future["event_type"].isin(CONVERSION_TYPES)]
    fu = users.indexes(fut["user_id"])
    fut_category = category_of.reindex(fut["item_id"]).to_numpy(dtype=object)
    rng = np.random.default_rng(0)
    rows = []
    for category in pd.Series(fut_category[fu >= 0]).value_counts().index:
        future_buyers = np.zeros(n, dtype=bool)
        future_buyers[fu[(fu >= 0) & (fut_category == category)]] = True
        if future_buyers.sum() < MIN_BUYERS:
            continue
        cat_items = np.flatnonzero(item_category == category)
        if not len(cat_items):
            continue
        base = float(future_buyers.mean())
        vectors, weights = target_vectors(factors.item_factors, cat_items, item_buyers.astype(np.float64))
        mean_scores = factors.user_factors @ propensity_query(vectors, weights)[0]
        max_scores = (factors.user_factors @ vectors.T).max(axis=1)
        in_cat = np.isin(bi, cat_items)
        counts = np.bincount(bu[in_cat], minlength=n).astype(np.float64)
        last = np.zeros(n)
        np.maximum.at(last, bu[in_cat], bought_ts[in_cat])
        span = max(float(activity.max() - activity.min()), 1.0)
        # past buyers first (count, then last purchase), then everyone else by last activity
        baseline = np.where(counts > 0, 2.0 + counts + last / (last.max() + 1.0), (activity - activity.min()) / span)
        days = np.where(counts > 0, (float(holdout.cut.timestamp() if holdout.cut is not None else last.max())
                                     - last) / 86_400.0, np.inf)
        rescored = rescore(mean_scores, float(mean_scores.mean()), float(mean_scores.std()), counts, days)
        rescored_max = rescore(max_scores, float(max_scores.mean()), float(max_scores.std()), counts, days)
        seeds = counts > 0
        row: dict[str, object] = {"data": name, "category": category, "future_buyers": int(future_buyers.sum()),
                                  "base_rate": base, "ceiling": 1.0 / base}
        for share in TOPS:
            pct = f"{share:.0%}"
            row[f"propensity_{pct}"] = _lift(rescored, future_buyers, share, base)
            row[f"propensity_max_{pct}"] = _lift(rescored_max, future_buyers, share, base)
            row[f"als_{pct}"] = _lift(mean_scores, future_buyers, share, base)
            row[f"als_max_{pct}"] = _lift(max_scores, future_buyers, share, base)
            row[f"baseline_{pct}"] = _lift(baseline, future_buyers, share, base)
        low, high = _bootstrap_lift(rescored, future_buyers, TOPS[0], rng)
        row["propensity_1%_ci"] = f"{low:.1f}-{high:.1f}"
        if seeds.sum() and (~seeds).sum():
            unit = factors.user_factors / np.linalg.norm(factors.user_factors, axis=1, keepdims=True).clip(1e-9)
            centroid = unit[seeds].mean(axis=0)
            others = ~seeds
            cos = unit[others] @ centroid
            base_others = float(future_buyers[others].mean())
            for share in TOPS:
                row[f"lookalike_{share:.0%}"] = _lift(cos, future_buyers[others], share, base_others)
        rows.append(row)
    print(f"{name}: {n:,} users, {len(items):,} items, holdout {holdout.note}; {len(rows)} categories "
          f"in {time.perf_counter() - started:.0f}s", flush=True)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    columns = ["data", "category", "future_buyers", "base_rate", "ceiling", "propensity_1%", "propensity_1%_ci",
               "baseline_1%", "propensity_max_1%", "als_1%", "als_max_1%", "propensity_5%", "baseline_5%",
               "lookalike_1%", "lookalike_5%"]
    shown = table[columns].copy()
    shown["base_rate"] = shown["base_rate"].map(lambda v: f"{v:.2%}")
    for c in columns[4:]:
        if c != "propensity_1%_ci":
            shown[c] = shown[c].map(lambda v: f"{v:.1f}")
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return header + "\n".join("| " + " | ".join(str(v) for v in r) + " |" for r in shown.itertuples(index=False))


def summary(table: pd.DataFrame) -> str:
    lines = ["| data | categories | propensity beats baseline (top 1%) | (top 5%) | median lift 1% propensity / "
             "baseline / ceiling | top-1% lift >= 5x where ceiling >= 5 |", "|---|---|---|---|---|---|"]
    for name, part in table.groupby("data", sort=False):
        wins1 = int((part["propensity_1%"] > part["baseline_1%"]).sum())
        wins5 = int((part["propensity_5%"] > part["baseline_5%"]).sum())
        room = part.loc[part["ceiling"] >= 5]
        five = int((room["propensity_1%"] >= 5).sum())
        lines.append(f"| {name} | {len(part)} | {wins1}/{len(part)} | {wins5}/{len(part)} | "
                     f"{part['propensity_1%'].median():.1f} / {part['baseline_1%'].median():.1f} / "
                     f"{part['ceiling'].median():.1f} | {five}/{len(room)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", help="name=DATA_DIR[:PARAMS.yaml]")
    parser.add_argument("--out", type=Path, default=Path("segment_eval.csv"))
    args = parser.parse_args()
    tables = []
    for spec in args.datasets:
        name, _, rest = spec.partition("=")
        data_dir, _, params = rest.partition(":")
        tables.append(evaluate(name, Path(data_dir), Path(params) if params else None))
    table = pd.concat(tables, ignore_index=True)
    table.to_csv(args.out, index=False)
    print(summary(table))
    print()
    print(markdown(table))


if __name__ == "__main__":
    main()
