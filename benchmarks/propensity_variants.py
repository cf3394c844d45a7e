"""Propensity model variants on the validation window only: which would beat the baseline more often?

For each data set the test part is dropped and, as `segment_eval.py --validation` does it, the category
model is fitted one window earlier (features as of T0, labels in [T0, T1), training.propensity) and measured
on [T1, T2) with features as of T1, over every user of that window (`model_all` in segment_eval: no
retrieval). The variants share the training
rows; each is fitted at the current row budget (200k per kind) and at 1M (every row on the demo sets):

- `lr`: the served logistic regression; `lr_balanced`: the same with balanced class weights;
- `lr_lex` (`_c10`: C = 10): plus features that let a linear model follow the baseline's lexicographic
  order: raw purchase count (and capped at 20), has-bought, log count x each purchase recency;
- `gbm`: a LightGBM binary model (15 leaves, 200 rounds, learning rate 0.05, at least 200 rows a leaf,
  L2 10); `gbm_mono`: increasing in the target's purchase and touch history; `gbm_mono_small`: 7 leaves,
  150 rounds.

    OMP_NUM_THREADS=1 nice -n 10 uv run python benchmarks/propensity_variants.py demo20k=/tmp/h6/demo20k \\
        demo=/tmp/h6/demo epinions=../shared/data/epinions \\
        amazon=../shared/data/amazon:benchmarks/params/amazon-tuned.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from features.dataset import Dataset, load_dataset
from features.propensity import FEATURE_NAMES, PropensityContext
from features.weights import CONVERSION_TYPES
from training.bundle import ITEM_META_COLUMNS
from training.params import TrainParams, load_params
from training.propensity import label_matrix, target_items, training_rows
from training.split import Holdout, time_holdout, validation_cut
from training.window import fit_window

MIN_BUYERS = 50
ROW_BUDGETS = (200_000, 1_000_000)
Scorer = Callable[[np.ndarray], np.ndarray]
HISTORY = [i for i, f in enumerate(FEATURE_NAMES)
           if f.startswith(("user_target_purchases", "user_target_purchase_recency", "user_target_items",
                            "user_target_touch"))]


def lexicographic(x: np.ndarray) -> np.ndarray:
    count = np.expm1(x[:, 0])
    return np.column_stack([x, count, np.minimum(count, 20.0), (count > 0).astype(float),
                            x[:, 0] * x[:, 1], x[:, 0] * x[:, 2]])


def fit_lr(x: np.ndarray, y: np.ndarray, c: float = 1.0, balanced: bool = False, lex: bool = False) -> Scorer:
    from sklearn.linear_model import LogisticRegression

    expand = lexicographic if lex else (lambda z: z)
    x = expand(x)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    with threadpool_limits(1, "blas"):
        model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced" if balanced else None)
        model.fit((x - mean) / scale, y)
    return lambda z: np.asarray(model.decision_function((expand(z) - mean) / scale))


def fit_gbm(x: np.ndarray, y: np.ndarray, monotone: bool = False, leaves: int = 15, rounds: int = 200) -> Scorer:
    import lightgbm as lgb

    constraints = [1 if monotone and i in HISTORY else 0 for i in range(x.shape[1])]
    booster = lgb.train({"objective": "binary", "num_leaves": leaves, "learning_rate": 0.05, "min_data_in_leaf": 200,
                         "lambda_l2": 10.0, "feature_fraction": 0.9, "bagging_fraction": 0.8, "bagging_freq": 1,
                         "monotone_constraints": constraints, "num_threads": 1, "seed": 1, "verbose": -1},
                        lgb.Dataset(x, y.astype(float)), num_boost_round=rounds)
    return lambda z: np.asarray(booster.predict(z, raw_score=True))


VARIANTS: dict[str, Callable[[np.ndarray, np.ndarray], Scorer]] = {
    "lr": fit_lr,
    "lr_balanced": lambda x, y: fit_lr(x, y, balanced=True),
    "lr_lex": lambda x, y: fit_lr(x, y, lex=True),
    "lr_lex_c10": lambda x, y: fit_lr(x, y, c=10.0, lex=True),
    "gbm": fit_gbm,
    "gbm_mono": lambda x, y: fit_gbm(x, y, monotone=True),
    "gbm_mono_small": lambda x, y: fit_gbm(x, y, monotone=True, leaves=7, rounds=150),
}


def lift(scores: np.ndarray, future: np.ndarray, share: float) -> float:
    k = max(1, round(len(scores) * share))
    return float(future[np.argpartition(-scores, k - 1)[:k]].mean() / future.mean())


@dataclass(frozen=True, slots=True)
class ValidationWindow:
    """Window A of a data set's training part (the test part is never read): what the variants are fitted on."""

    params: TrainParams
    data: Dataset
    holdout: Holdout  # the split of the training part: its cut is T2, its test part the reported window
    context: PropensityContext
    labels: sp.csc_matrix
    targets: list[np.ndarray]


def validation_window(name: str, data_dir: Path, params_file: Path | None) -> ValidationWindow:
    params = load_params(params_file)
    data = load_dataset(data_dir, params.weights.keys())
    events = time_holdout(data.events, params.split).train  # the test part is never read
    holdout = time_holdout(events, params.split)
    if holdout.cut is None or data.items is None:
        raise SystemExit(f"{name}: needs time order and item categories")
    t2, t1 = holdout.cut, validation_cut(holdout, params.split)
    window = fit_window(events, data.items, params, t1, ITEM_META_COLUMNS, data.social)
    context = PropensityContext(window.state, window.models.als_users, window.models.als_items)
    labels = label_matrix(window, events, t1, t2)
    return ValidationWindow(params, data, holdout, context, labels,
                            target_items(window, "category", labels, params.propensity))


