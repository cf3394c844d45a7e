"""Propensity features: how likely a user is to buy a target (one item, or any item of a category or brand),
read from a feature state and the ALS factors fitted on the same window.

Defined once and used twice: training computes them for the validation window's users to fit the
propensity model (training.propensity), serving for a segment's candidates (serving.segments); both go
through `PropensityContext`. The model is a logistic regression over `FEATURE_NAMES`, carried in the bundle
manifest as plain numbers (`PropensityModel`), so serving scores it with numpy alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict
from scipy.special import expit

from features.state import DAY, ITEM_WINDOWS_DAYS, FeatureState

PROPENSITY_VERSION = 2  # bump when FEATURE_NAMES or their definitions change: older models then fall back
TOP_TARGET_ITEMS = 50  # a category or brand is represented by its this-many most bought items
SCALE_SAMPLE = 4096  # users (evenly spaced over the vocabulary) that ALS scores are standardised over
HALF_LIVES_DAYS = (30.0, 365.0)
TREND_DAYS = 180  # one of features.state.ITEM_WINDOWS_DAYS
# Reorder timing: days since the user last bought an item of the target over the target's reorder interval,
# counted in these bins of that ratio (a consumable is bought again about one interval after the last time).
DUE_EDGES = (0.5, 1.0, 1.5, 2.5)
DUE_BINS = ("early", "near", "now", "late", "lapsed")  # below 0.5, 0.5-1, 1-1.5, 1.5-2.5, 2.5 and over
MIN_INTERVAL_PAIRS = 5  # a target's interval needs this many user-item pairs bought on two occasions or more
INTENT_HALF_LIFE_DAYS = 3.0  # recent intent: the last touch of the target, on a short half-life
FRIENDS_DAYS = 7  # social: people the user sees who bought the target this recently
FEATURE_ROWS = 16_384  # users whose features are computed together (see PropensityContext.features)
TargetKind = Literal["item", "category", "brand"]

FEATURE_NAMES: tuple[str, ...] = (
    "user_target_purchases_log",  # log(1 + purchases of the target's items)
    *(f"user_target_purchase_recency_{int(h)}d" for h in HALF_LIVES_DAYS),  # 0.5 ** (days since the last / h)
    "user_target_items_log",  # log(1 + distinct target items with a positive event: views, carts, purchases)
    *(f"user_target_touch_recency_{int(h)}d" for h in HALF_LIVES_DAYS),
    "user_target_purchase_share",  # purchases of the target / all the user's purchases
    # target items the user last bought that many reorder intervals ago (DUE_EDGES), x the target's repeat share
    *(f"user_target_due_{name}" for name in DUE_BINS),
    f"user_target_touch_recency_{int(INTENT_HALF_LIFE_DAYS)}d",
    f"user_target_friends_bought_{FRIENDS_DAYS}d",  # log(1 + people the user sees who bought it that recently)
    "user_target_als_mean",  # u . (buyer-weighted mean of the target's top items), standardised over users
    "user_target_als_max",  # max over those items of u . v, standardised over users
    "user_purchases_log",
    "user_events_log",
    *(f"user_recency_{int(h)}d" for h in HALF_LIVES_DAYS),
    # constant within one query, so they order nobody; they let one model's probability follow the target
    "target_buyers_log",  # log of the share of users who bought the target
    f"target_trend_{TREND_DAYS}d",  # share of the target's positive events in the last TREND_DAYS
)

ALS_MEAN, ALS_MAX = FEATURE_NAMES.index("user_target_als_mean"), FEATURE_NAMES.index("user_target_als_max")
USER_FEATURES = ("user_purchases_log", "user_events_log", *(f"user_recency_{int(h)}d" for h in HALF_LIVES_DAYS))


class PropensityModel(BaseModel):
    """A fitted logistic regression on FEATURE_NAMES: p = sigmoid(intercept + coef . (x - mean) / scale).

    `intercept` is corrected for the negative sampling of training, so p estimates the chance of buying the
    target within `label_days` of the state's time."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int
    kind: TargetKind
    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    label_days: float  # length of the label window it was fitted on
    rows: int  # training rows (all positives plus sampled negatives)
    positives: int
    targets: int  # categories / brands / items it was fitted over

    def usable(self) -> bool:
        """Fitted on the features this code computes (else the caller falls back to `fixed_score`)."""
        return self.version == PROPENSITY_VERSION and tuple(self.features) == FEATURE_NAMES

    def weights(self) -> np.ndarray:
        """Coefficients on the raw features (the standardisation folded in)."""
        out: np.ndarray = np.asarray(self.coef) / np.asarray(self.scale)
        return out

    def logit(self, x: np.ndarray) -> np.ndarray:
        weights = self.weights()  # folded: no standardised copy of x
        out: np.ndarray = x @ weights + (self.intercept - float(np.asarray(self.mean) @ weights))
        return out

    def probability(self, x: np.ndarray) -> np.ndarray:
        """The logistic of the logit, in float64 and without overflow for any logit (a model fitted on very
        little data can have extreme weights)."""
        out: np.ndarray = expit(np.asarray(self.logit(x), dtype=np.float64))
        return out


