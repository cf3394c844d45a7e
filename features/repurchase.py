"""Whether an item may be recommended again after it was bought: a policy per category.

Consumables are bought again, a phone is not. The policy is inferred from how often the data's users
bought the same item again, may be overridden per category, and is applied alike by serving and
evaluation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from features.weights import CONVERSION_TYPES

NO_CATEGORY = ""


class RepurchasePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    repeatable: dict[str, bool]  # category -> may be recommended again after purchase
    default: bool  # for categories the data did not show (and items without a category)
    rates: dict[str, float] = {}  # observed repurchase rate per category, for the report

    def is_repeatable(self, category: str | None) -> bool:
        return self.repeatable.get(category or NO_CATEGORY, self.default)

    def repeatable_mask(self, item_categories: np.ndarray) -> np.ndarray:
        """Boolean per item: True where its category is repeatable."""
        lookup = {c: self.is_repeatable(c) for c in pd.unique(item_categories)}
        return np.fromiter((lookup[c] for c in item_categories), dtype=bool, count=len(item_categories))


def infer_repurchase_policy(
    events: pd.DataFrame,
    item_category: pd.Series,
    *,
    threshold: float,
    min_pairs: int,
    overrides: dict[str, bool] | None = None,
) -> RepurchasePolicy:
    """Categories whose bought items were bought again (at another time) by at least `threshold` of buyers.

    `item_category` maps item_id to category. Categories with fewer than `min_pairs` buyer-item pairs
    take the rate of the whole data.
    """
    bought = events.loc[events["event_type"].isin(CONVERSION_TYPES), ["user_id", "item_id", "ts"]]
    times = bought.drop_duplicates().groupby(["user_id", "item_id"], sort=False).size()
    pairs = times.reset_index(name="times")
    pairs["category"] = pairs["item_id"].map(item_category).fillna(NO_CATEGORY).astype(str)
    pairs["again"] = pairs["times"] > 1
    overall = float(pairs["again"].mean()) if len(pairs) else 0.0
    per = pairs.groupby("category")["again"].agg(["mean", "size"])
    rates = {str(c): float(r["mean"]) for c, r in per.iterrows() if r["size"] >= min_pairs}
    repeatable = {c: rate >= threshold for c, rate in rates.items()}
    repeatable.update(overrides or {})
    return RepurchasePolicy(repeatable=repeatable, default=overall >= threshold, rates=rates)