def holdout_lifts(name: str, setup: ValidationWindow,
                  score: Callable[[PropensityContext, np.ndarray], dict[str, np.ndarray]]) -> pd.DataFrame:
    """Per category with MIN_BUYERS buyers after T2: the top 1% / 5% lift of the baseline and of each variant;
    `score(context, items)` gives every variant's score of all users for the category's items, as of T2."""
    data, holdout, params = setup.data, setup.holdout, setup.params
    assert holdout.cut is not None
    assert data.items is not None
    window = fit_window(holdout.train, data.items, params, holdout.cut, ITEM_META_COLUMNS, data.social)
    context = PropensityContext(window.state, window.models.als_users, window.models.als_items)
    state, n = window.state, len(window.users)
    codes = np.asarray(state.item_category)
    category_of = data.items.drop_duplicates("item_id").set_index("item_id")["category"].astype(str)
    bought = holdout.test.loc[holdout.test["event_type"].isin(CONVERSION_TYPES)]
    buyer = window.users.indexes(bought["user_id"])
    bought_category = category_of.reindex(bought["item_id"]).to_numpy(dtype=object)
    purchases, last_purchase = state.pair_purchases.tocsc(), state.pair_last_purchase.tocsc()
    activity = np.nan_to_num(np.asarray(state.user_last_seen, dtype=np.float64), nan=0.0)
    span = max(float(activity.max() - activity.min()), 1.0)
    rows = []
    for category in pd.Series(bought_category[buyer >= 0]).value_counts().index:
        future = np.zeros(n, dtype=bool)
        future[buyer[(buyer >= 0) & (bought_category == category)]] = True
        if future.sum() < MIN_BUYERS or category not in window.categories:
            continue
        items = np.flatnonzero(codes == window.categories.index(category))
        counts = np.asarray(purchases[:, items].sum(axis=1)).ravel()
        last = last_purchase[:, items].max(axis=1).toarray().ravel()
        baseline = np.where(counts > 0, 2.0 + counts + last / (last.max() + 1.0), (activity - activity.min()) / span)
        scores = score(context, items)
        row: dict[str, object] = {"data": name, "category": category}
        for share in (0.01, 0.05):
            row[f"baseline_{share:.0%}"] = lift(baseline, future, share)
            for variant, values in scores.items():
                row[f"{variant}_{share:.0%}"] = lift(values, future, share)
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate(name: str, data_dir: Path, params_file: Path | None) -> pd.DataFrame:
    setup = validation_window(name, data_dir, params_file)
    scorers: dict[str, Scorer] = {}
    for budget in ROW_BUDGETS:
        x, y, _ = training_rows(setup.context, setup.targets, setup.labels, budget,
                                np.random.default_rng(setup.params.propensity.seed))
        print(f"{name}: {len(y):,} rows ({int(y.sum()):,} positives) at a budget of {budget:,}", flush=True)
        for variant, fit in VARIANTS.items():
            scorers[f"{variant}@{budget // 1000}k"] = fit(x, y)

    def score(context: PropensityContext, items: np.ndarray) -> dict[str, np.ndarray]:
        x = context.features(context.target(items), np.arange(context.n_users))
        return {variant: scorer(x) for variant, scorer in scorers.items()}

    return holdout_lifts(name, setup, score)


def summary(table: pd.DataFrame, variants: Sequence[str] | None = None, label: str = "variant") -> str:
    """Wins over the baseline and mean lifts per data set; `variants` default to the columns named "x@y"."""
    lines = [f"| data | {label} | beats baseline (top 1%) | (top 5%) | mean lift 1% / 5% |", "|---|---|---|---|---|"]
    for name, part in table.groupby("data", sort=False):
        lines.append(f"| {name} | baseline | | | {part['baseline_1%'].mean():.1f} / {part['baseline_5%'].mean():.1f} |")
        names = variants if variants is not None else [c[:-3] for c in part.columns if c.endswith("_1%") and "@" in c]
        for variant in names:
            wins = [int((part[f"{variant}_{s}"] > part[f"baseline_{s}"]).sum()) for s in ("1%", "5%")]
            lines.append(f"| {name} | {variant} | {wins[0]}/{len(part)} | {wins[1]}/{len(part)} | "
                         f"{part[f'{variant}_1%'].mean():.1f} / {part[f'{variant}_5%'].mean():.1f} |")
    return "\n".join(lines)


def run(doc: str | None, evaluate_one: Callable[[str, Path, Path | None], pd.DataFrame], default_out: Path,
        summarise: Callable[[pd.DataFrame], str]) -> None:
    """The command line both comparison scripts share: data sets in, one CSV and a summary table out."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", help="name=DATA_DIR[:PARAMS.yaml]")
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    tables = []
    for spec in args.datasets:
        name, _, rest = spec.partition("=")
        data_dir, _, params = rest.partition(":")
        tables.append(evaluate_one(name, Path(data_dir), Path(params) if params else None))
    table = pd.concat(tables, ignore_index=True)
    table.to_csv(args.out, index=False)
    print(summarise(table))


def main() -> None:
    run(__doc__, evaluate, Path("propensity_variants.csv"), summary)


if __name__ == "__main__":
    main()