def target_vectors(item_factors: np.ndarray, items: np.ndarray,
                   item_buyers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of a target's TOP_TARGET_ITEMS most bought items and their weights (buyers + 1, so an
    unsold item still counts, summing to 1)."""
    order = items[np.argsort(-item_buyers[items], kind="stable")][:TOP_TARGET_ITEMS]
    weight = item_buyers[order].astype(np.float64) + 1.0
    return np.ascontiguousarray(item_factors[order], dtype=np.float32), weight / weight.sum()


def mean_query(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One retrieval vector for a set of items, the buyer-weighted mean of their vectors: u . mean is the
    weighted sum of the user's predicted preference for each item, one inner product whatever the size."""
    query: np.ndarray = (weights[:, None] * vectors).sum(axis=0).astype(np.float32)
    return query


def decay(days: np.ndarray, half_life: float) -> np.ndarray:
    """0.5 ** (days / half_life); 0 where there was no event (NaN days)."""
    out: np.ndarray = np.asarray(np.maximum(days, 0.0))  # NaN stays NaN, +inf gives 0
    np.divide(out, -half_life, out=out)  # in place: one temporary, the same numbers as -(days / half_life)
    np.exp2(out, out=out)
    np.fmax(out, 0.0, out=out)  # NaN (no event) to 0 in one pass; every other value is already in [0, 1]
    return out


@dataclass(frozen=True, slots=True)
class Target:
    """One target's history over all users, its ALS query and the spread of its ALS scores."""

    items: np.ndarray
    purchases: np.ndarray  # per user
    last_purchase: np.ndarray  # per user, epoch seconds; NaN if never
    touched: np.ndarray  # per user, distinct items with a positive event (int64: counts stay counts)
    last_touch: np.ndarray  # per user, epoch seconds; NaN if never
    vectors: np.ndarray  # top items x factors
    query: np.ndarray  # the buyer-weighted mean of `vectors`
    mean_scale: tuple[float, float]  # mean and standard deviation of u . query over the sample users
    max_scale: tuple[float, float]  # the same for max over `vectors`
    due: np.ndarray  # users x DUE_BINS: target items last bought that many intervals ago
    repeat_share: float  # share of the target's buyer-item pairs bought on two occasions or more
    friends_bought: np.ndarray  # per user (int64): people they see who bought the target in the last FRIENDS_DAYS
    interval_days: float  # the target's reorder interval; NaN when too few pairs were bought again
    buyers_log: float
    trend: float

    def interactors(self) -> np.ndarray:
        """Users who bought or touched any of the target's items: the candidates retrieval must not miss."""
        return np.flatnonzero((self.purchases > 0) | (self.touched > 0))


def _canonical(matrix: sp.csr_matrix) -> sp.coo_matrix:
    """The pairs in row-major order with sorted columns, whatever order the matrix was built in."""
    ordered = sp.csr_matrix(matrix, copy=True)
    ordered.sort_indices()
    return ordered.tocoo()


