"""Reorder-timing features on a tiny log with a known answer: occasions, shares, intervals, due ratios."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.ranking import FEATURE_NAMES, pair_features
from features.state import BASKET_DECAY, build_state, load_state, save_state
from features.vocab import Vocabulary
from training.bundle import ITEM_META_COLUMNS
from training.window import item_meta_frame

DAY0 = pd.Timestamp("2024-03-01", tz="UTC")


def _events(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": [r[2] for r in rows],
            "ts": [DAY0 + pd.Timedelta(days=r[3]) for r in rows],
        }
    )


# Alice shops on days 0, 2 and 4 (milk every time, bread on day 4, two lines of milk on day 2), views eggs;
# Bob buys bread once. Everything on day 6 or later is after the cut-off and must not count.
EVENTS = _events([
    ("alice", "milk", "purchase", 0.1),
    ("alice", "milk", "purchase", 2.1),
    ("alice", "milk", "purchase", 2.2),
    ("alice", "eggs", "view", 3.0),
    ("alice", "milk", "purchase", 4.1),
    ("alice", "bread", "purchase", 4.2),
    ("bob", "bread", "purchase", 1.5),
    ("alice", "eggs", "purchase", 6.0),
    ("bob", "bread", "purchase", 6.5),
    ("alice", "bread", "purchase", 7.0),
])
CUTOFF = DAY0 + pd.Timedelta(days=6)


def _features(events: pd.DataFrame) -> dict[str, np.ndarray]:
    users = Vocabulary.from_ids(["alice", "bob"])
    items = Vocabulary.from_ids(["milk", "bread", "eggs"])
    meta = item_meta_frame(items, None, ITEM_META_COLUMNS)
    state = build_state(events, users, items, meta, {"purchase": 5.0, "view": 1.0}, CUTOFF, [], [])
    pairs_user = np.asarray([0, 0, 0, 1])
    pairs_item = np.asarray([0, 1, 2, 1])
    matrix = pair_features(state, pairs_user, pairs_item, {}, {})
    return {name: matrix[:, k] for k, name in enumerate(FEATURE_NAMES)}


def test_reorder_timing_has_the_known_answer() -> None:
    f = _features(EVENTS)
    np.testing.assert_allclose(f["user_baskets_all"], [3, 3, 3, 1])
    np.testing.assert_allclose(f["user_basket_size"], [4 / 3, 4 / 3, 4 / 3, 1])  # distinct items per occasion
    np.testing.assert_allclose(f["user_repeat_share"], [0.5, 0.5, 0.5, 0.0])  # milk twice again, of 4
    np.testing.assert_allclose(f["user_basket_gap_days"][:3], 4.1 / 2, rtol=1e-5)  # first 0.1 to last 4.2
    assert np.isnan(f["user_basket_gap_days"][3])  # one occasion: no gap yet
    np.testing.assert_allclose(f["user_days_since_last_basket"], [1.8, 1.8, 1.8, 4.5], rtol=1e-5)
    np.testing.assert_allclose(f["user_basket_due_ratio"][:3], 1.8 / 2.05, rtol=1e-5)
    np.testing.assert_allclose(f["pair_baskets_all"], [3, 1, 0, 1])
    np.testing.assert_allclose(f["pair_basket_share"], [1, 1 / 3, 0, 1])
    np.testing.assert_allclose(f["pair_basket_share_since_first"][[0, 1, 3]], [1, 1, 1])
    np.testing.assert_allclose(f["pair_baskets_since_last"][[0, 1, 3]], [0, 0, 0])
    np.testing.assert_allclose(f["pair_interval_days"][0], 2.0, rtol=1e-5)
    assert np.isnan(f["pair_interval_days"][1])
    assert np.isnan(f["pair_days_since_purchase"][2])
    np.testing.assert_allclose(f["pair_days_since_purchase"][[0, 1, 3]], [1.9, 1.8, 4.5], rtol=1e-5)
    np.testing.assert_allclose(f["pair_due_ratio"][0], 0.95, rtol=1e-5)
    np.testing.assert_allclose(f["pair_recent_basket_share"][:3], [1, 1 / 3, 0])
    np.testing.assert_allclose(f["pair_basket_decay"][:2], [1 + BASKET_DECAY + BASKET_DECAY**2, 1.0], rtol=1e-6)
    # milk: alice's only buyer bought it on 3 occasions; bread: two buyers, each once.
    np.testing.assert_allclose(f["item_reorder_rate"], [1.0, 0.0, np.nan, 0.0])


def test_events_after_the_cutoff_change_nothing() -> None:
    before = _features(EVENTS)
    later = EVENTS.loc[EVENTS["ts"] >= CUTOFF]
    moved = pd.concat([EVENTS.loc[EVENTS["ts"] < CUTOFF], later.assign(ts=later["ts"] + pd.Timedelta(days=30))])
    after = _features(moved)
    for name in FEATURE_NAMES:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_state_round_trips_through_its_files(tmp_path: Path) -> None:
    users = Vocabulary.from_ids(["alice", "bob"])
    items = Vocabulary.from_ids(["milk", "bread", "eggs"])
    meta = item_meta_frame(items, None, ITEM_META_COLUMNS)
    state = build_state(EVENTS, users, items, meta, {"purchase": 5.0, "view": 1.0}, CUTOFF, [], [])
    save_state(state, tmp_path)
    loaded = load_state(tmp_path)
    rows, cols = np.asarray([0, 0, 1, -1]), np.asarray([0, 1, 1, 2])
    np.testing.assert_array_equal(pair_features(state, rows, cols, {}, {}), pair_features(loaded, rows, cols, {}, {}))


@pytest.mark.parametrize("field", ["pair_baskets", "pair_last_basket", "pair_basket_decay"])
def test_occasion_matrices_share_the_purchase_pairs(field: str) -> None:
    users = Vocabulary.from_ids(["alice", "bob"])
    items = Vocabulary.from_ids(["milk", "bread", "eggs"])
    meta = item_meta_frame(items, None, ITEM_META_COLUMNS)
    state = build_state(EVENTS, users, items, meta, {"purchase": 5.0, "view": 1.0}, CUTOFF, [], [])
    matrix = getattr(state, field)
    assert matrix.shape == state.pair_purchases.shape
    assert set(zip(*matrix.nonzero(), strict=True)) == set(zip(*state.pair_purchases.nonzero(), strict=True))
