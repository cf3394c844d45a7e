"""Segment quality on a time holdout: does a propensity segment find the users who buy a category next?

For each data set, as `sharefeed train` does it: the holdout cut T2 (training.split.time_holdout) and the
validation cut T1 before it (training.split.validation_cut); the window as of T1 (training.window.fit_window)
and the propensity model fitted on it with labels from [T1, T2) (training.propensity.fit_propensity); then
the window as of T2, served through the service's engine (serving.segments.SegmentEngine) with that model.
For every category (`--target brand`: brand) with at least MIN_BUYERS future buyers (after T2) among the
users the window knows:

- base rate: share of those users who buy the category after the cut; ceiling lift = 1 / base rate;
- propensity lift at the top 1% / 5%: buy rate of a served segment of that size over the base rate (FAISS
  retrieval plus the target's past buyers and interactors, scored by the learned model); `model_all` scores
  every user with the model (no retrieval); `fixed` is the formula bundles without a model are served with;
  `als` the ALS score alone (u . buyer-weighted mean of the category's top items);
- baseline lift: past buyers of the category ranked by purchase count then recency (the rest after them,
  most recently active first);
- lookalike lift: seeds = past buyers of the category, members = the others by cosine to the seeds'
  centroid, measured on future buyers among non-seeds (lift over the non-seeds' base rate).

A 95% interval for the top-1% propensity lift comes from resampling users (bootstrap, 200 draws) over the
served top-5% list. Per data set, the future buyers found in the top 1% (5%) of every target are summed, for
the served segment and for the baseline: their ratio, with a 95% interval from the same resampling (one
draw of users for all targets), says whether propensity beats the baseline where single targets, with a
few dozen buyers in their top 1%, cannot.

`--validation` drops everything from T2 on and runs the same procedure one window earlier (model on
[T0, T1), measured on [T1, T2)): the figures that model and feature choices are made on.

    uv run python benchmarks/segment_eval.py amazon=../shared/data/amazon:benchmarks/params/amazon-tuned.yaml \\
        epinions=../shared/data/epinions demo=/tmp/h6/demo --out /tmp/h6/segment_eval.csv
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from features.dataset import load_dataset
from features.ledger import ControlLedger
from features.propensity import FEATURE_NAMES, PropensityModel, mean_query, target_vectors
from features.weights import CONVERSION_TYPES
from serving.privacy import Privacy
from serving.segment_schemas import PropensityQuery
from serving.segments import SegmentEngine
from training.bundle import ITEM_META_COLUMNS
from training.params import load_params
from training.propensity import fit_propensity
from training.split import time_holdout, validation_cut
from training.window import Window, fit_window

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


def _top_hits(scores: np.ndarray, future: np.ndarray, share: float) -> int:
    k = max(1, round(len(scores) * share))
    return int(future[np.argpartition(-scores, k - 1)[:k]].sum())


def pooled_ratio(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], share: float,
                 rng: np.random.Generator) -> tuple[float, float, float]:
    """Future buyers in the top `share` summed over every target, ours over the baseline's, per (ours,
    baseline, future buyers) triple of one target, with a 95% interval from resampling users (the same
    draw for every target, since the targets share their users)."""
    def ratio(sample: np.ndarray | None) -> float:
        ours = theirs = 0
        for mine, base, future in pairs:
            if sample is not None:
                mine, base, future = mine[sample], base[sample], future[sample]
            ours, theirs = ours + _top_hits(mine, future, share), theirs + _top_hits(base, future, share)
        return ours / theirs if theirs else float("nan")

    n = len(pairs[0][0])
    draws = [ratio(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)]
    return ratio(None), float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))


def served_view(window: Window, models: dict[str, PropensityModel]) -> Any:
    """What the engine reads from a bundle, from a training window (as `train` would write it)."""
    manifest = SimpleNamespace(categories=window.categories, brands=window.brands, propensity=models)
    return SimpleNamespace(user_factors=window.models.als_users, item_factors=window.models.als_items,
                           state=window.state, manifest=manifest, users=window.users, items=window.items,
                           version="eval")


def _segment_scores(engine: SegmentEngine, kind: str, target: str, size: int) -> np.ndarray:
    """Scores of a served segment of `size` members over all users; -inf for non-members."""
    nobody_erased = Privacy(ControlLedger(Path(tempfile.mkdtemp(prefix="segeval-log-"))), None)  # an empty log
    members = engine.evaluate(PropensityQuery.model_validate({"kind": "propensity", kind: target, "size": size}),
                              nobody_erased)
    scores = np.full(engine.n_users, -np.inf)
    scores[members.user_idx] = members.scores
    return scores


def evaluate(name: str, data_dir: Path, params_file: Path | None, validation: bool, kind: str) -> pd.DataFrame:
    params = load_params(params_file)
    started = time.perf_counter()
    data = load_dataset(data_dir, params.weights.keys())
    events = data.events
    holdout = time_holdout(events, params.split)
    if validation:  # the test part is never read: the same procedure one window earlier
        events = holdout.train
        holdout = time_holdout(events, params.split)
    if holdout.cut is None or data.items is None or kind not in data.items.columns:
        raise SystemExit(f"{name}: needs time order and the items' {kind}")
    t2, t1 = holdout.cut, validation_cut(holdout, params.split)
    window_a = fit_window(events, data.items, params, t1, ITEM_META_COLUMNS, data.social)
    models = fit_propensity(window_a, events, t1, t2, params.propensity, say=lambda line: print(f"{name}: {line}"))
    del window_a
    window = fit_window(events, data.items, params, t2, ITEM_META_COLUMNS, data.social)
    served = SegmentEngine(served_view(window, models))
    fixed = SegmentEngine(served_view(window, {}))
    context = served.propensity_context()
    model = models.get(kind)
    if model is not None:
        print(f"{name}: {kind} model, {model.rows:,} rows, coefficients (per standard deviation): "
              + ", ".join(f"{f} {c:+.2f}" for f, c in zip(FEATURE_NAMES, model.coef, strict=True)))

    users, state, n = window.users, window.state, len(window.users)
    names = window.categories if kind == "category" else window.brands
    codes = np.asarray(state.item_category if kind == "category" else state.item_brand)
    category_of = data.items.drop_duplicates("item_id").set_index("item_id")[kind].astype(str)
    fut = holdout.test.loc[holdout.test["event_type"].isin(CONVERSION_TYPES)]
    fu = users.indexes(fut["user_id"])
    fut_category = category_of.reindex(fut["item_id"]).to_numpy(dtype=object)
    purchases = state.pair_purchases.tocsc()
    last_purchase = state.pair_last_purchase.tocsc()
    activity = np.nan_to_num(np.asarray(state.user_last_seen, dtype=np.float64), nan=0.0)
    unit = window.models.als_users / np.linalg.norm(window.models.als_users, axis=1, keepdims=True).clip(1e-9)
    rng = np.random.default_rng(0)
    rows = []
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per target: served top 5%, baseline, buyers
    for category in pd.Series(fut_category[fu >= 0]).value_counts().index:
        future_buyers = np.zeros(n, dtype=bool)
        future_buyers[fu[(fu >= 0) & (fut_category == category)]] = True
        if future_buyers.sum() < MIN_BUYERS or category not in names:
            continue
        cat_items = np.flatnonzero(codes == names.index(category))
        base = float(future_buyers.mean())
        counts = np.asarray(purchases[:, cat_items].sum(axis=1)).ravel()
        last = last_purchase[:, cat_items].max(axis=1).toarray().ravel()
        span = max(float(activity.max() - activity.min()), 1.0)
        # past buyers first (count, then last purchase), then everyone else by last activity
        baseline = np.where(counts > 0, 2.0 + counts + last / (last.max() + 1.0), (activity - activity.min()) / span)
        vectors, weights = target_vectors(window.models.als_items, cat_items, np.asarray(state.item_buyers))
        als = window.models.als_users @ mean_query(vectors, weights)
        everyone = (model.probability(context.features(context.target(cat_items), np.arange(n)))
                    if model is not None else np.full(n, np.nan))
        row: dict[str, object] = {"data": name, "category": category, "future_buyers": int(future_buyers.sum()),
                                  "base_rate": base, "ceiling": 1.0 / base}
        segment = {}
        for share in TOPS:
            pct, size = f"{share:.0%}", max(1, round(n * share))
            segment[share] = _segment_scores(served, kind, category, size)
            row[f"propensity_{pct}"] = _lift(segment[share], future_buyers, share, base)
            row[f"model_all_{pct}"] = _lift(everyone, future_buyers, share, base)
            row[f"fixed_{pct}"] = _lift(_segment_scores(fixed, kind, category, size), future_buyers, share, base)
            row[f"als_{pct}"] = _lift(als, future_buyers, share, base)
            row[f"baseline_{pct}"] = _lift(baseline, future_buyers, share, base)
        low, high = _bootstrap_lift(segment[TOPS[-1]], future_buyers, TOPS[0], rng)
        row["propensity_1%_ci"] = f"{low:.1f}-{high:.1f}"
        pairs.append((segment[TOPS[-1]], baseline, future_buyers))
        seeds = counts > 0
        if seeds.sum() and (~seeds).sum():
            centroid = unit[seeds].mean(axis=0)
            others = ~seeds
            base_others = float(future_buyers[others].mean())
            for share in TOPS:
                row[f"lookalike_{share:.0%}"] = _lift(unit[others] @ centroid, future_buyers[others], share,
                                                      base_others)
        rows.append(row)
    table = pd.DataFrame(rows)
    if pairs:
        for share in TOPS:
            mid, low, high = pooled_ratio(pairs, share, np.random.default_rng(1))
            table[f"pooled_{share:.0%}"] = f"{mid:.3f} ({low:.3f}-{high:.3f})"
    print(f"{name}: {n:,} users, {len(window.items):,} items, holdout {holdout.note}, validation from "
          f"{t1.isoformat()}; {len(rows)} targets ({kind}) in {time.perf_counter() - started:.0f}s", flush=True)
    return table


COLUMNS = ["data", "category", "future_buyers", "base_rate", "ceiling", "propensity_1%", "propensity_1%_ci",
           "baseline_1%", "fixed_1%", "model_all_1%", "als_1%", "propensity_5%", "baseline_5%", "fixed_5%",
           "lookalike_1%", "lookalike_5%"]


def markdown(table: pd.DataFrame) -> str:
    shown = table.reindex(columns=COLUMNS).copy()
    shown["base_rate"] = shown["base_rate"].map(lambda v: f"{v:.2%}")
    for c in COLUMNS[4:]:
        if c != "propensity_1%_ci":
            shown[c] = shown[c].map(lambda v: f"{v:.1f}")
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return header + "\n".join("| " + " | ".join(str(v) for v in r) + " |" for r in shown.itertuples(index=False))


def summary(table: pd.DataFrame) -> str:
    lines = ["| data | categories | propensity beats baseline (top 1%) | (top 5%) | median lift 1% propensity / "
             "baseline / fixed / ceiling | median lift 5% propensity / baseline | top-1% lift >= 5x where "
             "ceiling >= 5 | future buyers in the top 1% / 5%, all targets pooled: propensity over baseline "
             "(95% interval) |", "|---|---|---|---|---|---|---|---|"]
    for name, part in table.groupby("data", sort=False):
        wins1 = int((part["propensity_1%"] > part["baseline_1%"]).sum())
        wins5 = int((part["propensity_5%"] > part["baseline_5%"]).sum())
        room = part.loc[part["ceiling"] >= 5]
        five = int((room["propensity_1%"] >= 5).sum())
        lines.append(f"| {name} | {len(part)} | {wins1}/{len(part)} | {wins5}/{len(part)} | "
                     f"{part['propensity_1%'].median():.1f} / {part['baseline_1%'].median():.1f} / "
                     f"{part['fixed_1%'].median():.1f} / {part['ceiling'].median():.1f} | "
                     f"{part['propensity_5%'].median():.1f} / {part['baseline_5%'].median():.1f} | "
                     f"{five}/{len(room)} | {part['pooled_1%'].iloc[0]} / {part['pooled_5%'].iloc[0]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", help="name=DATA_DIR[:PARAMS.yaml]")
    parser.add_argument("--out", type=Path, default=Path("segment_eval.csv"))
    parser.add_argument("--validation", action="store_true", help="measure on the validation window, not the test")
    parser.add_argument("--target", choices=["category", "brand"], default="category")
    args = parser.parse_args()
    tables = []
    for spec in args.datasets:
        name, _, rest = spec.partition("=")
        data_dir, _, params = rest.partition(":")
        tables.append(evaluate(name, Path(data_dir), Path(params) if params else None, args.validation, args.target))
    table = pd.concat(tables, ignore_index=True)
    table.to_csv(args.out, index=False)
    print(summary(table))
    print()
    print(markdown(table))


if __name__ == "__main__":
    main()
