"""The online form of the user features agrees with the batch form computed over the same events."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.dataset import load_dataset
from features.online_view import SocialUpdates, blank_user_rows, user_view
from features.ranking import FEATURE_NAMES, pair_features
from features.social_state import OnlineCells
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


WINDOWS = ("1d", "3d", "7d", "30d", "all")
SOCIAL_EXACT = (*(f"friends_bought_{d}" for d in WINDOWS), *(f"friends_shared_{d}" for d in WINDOWS),
                "friends_bought_days", "friends_bought_sway_7d", "pair_shared_days", "pair_sharer_sway")


@pytest.mark.parametrize("strangers", [False, True])
def test_shares_and_friends_purchases_since_the_cut_give_the_batch_social_columns(demo_dir: Path,
                                                                                   strangers: bool) -> None:
    """Shares to the user and purchases of the people they see, laid over the bundle's state online, give
    the friends' purchase windows and the last share the state rebuilt over the same events gives. With
    `strangers`, each recipient is also sent a share by a buyer they did not see: from then on they do."""
    data = load_dataset(demo_dir, WEIGHTS.keys())
    events = data.events.loc[data.events["event_type"].isin(list(WEIGHTS))].reset_index(drop=True)
    cutoff = pd.Timestamp(events["ts"].sort_values().iloc[int(len(events) * 0.7)]).floor("D")
    end = cutoff + pd.Timedelta(days=3)
    items = item_vocabulary(events, data.items)
    users = Vocabulary.from_ids(events["user_id"])
    meta = item_meta_frame(items, data.items, ITEM_META_COLUMNS)
    categories = sorted(meta["category"].dropna().unique().tolist())
    brands = sorted(meta["brand"].dropna().unique().tolist())
    before = build_state(events.loc[events["ts"] < cutoff], users, items, meta, WEIGHTS, cutoff, categories, brands,
                         social=data.social)
    window = (events["ts"] >= cutoff) & (events["ts"] < end)
    recipients = events.loc[window & (events["event_type"] == "share"), "target_user_id"].dropna()
    recipients = recipients.value_counts().index[:10].tolist()
    if strangers:
        events = pd.concat([events, _shares_from_strangers(events, window, before.user_sees, users, recipients,
                                                           cutoff)], ignore_index=True)
        window = (events["ts"] >= cutoff) & (events["ts"] < end)
    shares = events.loc[window & (events["event_type"] == "share") & events["target_user_id"].notna()]
    checked = new_ties = shared_by_friends = 0
    for user in recipients:
        row = users.index_of(user)
        if row is None:
            continue
        to_user = shares.loc[shares["target_user_id"] == user]
        own = events.loc[window & (events["user_id"] == user)]
        # a share makes its sharer a tie, an event through a referral its referrer
        ties = users.indexes(pd.concat([to_user["user_id"], own["referrer_id"].dropna()]).drop_duplicates())
        ties = ties[(ties >= 0) & (ties != row)]
        sees = np.union1d(before.user_sees[row].indices, ties)
        by_friends = window & events["user_id"].isin([users.id_of(int(f)) for f in sees])
        bought = events.loc[by_friends & (events["event_type"] == "purchase")]
        theirs = events.loc[by_friends & (events["event_type"] == "share")]  # to anyone
        newest = max(frame["ts"].max() for frame in (to_user, bought, theirs, own) if len(frame)) + pd.Timedelta(1, "s")
        after = build_state(events.loc[events["ts"] < newest], users, items, meta, WEIGHTS, newest, categories,
                            brands, social=data.social)
        assert np.array_equal(np.sort(after.user_sees[row].indices), sees), "the rebuilt graph has other ties"
        # sway is the bundle's between two trainings (attribution runs at training): compare with the same
        after = replace(after, social=replace(after.social, sway=before.social.sway))
        new_ties += len(np.setdiff1d(ties, before.user_sees[row].indices))
        seconds = lambda frame: frame["ts"].astype("int64").to_numpy() / 1e9  # noqa: E731
        social = SocialUpdates(items.indexes(to_user["item_id"]), users.indexes(to_user["user_id"]), seconds(to_user),
                               users.indexes(bought["user_id"]), items.indexes(bought["item_id"]), seconds(bought),
                               ties, OnlineCells(users.indexes(theirs["user_id"]), items.indexes(theirs["item_id"]),
                                                 seconds(theirs)))
        shared_by_friends += len(theirs)
        view = user_view(before, row, blank_user_rows(before, categories, brands), items.indexes(own["item_id"]),
                         own["event_type"].to_numpy(), seconds(own), WEIGHTS, social)
        assert abs(view.cutoff - newest) < pd.Timedelta(1, "ms")
        asked = np.unique(np.concatenate([items.indexes(to_user["item_id"]), items.indexes(bought["item_id"]),
                                          items.indexes(theirs["item_id"]), np.arange(0, len(items), 7)]))
        asked = asked[asked >= 0]
        got = pair_features(view, np.zeros(len(asked), dtype=np.int64), asked, {}, {})
        want = pair_features(after, np.full(len(asked), row), asked, {}, {})
        for name in SOCIAL_EXACT:
            column = FEATURE_NAMES.index(name)
            np.testing.assert_allclose(got[:, column], want[:, column], rtol=1e-5, err_msg=name)
        assert (got[:, FEATURE_NAMES.index("friends_bought_7d")] > 0).any() or not len(bought)
        assert (~np.isnan(got[:, FEATURE_NAMES.index("friends_bought_days")])).any() or not len(bought)
        checked += 1
    assert checked >= 2, "too few recipients of shares to compare"
    assert shared_by_friends, "no friend shared anything in the window"
    assert new_ties >= (2 * len(recipients) if strangers else 0), "shares and referrals from strangers make ties"


def _shares_from_strangers(events: pd.DataFrame, window: pd.Series, sees: object, users: Vocabulary,
                           recipients: list[str], cutoff: pd.Timestamp) -> pd.DataFrame:
    """For each recipient, an hour after the cut-off, a share from someone who buys in the window and whom the
    recipient does not see, and a view through the referral of another such buyer (before their purchases,
    so the rebuilt windows count them)."""
    buyers = events.loc[window & (events["event_type"] == "purchase"), "user_id"].value_counts().index.tolist()
    rows = []
    at = cutoff + pd.Timedelta(hours=1)
    for k, user in enumerate(recipients):
        row = users.index_of(user)
        seen = set() if row is None else set(sees[row].indices.tolist())  # type: ignore[index]
        sharer, referrer = [b for b in buyers[2 * k :] if b != user and users.index_of(b) not in seen][:2]
        item = events.loc[events["user_id"] == sharer, "item_id"].iloc[0]
        rows.append({"user_id": sharer, "item_id": item, "event_type": "share", "target_user_id": user, "ts": at})
        rows.append({"user_id": user, "item_id": item, "event_type": "view", "referrer_id": referrer, "ts": at})
    return pd.DataFrame(rows).astype({"ts": events["ts"].dtype})
