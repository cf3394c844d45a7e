"""Fitting the propensity model of segments on a validation window: features.propensity's columns as of the
window's cut-off, label = the user buys the target (an item, category or brand) in [start, end).

One logistic regression per target kind, over every target with enough buyers in the label window; rows are
all positives plus negatives sampled at one rate, and the intercept is corrected for that rate. Imports
scikit-learn, so serving never imports this module: the result is plain numbers for the manifest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from features.propensity import FEATURE_NAMES, PROPENSITY_VERSION, PropensityContext, PropensityModel, TargetKind
from features.state import DAY
from features.weights import CONVERSION_TYPES
from training.params import PropensityParams
from training.window import Window


def label_matrix(window: Window, events: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> sp.csc_matrix:
    """users x items of the window: 1 where the user bought the item in [start, end)."""
    mask = (events["ts"] >= start) & (events["ts"] < end) & events["event_type"].isin(CONVERSION_TYPES)
    bought = events.loc[mask]
    rows, cols = window.users.indexes(bought["user_id"]), window.items.indexes(bought["item_id"])
    keep = (rows >= 0) & (cols >= 0)
    matrix = sp.csc_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])),
                           shape=(len(window.users), len(window.items)))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def target_items(window: Window, kind: TargetKind, labels: sp.csc_matrix, params: PropensityParams) -> list[np.ndarray]:
    """The targets of one kind that at least `min_positives` users bought in the label window, as item sets."""
    buyers = np.asarray(labels.getnnz(axis=0)).ravel()
    if kind == "item":
        ranked = np.argsort(-buyers, kind="stable")[: params.max_item_targets]
        return [np.asarray([i], dtype=np.int64) for i in ranked if buyers[i] >= params.min_positives]
    codes = np.asarray(window.state.item_category if kind == "category" else window.state.item_brand)
    out = []
    for code in np.unique(codes[codes >= 0]):
        items = np.flatnonzero(codes == code)
        if np.count_nonzero(labels[:, items].getnnz(axis=1)) >= params.min_positives:
            out.append(items.astype(np.int64))
    return out


def training_rows(context: PropensityContext, targets: list[np.ndarray], labels: sp.csc_matrix, max_rows: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Features and labels of every positive (user, target) and of negatives sampled at one rate so that
    about `max_rows` rows come out; returns the rate too."""
    n = context.n_users
    positive = [np.asarray(labels[:, items].getnnz(axis=1)).ravel() > 0 for items in targets]
    n_pos = int(sum(p.sum() for p in positive))
    n_neg = len(targets) * n - n_pos
    rate = min(1.0, max(max_rows - n_pos, 1) / max(n_neg, 1))
    features, y = [], []
    for items, is_pos in zip(targets, positive, strict=True):
        rows = np.flatnonzero(is_pos | ((rng.random(n) < rate) & ~is_pos))
        features.append(context.features(context.target(items), rows))
        y.append(is_pos[rows])
    return np.concatenate(features), np.concatenate(y), rate


def fit_logistic(x: np.ndarray, y: np.ndarray, rate: float, c: float, kind: TargetKind, label_days: float,
                 targets: int) -> PropensityModel:
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    with threadpool_limits(1, "blas"):
        model = LogisticRegression(C=c, max_iter=2000)
        model.fit((x - mean) / scale, y)
    return PropensityModel(
        version=PROPENSITY_VERSION,
        kind=kind,
        features=list(FEATURE_NAMES),
        mean=mean.tolist(),
        scale=scale.tolist(),
        coef=model.coef_[0].tolist(),
        # negatives were kept at `rate`: the odds the model learnt are the true odds / rate
        intercept=float(model.intercept_[0] + np.log(rate)),
        label_days=label_days,
        rows=len(y),
        positives=int(y.sum()),
        targets=targets,
    )


def fit_propensity(window: Window, events: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp,
                   params: PropensityParams, say: Callable[[str], None] = print) -> dict[str, PropensityModel]:
    """One model per target kind that has at least two targets (or one with both labels) to learn from."""
    rng = np.random.default_rng(params.seed)
    context = PropensityContext(window.state, window.models.als_users, window.models.als_items)
    labels = label_matrix(window, events, start, end)
    label_days = (end - start).total_seconds() / DAY
    models: dict[str, PropensityModel] = {}
    for kind in params.kinds:
        targets = target_items(window, kind, labels, params)
        if not targets:
            continue
        x, y, rate = training_rows(context, targets, labels, params.max_rows, rng)
        if y.all() or not y.any():
            continue
        models[kind] = fit_logistic(x, y, rate, params.c, kind, label_days, len(targets))
        say(f"propensity ({kind}): {len(targets)} targets, {len(y):,} rows, {int(y.sum()):,} positives")
    return models
