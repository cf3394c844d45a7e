"""The online form of the user features agrees with the batch form computed over the same events."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.dataset import load_dataset
from features.online_view import blank_user_rows, user_view
from features.state import build_state
from features.vocab import Vocabulary
from features.weights import merged_weights
from training.bundle import ITEM_META_COLUMNS
from training.window import item_meta_frame, item_vocabulary

WEIGHTS = {k: v for k, v in merged_weights(None).items() if v >= 0}  # no refunds: shares stay comparable
EXACT = ("user_type_counts", "user_last_seen", "user_category_last", "pair_last", "pair_purchases", "pair_weight")


def _dense(value: object) -> np.ndarray:
    return value.toarray() if hasattr(value, "toarray") else np.asarray(value)


@pytest.mark.parametrize("known", [True, False])
def test_view_after_online_events_equals_the_batch_state_over_all_events(demo_dir: Path, known: bool) -> None:
    data = load_dataset(demo_dir, WEIGHTS.keys())
    events = data.events.loc[data.events["event_type"].isin(list(WEIGHTS))].reset_index(drop=True)
    cutoff = pd.Timestamp(events["ts"].sort_values().iloc[int(len(events) * 0.7)]).floor("D")
    later = events["ts"] >= cutoff
    user = events.loc[later, "user_id"].value_counts().index[0]
    if not known:  # the user's history is all online: the bundle never saw them
        events = events.loc[~((events["user_id"] == user) & ~later)].reset_index(drop=True)
        later = events["ts"] >= cutoff
    items = item_vocabulary(events, data.items)
    users = Vocabulary.from_ids(events["user_id"])
    meta = item_meta_frame(items, data.items, ITEM_META_COLUMNS)
    categories = sorted(meta["category"].dropna().unique().tolist())
    brands = sorted(meta["brand"].dropna().unique().tolist())
    before = build_state(events.loc[~later], users, items, meta, WEIGHTS, cutoff, categories, brands)
    online = events.loc[later & (events["user_id"] == user)]
    newest = online["ts"].max() + pd.Timedelta(1, "s")
    after = build_state(events.loc[events["ts"] < newest], users, items, meta, WEIGHTS, newest, categories, brands)

    row = users.index_of(user)
    assert row is not None
    in_bundle = before.user_type_counts[row].sum() > 0
    assert in_bundle == known
    view = user_view(before, row if known else -1, blank_user_rows(before, categories, brands),
                     items.indexes(online["item_id"]), online["event_type"].to_numpy(),
                     online["ts"].astype("int64").to_numpy() / 1e9, WEIGHTS)

    assert abs(view.cutoff - newest) < pd.Timedelta(1, "ms")
    for name in EXACT:
        np.testing.assert_allclose(_dense(getattr(view, name))[0], _dense(getattr(after, name))[row],
                                   rtol=1e-6, err_msg=name)
    for name in ("user_category", "user_brand"):
        np.testing.assert_allclose(_dense(getattr(view, name))[0], _dense(getattr(after, name))[row],
                                   rtol=1e-4, atol=1e-6, err_msg=name)
    assert view.item_trending is before.item_trending  # item aggregates are shared, not copied
