"""Recency, frequency and monetary value of every buyer, as of a feature state's cut-off, and the named
lifecycle groups marketers target (champions, loyal, at risk, hibernating, new).

Scores are quintiles (1..5, 5 best) among users with at least one purchase; monetary is the spend over
items whose price the catalog knows (pair purchases x item price). Users who never bought have no RFM.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import pandas as pd

from features.state import DAY, FeatureState

NEW_DAYS = 30.0  # a first purchase this recent, and only one purchase occasion so far, makes a user "new"


class LifecycleGroup(StrEnum):
    """Evaluated in this order; a user belongs to the first group whose rule holds.

    new          first purchase within NEW_DAYS of the cut-off and one purchase occasion
    champions    R >= 4, F >= 4 and M >= 4 (M is skipped when no price is known for the user)
    loyal        F >= 4 and R >= 3
    at_risk      R <= 2 and F >= 3: used to buy often, has not lately
    hibernating  R <= 2 and F <= 2
    other        every other buyer
    """

    NEW = "new"
    CHAMPIONS = "champions"
    LOYAL = "loyal"
    AT_RISK = "at_risk"
    HIBERNATING = "hibernating"
    OTHER = "other"


GROUP_CODES = {group: code for code, group in enumerate(LifecycleGroup)}


@dataclass(frozen=True, slots=True)
class RFM:
    """Per user idx; NaN (and group -1) for users without a purchase."""

    recency_days: np.ndarray  # days from the last purchase to the cut-off
    frequency: np.ndarray  # purchase occasions (distinct days with a purchase)
    monetary: np.ndarray  # spend over items with a known price; NaN when no price is known
    r: np.ndarray  # quintile scores 1..5, 0 for non-buyers
    f: np.ndarray
    m: np.ndarray  # 0 also where monetary is unknown
    score: np.ndarray  # (r + f + m) / 15, or (r + f) / 10 when m is unknown; 0 for non-buyers
    group: np.ndarray  # GROUP_CODES value, -1 for non-buyers


def _quintile(values: np.ndarray, valid: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """1..5 by percentile rank among `valid` entries (ties share a score), 0 elsewhere."""
    out = np.zeros(len(values), dtype=np.int8)
    if not valid.any():
        return out
    ranks = pd.Series(values[valid] if higher_is_better else -values[valid]).rank(method="max", pct=True)
    out[valid] = np.clip(np.ceil(ranks.to_numpy() * 5), 1, 5).astype(np.int8)
    return out


def compute_rfm(state: FeatureState) -> RFM:
    now = state.cutoff_seconds
    frequency = state.user_baskets.astype(np.float64)
    buyer = (frequency > 0) & ~np.isnan(state.user_last_purchase)
    recency = np.where(buyer, (now - state.user_last_purchase) / DAY, np.nan)
    priced = state.pair_purchases.tocsr().copy()
    price = state.item_price[priced.indices]
    known = ~np.isnan(price)
    priced.data = np.where(known, priced.data * np.nan_to_num(price), 0.0)
    has_price = state.pair_purchases.tocsr().copy()
    has_price.data = known.astype(np.float64)
    spend = np.asarray(priced.sum(axis=1)).ravel()
    monetary = np.where(buyer & (np.asarray(has_price.sum(axis=1)).ravel() > 0), spend, np.nan)
    r = _quintile(np.nan_to_num(recency), buyer, higher_is_better=False)
    f = _quintile(frequency, buyer, higher_is_better=True)
    m_known = buyer & ~np.isnan(monetary)
    m = _quintile(np.nan_to_num(monetary), m_known, higher_is_better=True)
    score = np.where(m_known, (r + f + m) / 15.0, (r + f) / 10.0) * buyer

    first_days = (now - state.user_first_purchase) / DAY
    rules = [
        (LifecycleGroup.NEW, buyer & (first_days <= NEW_DAYS) & (frequency <= 1)),
        (LifecycleGroup.CHAMPIONS, buyer & (r >= 4) & (f >= 4) & ((m >= 4) | ~m_known)),
        (LifecycleGroup.LOYAL, buyer & (f >= 4) & (r >= 3)),
        (LifecycleGroup.AT_RISK, buyer & (r <= 2) & (f >= 3)),
        (LifecycleGroup.HIBERNATING, buyer & (r <= 2) & (f <= 2)),
        (LifecycleGroup.OTHER, buyer),
    ]
    group = np.full(len(frequency), -1, dtype=np.int8)
    for name, rule in reversed(rules):  # the first matching rule wins, so it is written last
        group[rule] = GROUP_CODES[name]
    return RFM(recency_days=recency, frequency=frequency, monetary=monetary, r=r, f=f, m=m,
               score=score.astype(np.float64), group=group)