def pair_intervals(state: FeatureState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item, over its buyers: the pairs bought on two occasions or more, the sum of the log of their mean
    days between occasions, and all buyer pairs; sums, so any target's geometric mean interval adds them up."""
    baskets, first, last = (_canonical(m) for m in (state.pair_baskets, state.pair_first_purchase,
                                                    state.pair_last_purchase))
    if not (np.array_equal(baskets.row, first.row) and np.array_equal(baskets.col, first.col)
            and np.array_equal(baskets.row, last.row) and np.array_equal(baskets.col, last.col)):
        raise ValueError("the state's purchase occasion matrices do not hold the same pairs")
    n_items = state.pair_baskets.shape[1]
    again = baskets.data >= 2
    # occasions are distinct days, so a pair bought again spans at least most of a day; floor at half a day
    days = (last.data[again] - first.data[again]) / DAY / (baskets.data[again] - 1)
    col = baskets.col[again].astype(np.intp)
    repeat_pairs = np.bincount(col, minlength=n_items).astype(np.float64)
    log_sum = np.bincount(col, weights=np.log(np.maximum(days, 0.5)), minlength=n_items)
    pairs = np.bincount(baskets.col.astype(np.intp), minlength=n_items).astype(np.float64)
    return repeat_pairs, log_sum, pairs


def due_counts(last_purchase: sp.csc_matrix, reference: float, interval_days: float, n_rows: int) -> np.ndarray:
    """rows x DUE_BINS: per row, the columns whose last purchase is that many intervals before `reference`;
    all zero without an interval. Row-major, so the features of a set of rows are one gather."""
    if not np.isfinite(interval_days) or not last_purchase.nnz:
        return np.zeros((n_rows, len(DUE_BINS)), dtype=np.int64)
    ratio = (reference - last_purchase.data) / DAY / interval_days
    due_bin = np.searchsorted(np.asarray(DUE_EDGES), ratio, side="right")
    flat = last_purchase.indices.astype(np.intp) * len(DUE_BINS) + due_bin  # one bincount over (row, bin)
    counts: np.ndarray = np.bincount(flat, minlength=len(DUE_BINS) * n_rows).reshape(n_rows, len(DUE_BINS))
    return counts


def _spread(scores: np.ndarray) -> tuple[float, float]:
    std = float(scores.std()) if len(scores) else 0.0
    return (float(scores.mean()) if len(scores) else 0.0), (std if std > 0 else 1.0)


def _column_max(matrix: sp.csc_matrix, n_rows: int) -> np.ndarray:
    """Per row, the largest stored value (all positive here); NaN for rows with none."""
    out = np.full(n_rows, -np.inf)
    np.maximum.at(out, matrix.indices.astype(np.intp), matrix.data)  # intp indexes take numpy's fast path
    out[np.isneginf(out)] = np.nan
    return out


class PropensityContext:
    """A state and its ALS factors, arranged to read targets (item columns) fast; one per bundle or window.

    Recency is measured back from the newest event the state holds rather than its cut-off: on bucketed
    data (epinions) a window's cut-off is the start of the next bucket, while a bundle's "now" is its
    newest event, and only the newest event is the same reference in both."""

    def __init__(self, state: FeatureState, user_factors: np.ndarray, item_factors: np.ndarray) -> None:
        self.state = state
        self.user_factors = user_factors
        self.item_factors = item_factors
        self.n_users = len(user_factors)
        self.purchases = state.pair_purchases.tocsc()
        self.last_purchase = state.pair_last_purchase.tocsc()
        self.last_touch = state.pair_last.tocsc()
        self.item_buyers = np.asarray(state.item_buyers, dtype=np.float64)
        self.user_purchases = np.asarray(state.pair_purchases.sum(axis=1), dtype=np.float64).ravel()
        self.user_events = np.asarray(state.user_type_counts, dtype=np.float64).sum(axis=1)
        seen = np.asarray(state.user_last_seen, dtype=np.float64)
        self.reference = float(np.nanmax(seen)) if np.isfinite(seen).any() else state.cutoff_seconds
        self.user_days = (self.reference - seen) / DAY
        self.sample = np.unique(np.linspace(0, max(self.n_users - 1, 0), min(self.n_users, SCALE_SAMPLE)).astype(
            np.int64)) if self.n_users else np.zeros(0, np.int64)
        self.trend_column = ITEM_WINDOWS_DAYS.index(TREND_DAYS)
        self._user_norms: np.ndarray | None = None
        self.item_repeat_pairs, self.item_interval_log_sum, self.item_buyer_pairs = pair_intervals(state)
        self.seen_by = sp.csc_matrix(state.user_sees)  # column = the user seen: who sees a set of buyers
        # USER_FEATURES x users, computed once: a query gathers its candidates' columns (32 bytes per user)
        self.user_table = np.vstack([np.log1p(self.user_purchases), np.log1p(self.user_events),
                                     *(decay(self.user_days, h) for h in HALF_LIVES_DAYS)])

    def target(self, items: np.ndarray) -> Target:
        n = self.n_users
        bought = self.purchases[:, items]
        touched = self.last_touch[:, items]
        purchases = np.bincount(bought.indices, weights=bought.data, minlength=n)
        vectors, weights = target_vectors(self.item_factors, items, self.item_buyers)
        query = mean_query(vectors, weights)
        users = self.user_factors[self.sample]
        window_counts = np.asarray(self.state.item_window_counts, dtype=np.float64)[items]
        total = float(window_counts[:, -1].sum())
        last_purchase = self.last_purchase[:, items]
        repeat_pairs = float(self.item_repeat_pairs[items].sum())
        interval = (float(np.exp(self.item_interval_log_sum[items].sum() / repeat_pairs))
                    if repeat_pairs >= MIN_INTERVAL_PAIRS else float("nan"))
        repeat_share = repeat_pairs / max(float(self.item_buyer_pairs[items].sum()), 1.0)
        last_bought = _column_max(last_purchase, n)
        recent_buyers = np.flatnonzero(last_bought >= self.reference - FRIENDS_DAYS * DAY)  # NaN: never
        return Target(
            items=items,
            purchases=purchases,
            last_purchase=last_bought,
            touched=np.bincount(touched.indices, minlength=n),
            last_touch=_column_max(touched, n),
            vectors=vectors,
            query=query,
            mean_scale=_spread((users @ query).astype(np.float64)),
            max_scale=_spread((users @ vectors.T).max(axis=1).astype(np.float64) if len(users) else users[:, 0]),
            due=due_counts(last_purchase, self.reference, interval, n),
            repeat_share=repeat_share,
            interval_days=interval,
            friends_bought=np.bincount(self.seen_by[:, recent_buyers].indices, minlength=n),
            buyers_log=float(np.log((np.count_nonzero(purchases) + 1.0) / (n + 1.0))),
            trend=float(window_counts[:, self.trend_column].sum() / total) if total > 0 else 0.0,
        )

    def features(self, target: Target, rows: np.ndarray) -> np.ndarray:
        """len(rows) x FEATURE_NAMES for the users `rows` (indexes into the state's users).

        Computed FEATURE_ROWS rows at a time: the temporaries of a block (its rows of the user factors, the
        ALS product) stay in the CPU cache instead of costing tens of MB per column at 250k rows."""
        out = np.empty((len(rows), len(FEATURE_NAMES)), order="F")  # filled column by column
        for start in range(0, len(rows), FEATURE_ROWS):
            block = rows[start:start + FEATURE_ROWS]
            filled = 0
            for filled, column in enumerate(self._columns(target, block), start=1):
                out[start:start + len(block), filled - 1] = column
            if filled != len(FEATURE_NAMES):
                raise RuntimeError(f"{filled} propensity columns computed, {len(FEATURE_NAMES)} named")
        return out

    def probability(self, model: PropensityModel, target: Target, rows: np.ndarray) -> np.ndarray:
        """`model.probability(self.features(target, rows))`, a block of rows at a time: serving scores a
        quarter of a million candidates per query without holding their feature matrix."""
        out = np.empty(len(rows))
        for start in range(0, len(rows), FEATURE_ROWS):
            block = rows[start:start + FEATURE_ROWS]
            out[start:start + len(block)] = model.probability(self.features(target, block))
        return out

    def best_probability(self, model: PropensityModel, target: Target, rows: np.ndarray,
                         n: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows that can be among the `n` most probable, with their exact probabilities: the others are
        skipped without computing their ALS max column, the costliest one (50 products per user).

        u . q (q the targets' buyer-weighted mean vector) is at most the max over the target's vectors, and
        u . v = u . q + u . (v - q) <= u . q + |u| r with r the largest |v - q|. So each row's logit lies in
        an interval known from the other columns; rows whose upper end falls below the n-th largest lower
        end cannot reach the top n (ties included), and only the rest are scored in full."""
        weight = float(model.weights()[ALS_MAX])
        if n <= 0:
            return rows[:0], np.zeros(0)
        if len(rows) <= n or weight == 0.0:
            return rows, self.probability(model, target, rows)
        partial = np.empty(len(rows))  # the logit without the ALS max column, and u . q
        mean_dot = np.empty(len(rows))
        for start in range(0, len(rows), FEATURE_ROWS):
            block = rows[start:start + FEATURE_ROWS]
            x = np.empty((len(block), len(FEATURE_NAMES)), order="F")
            for column, values in enumerate(self._columns(target, block, with_max=False)):
                x[:, column] = values
            mean_dot[start:start + len(block)] = x[:, ALS_MEAN] * target.mean_scale[1] + target.mean_scale[0]
            x[:, ALS_MAX] = 0.0
            partial[start:start + len(block)] = model.logit(x)
        if not (np.isfinite(partial).all() and np.isfinite(mean_dot).all()):
            return rows, self.probability(model, target, rows)  # no bound to trust: score every row
        norms = self.user_norms()[rows]
        reach = float(np.linalg.norm(target.vectors - target.query, axis=1).max()) if len(target.vectors) else 0.0
        # float32 rounding of the dot products, generously: relative to |u| |v| and to the columns' means
        slack = (1e-4 * norms * (reach + float(np.linalg.norm(target.query)) + 1.0)
                 + 1e-5 * (abs(target.mean_scale[0]) + abs(target.max_scale[0])))
        per_unit = weight / target.max_scale[1]
        low_dot, high_dot = mean_dot - slack, mean_dot + norms * reach + slack
        ends = (partial + per_unit * (low_dot - target.max_scale[0]),
                partial + per_unit * (high_dot - target.max_scale[0]))
        low, high = ends if per_unit > 0 else ends[::-1]
        # the ALS mean column is rounded differently here than in the full product: widen in logit space too
        mean_unit = abs(float(model.weights()[ALS_MEAN]) / target.mean_scale[1])
        tolerance = mean_unit * slack + 1e-6 * (1.0 + np.abs(partial))
        low, high = low - tolerance, high + tolerance
        threshold = np.partition(low, len(low) - n)[len(low) - n]
        kept = rows[high >= threshold]
        return kept, self.probability(model, target, kept)

    def user_norms(self) -> np.ndarray:
        """|u| per user, computed on first use (4 bytes per user)."""
        if self._user_norms is None:
            self._user_norms = np.linalg.norm(self.user_factors, axis=1).astype(np.float64)
        return self._user_norms

    def _columns(self, target: Target, rows: np.ndarray, with_max: bool = True) -> Iterator[np.ndarray | float]:
        """FEATURE_NAMES in order, one column at a time; `with_max=False` leaves the ALS max column at 0."""
        purchases = target.purchases[rows]
        purchase_days = (self.reference - target.last_purchase[rows]) / DAY
        yield np.log1p(purchases)
        yield from (decay(purchase_days, h) for h in HALF_LIVES_DAYS)
        yield np.log1p(target.touched[rows])
        touch_days = (self.reference - target.last_touch[rows]) / DAY
        yield from (decay(touch_days, h) for h in HALF_LIVES_DAYS)
        user_purchases = self.user_purchases[rows]
        yield np.divide(purchases, user_purchases, out=np.zeros(len(rows)), where=user_purchases > 0)
        yield from (target.repeat_share * np.take(target.due, rows, axis=0)).T
        yield decay(touch_days, INTENT_HALF_LIFE_DAYS)
        yield np.log1p(target.friends_bought[rows])
        factors = np.take(self.user_factors, rows, axis=0)
        if with_max:  # one product for both ALS columns, items x users, so the max runs over contiguous rows
            als = np.vstack([target.query, target.vectors]) @ factors.T
            yield (als[0] - target.mean_scale[0]) / target.mean_scale[1]
            yield (als[1:].max(axis=0) - target.max_scale[0]) / target.max_scale[1]
        else:
            yield (factors @ target.query - target.mean_scale[0]) / target.mean_scale[1]
            yield np.zeros(len(rows))
        yield from self._user_columns(rows)
        yield target.buyers_log
        yield target.trend


    def _user_columns(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """USER_FEATURES: the part of FEATURE_NAMES that does not depend on the target."""
        yield from np.take(self.user_table, rows, axis=1)

    def user_logit(self, model: PropensityModel) -> np.ndarray:
        """Every user's logit contribution from USER_FEATURES under `model`: for a user who never touched
        the target, this and the ALS terms are all that vary, so retrieval takes the top of both."""
        weights = model.weights()
        out = np.zeros(self.n_users)
        for name, column in zip(USER_FEATURES, self.user_table, strict=True):
            out += weights[FEATURE_NAMES.index(name)] * column
        return out


def fixed_score(als: np.ndarray, als_mean: float, als_std: float, past_purchases: np.ndarray,
                days_since: np.ndarray) -> np.ndarray:
    """The propensity of bundles without a fitted model: the ALS score standardised over all users, plus
    2 log(1 + purchases of the target) and 2 x a 30-day half-life on the last one."""
    out: np.ndarray = ((als - als_mean) / (als_std or 1.0) + 2.0 * np.log1p(past_purchases)
                       + 2.0 * decay(days_since, 30.0))
    return out
