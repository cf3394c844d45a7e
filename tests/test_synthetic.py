"""The synthetic data set: contract shape, causal consistency, and the planted signals models must find."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydantic
import pytest

from features.schema import EVENT_REQUIRED, ITEM_COLUMNS, SOCIAL_COLUMNS, EventType
from features.synthetic import DemoDataConfig, DemoDataSummary, generate_demo_data

CONFIG = DemoDataConfig(users=2_000, items=500, categories=10, days=45, seed=11)
TINY = DemoDataConfig(users=200, items=80, categories=5, days=10)
TABLES = ("events", "items", "users", "social")


@dataclass(frozen=True)
class Demo:
    summary: DemoDataSummary
    events: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    social: pd.DataFrame
    truth: dict[str, Any]

    def of_type(self, event_type: EventType) -> pd.DataFrame:
        return self.events[self.events.event_type == event_type.value]


def _load(out: Path, summary: DemoDataSummary) -> Demo:
    frames = {t: pd.read_parquet(out / f"{t}.parquet") for t in TABLES}
    return Demo(summary=summary, truth=json.loads((out / "truth.json").read_text()), **frames)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    out = tmp_path_factory.mktemp("demo") / "nested" / "dir"
    messages: list[str] = []
    summary = generate_demo_data(out, CONFIG, messages.append)
    assert messages, "progress was never reported"
    return _load(out, summary)


def test_same_seed_gives_identical_data_and_another_seed_does_not(tmp_path: Path) -> None:
    a = _load(tmp_path / "a", generate_demo_data(tmp_path / "a", TINY))
    b = _load(tmp_path / "b", generate_demo_data(tmp_path / "b", TINY))
    c = _load(tmp_path / "c", generate_demo_data(tmp_path / "c", TINY.model_copy(update={"seed": 8})))
    for table in TABLES:
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table))
    assert a.truth == b.truth
    assert not a.events.equals(c.events)
    assert not a.social.equals(c.social)


def test_files_follow_the_contract(demo: Demo) -> None:
    ev = demo.events
    assert set(EVENT_REQUIRED) <= set(ev.columns)
    assert {"event_id", "target_user_id", "referrer_id", "session_id", "quantity", "price"} <= set(ev.columns)
    assert list(demo.items.columns) == list(ITEM_COLUMNS)
    assert list(demo.social.columns) == list(SOCIAL_COLUMNS)
    assert {"user_id", "region", "signup_at"} <= set(demo.users.columns)
    assert set(ev.event_type) == {t.value for t in EventType} - {EventType.IMPRESSION.value}
    assert set(demo.social.kind) == {"friend", "follow"}
    assert ev.event_id.is_unique
    assert ev.timestamp.is_monotonic_increasing
    for frame, column in [(ev, "timestamp"), (demo.items, "created_at"), (demo.users, "signup_at")]:
        assert str(frame[column].dtype) == "datetime64[ns, UTC]"
    assert demo.summary.events == len(ev)
    assert demo.summary.social_edges == len(demo.social)
    assert demo.summary.shares == len(demo.of_type(EventType.SHARE))
    assert demo.summary.referred_purchases == demo.of_type(EventType.PURCHASE).referrer_id.notna().sum()
    assert (demo.summary.users, demo.summary.items) == (CONFIG.users, CONFIG.items)
    assert 30_000 < len(ev) < 80_000


def test_ids_are_strings(demo: Demo) -> None:
    for frame, columns in [
        (demo.events, ["user_id", "item_id", "event_id", "session_id", "target_user_id", "referrer_id"]),
        (demo.items, ["item_id", "category", "brand"]),
        (demo.users, ["user_id"]),
        (demo.social, ["user_id", "friend_id"]),
    ]:
        for column in columns:
            values = frame[column].dropna()
            assert len(values) > 0, column
            assert pd.api.types.is_string_dtype(frame[column]), column
            assert all(isinstance(v, str) for v in values), column
    assert demo.users.user_id.str.fullmatch(r"u\d{6}").all()
    assert demo.items.item_id.str.fullmatch(r"p\d{5}").all()


def test_optional_fields_are_where_they_belong(demo: Demo) -> None:
    ev = demo.events
    purchase = ev.event_type == EventType.PURCHASE.value
    assert ev.loc[purchase, ["quantity", "price"]].notna().all().all()
    assert ev.loc[~purchase, ["quantity", "price"]].isna().all().all()
    assert (ev.loc[purchase, "quantity"] >= 1).all()
    assert (ev.loc[purchase, "price"] > 0).all()
    share = ev.event_type == EventType.SHARE.value
    assert ev.target_user_id[share].notna().all()
    assert ev.target_user_id[~share].isna().all()
    refund = ev.event_type == EventType.REFUND.value
    assert ev.session_id[~refund].notna().all()


def test_events_need_an_existing_item_created_before_them(demo: Demo) -> None:
    joined = demo.events.merge(demo.items[["item_id", "created_at"]], on="item_id", how="left", indicator=True)
    assert (joined["_merge"] == "both").all()
    assert (joined.timestamp >= joined.created_at).all()


def test_users_act_only_after_signing_up(demo: Demo) -> None:
    joined = demo.events.merge(demo.users, on="user_id", how="left")
    assert joined.signup_at.notna().all()
    assert (joined.timestamp > joined.signup_at).all()
    assert (demo.users.signup_at > pd.Timestamp(CONFIG.start)).any(), "nobody joined during the window"


def test_catalog_has_new_arrivals_and_missing_prices(demo: Demo) -> None:
    items = demo.items
    inside = items.created_at.between(pd.Timestamp(CONFIG.start), demo.events.timestamp.max())
    assert 0.1 < inside.mean() < 0.4
    assert 0.005 < items.price.isna().mean() < 0.08
    assert items.in_stock.dtype == bool
    assert 0.8 < items.in_stock.mean() < 1.0


def test_shares_go_to_friends_or_followers(demo: Demo) -> None:
    shares = demo.of_type(EventType.SHARE)
    edges = demo.social[["user_id", "friend_id"]]
    both = pd.concat([edges, edges.rename(columns={"user_id": "friend_id", "friend_id": "user_id"})])
    linked = shares.merge(
        both.drop_duplicates(), left_on=["user_id", "target_user_id"], right_on=["user_id", "friend_id"], how="left"
    )
    assert len(shares) > 200
    assert linked.friend_id.notna().all()


def test_referred_events_follow_a_share_from_the_referrer(demo: Demo) -> None:
    shares = demo.of_type(EventType.SHARE)
    first_share = shares.groupby(["user_id", "target_user_id", "item_id"]).timestamp.min().rename("shared_at")
    referred = demo.events[demo.events.referrer_id.notna()]
    joined = referred.merge(
        first_share.reset_index(),
        left_on=["referrer_id", "user_id", "item_id"],
        right_on=["user_id", "target_user_id", "item_id"],
        how="left",
        suffixes=("", "_sharer"),
    )
    assert set(referred.event_type) == {"view", "add_to_cart", "purchase"}
    assert joined.shared_at.notna().all()
    assert (joined.shared_at < joined.timestamp).all()


def test_purchases_follow_a_view_and_a_cart_in_the_same_session(demo: Demo) -> None:
    key = ["user_id", "item_id", "session_id"]
    purchases = demo.of_type(EventType.PURCHASE)[[*key, "timestamp"]]
    for step in (EventType.VIEW, EventType.ADD_TO_CART):
        first = demo.of_type(step).groupby(key).timestamp.min().rename("step_at").reset_index()
        joined = purchases.merge(first, on=key, how="left")
        assert joined.step_at.notna().all(), step
        assert (joined.step_at < joined.timestamp).all(), step
    refunds = demo.of_type(EventType.REFUND)
    bought = demo.of_type(EventType.PURCHASE).groupby(["user_id", "item_id"]).timestamp.min().rename("bought_at")
    joined_refunds = refunds.join(bought, on=["user_id", "item_id"])
    assert len(refunds) > 0
    assert (joined_refunds.bought_at < joined_refunds.timestamp).all()


def test_funnel_rates_are_realistic(demo: Demo) -> None:
    counts = demo.events.event_type.value_counts()
    assert 0.08 < counts["add_to_cart"] / counts["view"] < 0.25
    assert 0.25 < counts["purchase"] / counts["add_to_cart"] < 0.6
    assert 0.005 < counts["refund"] / counts["purchase"] < 0.1


def test_activity_is_heavy_tailed(demo: Demo) -> None:
    per_user = demo.events.user_id.value_counts()
    top_decile = per_user.head(len(per_user) // 10).sum() / per_user.sum()
    assert top_decile > 0.3
    assert per_user.median() < per_user.mean()


def test_influencers_drive_conversions_and_decoys_do_not(demo: Demo) -> None:
    influencers, decoys = demo.truth["influencers"], demo.truth["decoys"]
    assert len(influencers) == len(decoys) == round(CONFIG.users * 0.01)
    degree = pd.concat([demo.social.user_id, demo.social.friend_id]).value_counts()
    assert degree.reindex(decoys).median() > 0.5 * degree.reindex(influencers).median()
    assert degree.reindex(decoys).median() > 4 * degree.median()
    shares = demo.of_type(EventType.SHARE).user_id.value_counts()
    converted = demo.of_type(EventType.PURCHASE).referrer_id.value_counts()

    def rate(users: list[str]) -> tuple[float, float]:
        n_shares = float(shares.reindex(users).fillna(0).sum())
        return n_shares, float(converted.reindex(users).fillna(0).sum()) / n_shares

    (infl_shares, infl_rate), (decoy_shares, decoy_rate) = rate(influencers), rate(decoys)
    assert infl_shares > 100
    assert decoy_shares > 10
    assert infl_rate > 0.05
    assert decoy_rate < infl_rate / 5


def test_consumables_are_rebought_and_durables_are_not(demo: Demo) -> None:
    purchases = demo.of_type(EventType.PURCHASE).merge(demo.items[["item_id", "category"]], on="item_id")
    times = purchases.groupby(["user_id", "item_id", "category"]).size().rename("n").reset_index()
    consumable = times.category.isin(demo.truth["consumable_categories"])
    assert consumable.any()
    assert (~consumable).any()
    assert (times.n[consumable] > 1).mean() > 0.15
    assert (times.n[~consumable] > 1).mean() < 0.03


def test_purchases_concentrate_on_a_users_preferred_categories(demo: Demo) -> None:
    purchases = demo.of_type(EventType.PURCHASE).merge(demo.items[["item_id", "category"]], on="item_id")
    per_category = purchases.groupby(["user_id", "category"]).size()
    total = per_category.groupby(level="user_id").sum()
    top_share = (per_category.groupby(level="user_id").max() / total)[total >= 5]
    assert len(top_share) > 50
    assert top_share.mean() > max(0.5, 3 / CONFIG.categories)


def test_friends_buy_more_alike_than_random_pairs(demo: Demo) -> None:
    per_user = demo.of_type(EventType.PURCHASE).groupby("user_id").item_id.agg(set)
    bought: dict[str, set[str]] = {str(user): set(items) for user, items in per_user.items()}
    friends = demo.social[demo.social.kind == "friend"]
    rng = np.random.default_rng(0)
    buyers = np.array(sorted(bought))
    pairs = rng.choice(buyers, size=(20_000, 2))

    def overlap(a: Any, b: Any) -> float:
        hits = [len(bought[x] & bought[y]) > 0 for x, y in zip(a, b, strict=True) if x in bought and y in bought]
        assert len(hits) > 500
        return float(np.mean(hits))

    assert overlap(friends.user_id, friends.friend_id) > 1.5 * overlap(pairs[:, 0], pairs[:, 1])


def test_planted_trends_show_as_bursts(demo: Demo) -> None:
    views = demo.of_type(EventType.VIEW)
    start = pd.Timestamp(CONFIG.start)
    inside = outside = inside_days = outside_days = 0.0
    for trend in demo.truth["trending"]:
        burst_start = (pd.Timestamp(trend["start"]) - start) / pd.Timedelta(days=1)
        day = (views.timestamp[views.item_id == trend["item_id"]] - start) / pd.Timedelta(days=1)
        during = (day > burst_start) & (day < burst_start + trend["days"])
        inside += during.sum()
        outside += (~during).sum()
        inside_days += min(trend["days"], CONFIG.days - burst_start)
        outside_days += CONFIG.days - min(trend["days"], CONFIG.days - burst_start)
    assert len(demo.truth["trending"]) >= 2
    assert inside / inside_days > 5 * outside / outside_days


def test_config_is_strict() -> None:
    with pytest.raises(pydantic.ValidationError):
        DemoDataConfig(users=100, colour="blue")  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        DemoDataConfig(items=5, categories=10)
    with pytest.raises(pydantic.ValidationError, match="time zone"):
        DemoDataConfig(start="2026-09-01T00:00:00")  # type: ignore[arg-type]
