"""Share chains and attribution on hand-made chains with a known answer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.attribution import ITEM_COLUMNS, USER_COLUMNS, AttributionParams, attribute
from tests.event_frames import T0, social_events


def _events(rows: list[tuple[str, str, str, float, str | None, str | None, float | None]]) -> pd.DataFrame:
    """(user, item, type, day, target, referrer, price) rows; rita buys two at a time."""
    frame = social_events([r[:6] for r in rows])
    frame["quantity"] = pd.Series([2.0 if r[0] == "rita" else np.nan for r in rows], dtype="float64")
    frame["price"] = pd.Series([r[6] for r in rows], dtype="float64")
    return frame


EVENTS = _events(
    [
        # ann shares p1 with bob: he views, carts and buys it 2 days later -> credited to ann
        ("ann", "p1", "share", 0, "bob", None, None),
        ("bob", "p1", "view", 1, None, None, None),
        ("bob", "p1", "add_to_cart", 1.5, None, None, None),
        ("bob", "p1", "purchase", 2, None, None, 10.0),
        # ann shares p2 with cat, who buys it 9 days later: outside the 7-day window, nobody's credit
        ("ann", "p2", "share", 0, "cat", None, None),
        ("cat", "p2", "view", 9, None, None, None),
        ("cat", "p2", "purchase", 9, None, None, 30.0),
        # rita buys p3 (2 units) carrying dan as referrer, with no share on record -> credited to dan
        ("rita", "p3", "view", 4, None, "dan", None),
        ("rita", "p3", "purchase", 4, None, "dan", 5.0),
        # two shares of p4 to eve; her purchase goes to the latest one (last touch)
        ("ann", "p4", "share", 1, "eve", None, None),
        ("fay", "p4", "share", 2, "eve", None, None),
        ("eve", "p4", "purchase", 3, None, None, None),
    ]
)


def test_purchase_within_the_window_is_credited_to_the_sharer() -> None:
    result = attribute(EVENTS)
    credited = result.purchases.set_index(["user_id", "item_id"])
    assert credited.loc[("bob", "p1"), "sharer"] == "ann"
    assert credited.loc[("bob", "p1"), "via"] == "share"
    assert credited.loc[("bob", "p1"), "revenue"] == pytest.approx(10.0)
    chain = result.chains.set_index(["recipient", "item_id"]).loc[("bob", "p1")]
    assert (bool(chain["opened"]), bool(chain["carted"]), bool(chain["bought"])) == (True, True, True)


def test_purchase_outside_the_window_is_not_credited() -> None:
    result = attribute(EVENTS)
    assert ("cat", "p2") not in set(zip(result.purchases["user_id"], result.purchases["item_id"], strict=True))
    chain = result.chains.set_index(["recipient", "item_id"]).loc[("cat", "p2")]
    assert not bool(chain["opened"])
    assert not bool(chain["bought"])
    wider = attribute(EVENTS, params=AttributionParams(window_days=10))
    assert ("cat", "p2") in set(zip(wider.purchases["user_id"], wider.purchases["item_id"], strict=True))


def test_referrer_id_credits_the_referrer_with_revenue() -> None:
    result = attribute(EVENTS)
    row = result.purchases.set_index(["user_id", "item_id"]).loc[("rita", "p3")]
    assert row["sharer"] == "dan"
    assert row["via"] == "referrer"
    assert row["revenue"] == pytest.approx(10.0)  # price 5 x quantity 2
    assert result.users.loc["dan", "conversions"] == 1
    assert result.users.loc["dan", "shares_sent"] == 0


def test_last_touch_among_several_shares() -> None:
    result = attribute(EVENTS)
    assert result.purchases.set_index(["user_id", "item_id"]).loc[("eve", "p4"), "sharer"] == "fay"
    assert result.purchases.set_index(["user_id", "item_id"]).loc[("eve", "p4"), "revenue"] == 0.0  # no price


def test_user_funnel_and_item_stats() -> None:
    result = attribute(EVENTS)
    assert list(result.users.columns) == list(USER_COLUMNS)
    ann = result.users.loc["ann"]
    assert (ann["shares_sent"], ann["recipients_reached"], ann["shares_opened"], ann["conversions"]) == (3, 3, 2, 1)
    assert ann["revenue"] == pytest.approx(10.0)
    assert list(result.items.columns) == list(ITEM_COLUMNS)
    p1 = result.items.loc["p1"]
    assert (p1["views"], p1["shares"], p1["referred_views"], p1["referred_purchases"]) == (1, 1, 1, 1)
    assert p1["share_rate"] == pytest.approx(1.0)
    assert p1["viral_coefficient"] == pytest.approx(1.0)
    assert result.items.loc["p4", "viral_coefficient"] == pytest.approx(0.5)  # one purchase, two share chains


def test_nothing_at_or_after_the_cut() -> None:
    result = attribute(EVENTS, cut=T0 + pd.Timedelta(days=2))
    assert ("bob", "p1") not in set(zip(result.purchases["user_id"], result.purchases["item_id"], strict=True))
    assert "dan" not in result.users.index


def test_influence_ranks_a_converting_sharer_above_a_high_degree_non_converter() -> None:
    rows: list[tuple[str, str, str, float, str | None, str | None, float | None]] = []
    # the spammer shares with 60 people and nobody buys; the creator reaches 8 and 4 buy
    rows += [("spammer", f"p{k % 5}", "share", 1, f"crowd{k}", None, None) for k in range(60)]
    rows += [("creator", "p9", "share", 1, f"fan{k}", None, None) for k in range(8)]
    rows += [(f"fan{k}", "p9", "purchase", 2, None, None, 20.0) for k in range(4)]
    rows += [("casual", "p7", "share", 1, "pal", None, None)]
    result = attribute(_events(rows))
    influence = result.users["influence"]
    assert influence["creator"] > influence["spammer"]
    assert influence["creator"] > influence["casual"]
    assert result.users.loc["spammer", "recipients_reached"] > result.users.loc["creator", "recipients_reached"]
    assert result.users.loc["spammer", "open_rate"] < result.rates["open_rate"] + 1e-9


def test_influence_passes_back_one_hop() -> None:
    rows: list[tuple[str, str, str, float, str | None, str | None, float | None]] = [
        ("root", "p1", "share", 0, "mid", None, None),
        ("mid", "p1", "purchase", 1, None, None, None),
        ("other", "p2", "share", 0, "leaf", None, None),
        ("leaf", "p2", "purchase", 1, None, None, None),
        # mid goes on to convert two people; leaf converts nobody
        ("mid", "p1", "share", 2, "x", None, None),
        ("mid", "p1", "share", 2, "y", None, None),
        ("x", "p1", "purchase", 3, None, None, None),
        ("y", "p1", "purchase", 3, None, None, None),
    ]
    result = attribute(_events(rows))
    assert result.users.loc["root", "influence"] > result.users.loc["other", "influence"]
    flat = attribute(_events(rows), params=AttributionParams(hop_weight=0.0))
    assert flat.users.loc["root", "influence"] == pytest.approx(flat.users.loc["other", "influence"])


def test_no_shares_at_all() -> None:
    events = EVENTS.loc[EVENTS["event_type"] != "share"].drop(columns="referrer_id")
    result = attribute(events)
    assert result.purchases.empty
    assert result.users.empty
    assert (result.items["shares"] == 0).all()
