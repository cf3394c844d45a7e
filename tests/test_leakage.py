"""No training feature may depend on what happened at or after its cut-off (candidate scores included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.dataset import load_dataset
from features.ranking import FEATURE_NAMES, SOCIAL_COLUMNS
from training.bundle import ITEM_META_COLUMNS
from training.params import ALSParams, BPRParams, TrainParams
from training.window import candidate_rows, fit_window

# Reorder timing is read from purchase occasions: the check must see them take real values.
REORDER_FEATURES = ("pair_baskets_all", "pair_interval_days", "pair_due_ratio", "pair_basket_decay",
                    "user_basket_gap_days", "user_basket_due_ratio", "item_reorder_rate")
# Social features read friends' rows, shares to the user and attribution: they must take real values too.
SOCIAL_EXERCISED = tuple(name for name in SOCIAL_COLUMNS if name != "item_referral_rate")
PARAMS = TrainParams(als=ALSParams(factors=8, iterations=4), bpr=BPRParams(factors=8, iterations=10))


def _rows(events: pd.DataFrame, catalog: pd.DataFrame | None, cutoff: pd.Timestamp, users: list[str],
          social: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    window = fit_window(events, catalog, PARAMS, cutoff, ITEM_META_COLUMNS, social)
    rows = candidate_rows(window, users, PARAMS, 120)
    return rows.features, window.items.ids[rows.items], rows.group_sizes


@pytest.mark.parametrize("seed", [1, 2])
def test_moving_every_event_after_the_cutoff_changes_no_training_feature(demo_dir: Path, seed: int) -> None:
    data = load_dataset(demo_dir, PARAMS.weights.keys())
    events = data.events
    cutoff = events["ts"].quantile(0.8).floor("D")
    users = sorted(events.loc[events["ts"] >= cutoff, "user_id"].unique().tolist())[:60]
    before = _rows(events, data.items, cutoff, users, data.social)

    rng = np.random.default_rng(seed)
    future = events["ts"] >= cutoff
    moved = events.copy()
    # Scramble the future: other times (still after the cut-off), other items, other types.
    shift = pd.to_timedelta(rng.integers(0, 30 * 86_400, future.sum()), unit="s")
    moved.loc[future, "ts"] = moved.loc[future, "ts"] + shift
    moved.loc[future, "item_id"] = rng.permutation(moved.loc[future, "item_id"].to_numpy())
    moved.loc[future, "event_type"] = rng.choice(["view", "purchase", "add_to_cart", "share"], future.sum())
    for column in ("target_user_id", "referrer_id"):  # future shares and referrals to other people
        moved.loc[future, column] = rng.permutation(moved.loc[future, "user_id"].to_numpy())
    moved = moved.sort_values("ts", kind="stable").reset_index(drop=True)
    after = _rows(moved, data.items, cutoff, users, data.social)

    np.testing.assert_array_equal(before[2], after[2])
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    assert before[0].shape[0] > 0
    for name in (*REORDER_FEATURES, *SOCIAL_EXERCISED):
        column = before[0][:, FEATURE_NAMES.index(name)]
        assert (np.nan_to_num(column) > 0).any(), f"{name} is never exercised"


def test_a_future_event_does_change_features_when_moved_before_the_cutoff(demo_dir: Path) -> None:
    """The check above can fail: the same scramble applied before the cut-off changes the features."""
    data = load_dataset(demo_dir, PARAMS.weights.keys())
    events = data.events
    cutoff = events["ts"].quantile(0.8).floor("D")
    users = sorted(events.loc[events["ts"] >= cutoff, "user_id"].unique().tolist())[:60]
    before = _rows(events, data.items, cutoff, users, data.social)
    leaked = events.copy()
    future = leaked.index[leaked["ts"] >= cutoff]
    leaked.loc[future, "ts"] = cutoff - pd.Timedelta(1, "s")
    after = _rows(leaked.sort_values("ts", kind="stable").reset_index(drop=True), data.items, cutoff, users,
                  data.social)
    assert before[0].shape != after[0].shape or not np.array_equal(before[0], after[0], equal_nan=True)
    social = [FEATURE_NAMES.index(name) for name in SOCIAL_COLUMNS]
    if before[0].shape == after[0].shape:  # the social columns alone see the leak too
        assert not np.array_equal(before[0][:, social], after[0][:, social], equal_nan=True)
