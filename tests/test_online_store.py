"""Contract tests of the online store, run on the in-process store and on a real Redis server."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Literal

import pytest
import redis

from features.keys import USER_TTL_SECONDS, Keys
from features.online import MemoryStore, RedisStore, open_store, pack_event, pack_share, unpack_event, unpack_share
from features.store import (
    CONSENT_PURPOSES,
    INBOX_CAP,
    RECENT_CAP,
    REFERRERS_CAP,
    TRENDING_BUCKET_SECONDS,
    TRENDING_BUCKETS_KEPT,
    ClaimOutcome,
    OnlineEvent,
    OnlineStore,
)

pytest_plugins = ["redis_fixture"]

HOUR = TRENDING_BUCKET_SECONDS
T0 = 1_764_064_800.0  # 2025-11-25T10:00:00Z, the start of an hour


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[OnlineStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    url: str = request.getfixturevalue("redis_url")
    prefix: str = request.getfixturevalue("redis_prefix")
    redis_store = RedisStore(url, prefix)
    yield redis_store
    for key in redis_store.client.scan_iter(match=f"{prefix}*"):
        redis_store.client.delete(key)
    redis_store.close()


def ev(user: str, item: str, kind: str, ts: float, category: str | None = None) -> OnlineEvent:
    return OnlineEvent(user_id=user, item_id=item, event_type=kind, ts=ts, category=category)


# -- events -------------------------------------------------------------------------------------------------
def test_claims_of_logged_ids_are_idempotent(store: OnlineStore) -> None:
    assert store.claim_event_ids(["a", "b", "a"]) == [True, True, False]
    assert store.claim_event_ids(["a", "b", "c"]) == [False, False, True]
    assert store.claim_pending(["a", "c"], "w:1") == [ClaimOutcome.DONE, ClaimOutcome.DONE]
    store.release_event_ids(["a", "c"], "w:1")  # done claims are not released
    assert store.claim_event_ids(["a", "b", "c"]) == [False, False, False]
    assert store.claim_event_ids([]) == []
    assert store.claim_pending([], "w:1") == []
    store.finish_claims([])
    store.release_event_ids([], "w:1")


def test_pending_then_done_then_duplicate(store: OnlineStore) -> None:
    assert store.claim_pending(["a", "b", "a"], "w:1") == [ClaimOutcome.NEW, ClaimOutcome.NEW, ClaimOutcome.DONE]
    store.finish_claims(["a", "b"])
    assert store.claim_pending(["a", "b", "c"], "w:2") == [ClaimOutcome.DONE, ClaimOutcome.DONE, ClaimOutcome.NEW]
    assert store.claim_event_ids(["a", "c"]) == [False, False]  # a pending id (c) was claimed too


def test_a_young_pending_claim_is_busy_an_old_one_is_taken_over(store: OnlineStore) -> None:
    assert store.claim_pending(["a", "b"], "w:1") == [ClaimOutcome.NEW, ClaimOutcome.NEW]
    assert store.claim_pending(["a"], "w:2", takeover_seconds=60.0) == [ClaimOutcome.BUSY]
    assert store.claim_pending(["a"], "w:1", takeover_seconds=60.0) == [ClaimOutcome.BUSY]  # even for its owner
    time.sleep(0.05)
    assert store.claim_pending(["a"], "w:2", takeover_seconds=0.02) == [ClaimOutcome.TAKEN_OVER]
    assert store.claim_pending(["a"], "w:3", takeover_seconds=60.0) == [ClaimOutcome.BUSY]  # w:2's now


def test_release_drops_only_the_owners_pending_claims(store: OnlineStore) -> None:
    store.claim_pending(["a", "b", "c"], "w:1")
    time.sleep(0.05)
    assert store.claim_pending(["a"], "w:2", takeover_seconds=0.02) == [ClaimOutcome.TAKEN_OVER]
    store.finish_claims(["b"])
    store.release_event_ids(["a", "b", "c"], "w:1")  # w:1's batch was refused by the log
    assert store.claim_pending(["a", "b", "c"], "w:3", takeover_seconds=60.0) == [
        ClaimOutcome.BUSY, ClaimOutcome.DONE, ClaimOutcome.NEW]
    store.release_event_ids(["a"], "w:2")
    assert store.claim_pending(["a"], "w:3", takeover_seconds=60.0) == [ClaimOutcome.NEW]


def test_logged_ids_claimed_again_end_a_pending_claim(store: OnlineStore) -> None:
    """A replay of the log marks its ids done, whoever held them pending."""
    store.claim_pending(["a"], "w:1")
    assert store.claim_event_ids(["a"]) == [False]
    store.release_event_ids(["a"], "w:1")
    assert store.claim_pending(["a"], "w:2") == [ClaimOutcome.DONE]


def test_recent_is_newest_first_and_capped(store: OnlineStore) -> None:
    events = [ev("u1", f"p{i:07d}", "view", T0 + i) for i in range(RECENT_CAP + 10)]
    store.record(events[::2])
    store.record(events[1::2])  # out of order across batches: the order is by time, not arrival
    recent = store.recent("u1")
    assert [e.item_id for e in recent] == [f"p{i:07d}" for i in range(RECENT_CAP + 9, 9, -1)]
    assert recent[0] == OnlineEvent("u1", f"p{RECENT_CAP + 9:07d}", "view", T0 + RECENT_CAP + 9)
    assert [e.item_id for e in store.recent("u1", limit=3)] == [f"p{i:07d}" for i in (59, 58, 57)]
    assert store.recent("u1", limit=0) == []
    assert store.recent("nobody") == []
    store.record([ev("u1", "old", "view", T0 - 5)])  # older than all 50 kept: falls off at once
    assert "old" not in {e.item_id for e in store.recent("u1")}


def test_recent_keeps_types_including_configured_ones(store: OnlineStore) -> None:
    kinds = ["view", "add_to_cart", "purchase", "share", "like", "impression", "refund", "wishlist"]
    store.record([ev("u1", f"i{n}", kind, T0 + n + 0.7) for n, kind in enumerate(kinds)])
    got = store.recent("u1")
    assert [e.event_type for e in got] == kinds[::-1]
    assert [e.ts for e in got] == [T0 + n for n in range(len(kinds))][::-1]  # whole seconds are kept


def test_recent_same_second_latest_arrival_first_and_no_exact_repeats(store: OnlineStore) -> None:
    store.record([ev("u1", "a", "view", T0), ev("u1", "b", "view", T0), ev("u1", "c", "view", T0 - 1)])
    store.record([ev("u1", "a", "view", T0 + 0.5), ev("u1", "d", "like", T0)])  # the same record again: kept once
    assert [e.item_id for e in store.recent("u1")] == ["d", "b", "a", "c"]


def test_purchases_and_refunds(store: OnlineStore) -> None:
    store.record([
        ev("u1", "p1", "purchase", T0 + 10),
        ev("u1", "p2", "purchase", T0 + 20),
        ev("u1", "p1", "purchase", T0 + 30),
        ev("u1", "p3", "view", T0 + 40),
        ev("u2", "p1", "purchase", T0 + 50),
    ])
    assert store.purchased("u1") == {"p1": T0 + 30, "p2": T0 + 20}
    store.record([ev("u1", "p1", "purchase", T0 + 5)])  # a late, older purchase keeps the last time
    assert store.purchased("u1")["p1"] == T0 + 30
    store.record([ev("u1", "p1", "refund", T0 + 60)])
    assert store.purchased("u1") == {"p2": T0 + 20}
    assert store.purchased("u2") == {"p1": T0 + 50}
    assert store.purchased("nobody") == {}


def test_trending_weights_window_and_decay(store: OnlineStore) -> None:
    now = T0 + 5 * HOUR
    store.record([
        ev("u1", "a", "view", now),  # 1
        ev("u2", "a", "view", now + 1),  # 1
        ev("u3", "b", "purchase", now + 2),  # 5
        ev("u4", "c", "impression", now),  # 0: shown is not chosen
        ev("u5", "d", "refund", now),  # negative: never trends
        ev("u6", "e", "share", now - 3 * HOUR),  # 4, three hours old
        ev("u7", "f", "like", now - 30 * HOUR),  # 2, thirty hours old
    ])
    top = store.trending(hours=24, n=10)
    assert [item for item, _ in top] == ["b", "e", "a"]
    scores = dict(top)
    assert scores["b"] == pytest.approx(5.0)
    assert scores["a"] == pytest.approx(2.0)
    assert scores["e"] == pytest.approx(4.0 * 0.5 ** (3 / 24))
    assert [(item, round(score, 9)) for item, score in store.trending(hours=1, n=10)] == [("b", 5.0), ("a", 2.0)]
    week = dict(store.trending(hours=TRENDING_BUCKETS_KEPT, n=10))
    assert week["f"] == pytest.approx(2.0 * 0.5 ** (30 / 24))
    assert store.trending(hours=24, n=1) == [("b", 5.0)]
    assert store.trending(hours=0, n=5) == []
    assert store.trending(hours=24, n=0) == []


def test_trending_is_measured_from_the_newest_event_not_the_wall_clock(store: OnlineStore) -> None:
    assert store.trending(hours=24, n=5) == []
    old = 1_500_000_000.0  # 2017: a replay of old data still has trending items
    store.record([ev("u1", "x", "view", old)])
    assert store.trending(hours=1, n=5) == [("x", 1.0)]


def test_trending_per_category(store: OnlineStore) -> None:
    store.record([
        ev("u1", "shoe", "purchase", T0, category="shoes"),
        ev("u2", "boot", "view", T0 + 1, category="shoes"),
        ev("u3", "phone", "add_to_cart", T0 + 2, category="phones"),
        ev("u4", "cable", "view", T0 + 3),
    ])
    assert [item for item, _ in store.trending(24, 10, category="shoes")] == ["shoe", "boot"]
    assert [item for item, _ in store.trending(24, 10, category="phones")] == ["phone"]
    assert store.trending(24, 10, category="books") == []
    assert [item for item, _ in store.trending(24, 10)] == ["shoe", "phone", "cable", "boot"]


def test_trending_ties_break_the_same_way_on_every_store(store: OnlineStore) -> None:
    store.record([ev(f"u{i}", item, "view", T0) for i, item in enumerate(["m", "z", "a"])])
    assert [item for item, _ in store.trending(24, 3)] == ["z", "m", "a"]


# -- consent and erasure ---------------------------------------------------------------------------------------
def test_consent_defaults_to_given_and_keeps_what_was_said(store: OnlineStore) -> None:
    assert store.consent("u1") == dict.fromkeys(CONSENT_PURPOSES, True)
    store.set_consent("u1", {"personalization": False})
    store.set_consent("u1", {"marketing": False})
    store.set_consent("u1", {"marketing": True})
    assert store.consent("u1") == {"personalization": False, "marketing": True, "social_proof": True}
    assert store.consent("u2") == dict.fromkeys(CONSENT_PURPOSES, True)
    assert store.consents(["u2", "u1", "u2"]) == [store.consent("u2"), store.consent("u1"), store.consent("u2")]
    store.record([ev("u1", "p1", "purchase", T0), ev("u1", "p2", "view", T0 + 5)])
    snapshot = store.snapshot("u1")
    assert snapshot.recent == store.recent("u1")
    assert snapshot.purchased == store.purchased("u1")
    assert snapshot.consent == store.consent("u1")
    with pytest.raises(ValueError, match="unknown consent purpose"):
        store.set_consent("u1", {"telemarketing": False})


def test_erasure_drops_state_keeps_a_tombstone_and_ignores_later_events(store: OnlineStore) -> None:
    store.record([ev("u1", "p1", "purchase", T0), ev("u2", "p2", "view", T0)])
    store.set_consent("u1", {"marketing": False})
    store.erase_user("u1")
    assert store.erased(["u1", "u2", "u3"]) == [True, False, False]
    assert store.erased([]) == []
    assert store.snapshot("u1").erased is True
    assert store.snapshot("u2").erased is False
    assert store.recent("u1") == []
    assert store.purchased("u1") == {}
    assert store.consent("u1") == dict.fromkeys(CONSENT_PURPOSES, True)
    store.record([ev("u1", "p9", "purchase", T0 + 10), ev("u2", "p3", "view", T0 + 10)])
    store.set_consent("u1", {"marketing": False})
    assert store.recent("u1") == []
    assert store.purchased("u1") == {}
    assert store.consent("u1") == dict.fromkeys(CONSENT_PURPOSES, True)
    assert [e.item_id for e in store.recent("u2")] == ["p3", "p2"]
    assert "p9" not in dict(store.trending(24, 10))  # an erased user's events do not count anywhere
    assert store.user_bytes("u1") == 0


def share(sharer: str, item: str, ts: float, to: str | None) -> OnlineEvent:
    return OnlineEvent(user_id=sharer, item_id=item, event_type="share", ts=ts, target_user_id=to)


def _sent(store: OnlineStore, sharer: str) -> set[str]:
    """Who the store notes as holding a share or referral of the sharer's (what an erasure of the sharer scrubs)."""
    return _stored_set(store, "sent", sharer)


def _stored_set(store: OnlineStore, kind: Literal["sent", "came_from"], user: str) -> set[str]:
    """One of the user's erasure sets, read from either store."""
    if isinstance(store, MemoryStore):
        return set(getattr(store, f"_{kind}").get(user, set()))
    assert isinstance(store, RedisStore)
    return {member.decode() for member in store.client.smembers(getattr(store.keys, kind)(user))}


def test_a_share_reaches_its_recipients_inbox_newest_first_and_capped(store: OnlineStore) -> None:
    store.record([share("u1", "p1", T0, "u2"), share("u3", "p2", T0 + 5, "u2"), share("u1", "p3", T0 + 1, None),
                  share("u4", "p4", T0 + 2, "u4"), ev("u5", "p5", "view", T0 + 3)])
    got = store.snapshot("u2").shared_to
    assert [(e.user_id, e.item_id, e.ts, e.target_user_id) for e in got] == [("u3", "p2", T0 + 5, "u2"),
                                                                             ("u1", "p1", T0, "u2")]
    for user in ("u1", "u3", "u4", "u5"):  # no recipient, or oneself: no inbox
        assert store.snapshot(user).shared_to == []
    assert [e.item_id for e in store.recent("u1")] == ["p3", "p1"]  # the sharer's own list as before
    store.record([share("u1", "p1", T0, "u2")])  # the same share again is not kept twice
    store.record([share(f"s{n}", f"q{n}", T0 + 10 + n, "u2") for n in range(INBOX_CAP + 5)])
    inbox = store.snapshot("u2").shared_to
    assert len(inbox) == INBOX_CAP
    assert inbox[0].item_id == f"q{INBOX_CAP + 4}"


def test_an_erased_recipient_gets_no_inbox_and_erasure_empties_it(store: OnlineStore) -> None:
    store.record([share("u1", "p1", T0, "u2"), share("u1", "p2", T0, "u3")])
    store.erase_user("u2")
    store.record([share("u1", "p3", T0 + 1, "u2")])
    assert store.snapshot("u2").shared_to == []
    assert [e.item_id for e in store.snapshot("u3").shared_to] == ["p2"]
    store.record([share("u4", "p5", T0 + 3, "u3")])
    store.erase_user("u1")  # the sharer's erasure: their shares leave every inbox, later ones reach nobody
    assert [e.item_id for e in store.snapshot("u3").shared_to] == ["p5"]
    store.record([share("u1", "p4", T0 + 4, "u3")])
    assert [e.item_id for e in store.snapshot("u3").shared_to] == ["p5"]
    assert store.user_bytes("u1") == 0
    store.record([share("u4", "p6", T0 + 5, "u6")])
    assert _sent(store, "u4") == {"u3", "u6"}
    store.erase_user("u3")  # a recipient's erasure: gone from the sent sets of those who shared with them
    assert _sent(store, "u4") == {"u6"}


def referred(user: str, item: str, ts: float, referrer: str | None) -> OnlineEvent:
    return OnlineEvent(user_id=user, item_id=item, event_type="view", ts=ts, referrer_id=referrer)


def test_a_referral_ties_the_user_to_the_referrer_until_either_is_erased(store: OnlineStore) -> None:
    store.record([referred("u1", "p1", T0, "k1"), referred("u1", "p2", T0 + 9, "k1"),
                  referred("u1", "p3", T0 + 3, "k2"), referred("u1", "p4", T0 + 1, "k1"),
                  referred("u2", "p1", T0, "u2"), referred("u2", "p1", T0, None), referred("u3", "p1", T0 + 2, "k1")])
    assert store.snapshot("u1").referred_by == {"k1": T0 + 9, "k2": T0 + 3}  # the last event through each
    assert store.snapshot("u2").referred_by == {}  # oneself or nobody: no tie
    assert [e.item_id for e in store.recent("u1")] == ["p2", "p3", "p4", "p1"]  # the events themselves as ever
    assert _sent(store, "k1") == {"u1", "u3"}
    store.record([ev("u5", "p1", "view", T0), referred("u6", "p1", T0, "k3")])  # the same event, one referred
    assert store.user_bytes("u6") > store.user_bytes("u5")
    store.erase_user("k1")  # a referrer's erasure: gone from every referred_by
    assert store.snapshot("u1").referred_by == {"k2": T0 + 3}
    assert store.snapshot("u3").referred_by == {}
    store.record([referred("u4", "p1", T0 + 5, "k1")])  # nor does an erased referrer tie anyone again
    assert store.snapshot("u4").referred_by == {}
    store.erase_user("u1")  # the referred user's erasure: their ties go, and they leave the referrer's set
    assert store.snapshot("u1").referred_by == {}
    assert _sent(store, "k2") == set()


def test_a_user_keeps_the_latest_referrers_only(store: OnlineStore) -> None:
    store.record([referred("u1", "p1", T0 + n, f"k{n:03d}") for n in range(REFERRERS_CAP + 3)])
    store.record([referred("u1", "p1", T0 + 100, "k000")])  # a new event through a dropped referrer: back
    kept = store.snapshot("u1").referred_by
    assert len(kept) == REFERRERS_CAP
    assert kept["k000"] == T0 + 100
    assert min(kept.values()) == T0 + 4
    assert {"k001", "k002", "k003"}.isdisjoint(kept)


def test_among_the_oldest_referrers_the_lowest_id_in_byte_order_goes(store: OnlineStore) -> None:
    names = ["a", "é", "B", *(f"z{n:03d}" for n in range(REFERRERS_CAP - 2))]  # one too many, all at once
    store.record([referred("u1", "p1", T0, name) for name in names])
    assert set(names) - set(store.snapshot("u1").referred_by) == {"B"}  # "B" < "a" < "z..." < "é"


def test_erasure_finds_what_points_at_the_user_after_their_records_expired(store: OnlineStore) -> None:
    """The inbox and referred_by expire, the sent sets do not: an erased user must leave those sets anyway."""
    store.record([share("s1", "p1", T0, "u1"), referred("u1", "p2", T0, "k1")])
    if isinstance(store, MemoryStore):
        store._inbox.pop("u1")
        store._referred_by.pop("u1")
    else:
        assert isinstance(store, RedisStore)
        store.client.delete(store.keys.inbox("u1"), store.keys.referred_by("u1"))
    assert _sent(store, "s1") == {"u1"}
    assert _sent(store, "k1") == {"u1"}
    store.record([share("s2", "p1", T0, "u1"), referred("u1", "p2", T0, "k2")])
    store.erase_user("s2")  # the sharer's erasure: gone from the recipient's came_from set too
    store.erase_user("k2")
    assert _came_from(store, "u1") == {"s1", "k1"}
    store.erase_user("u1")
    assert _sent(store, "s1") == set()
    assert _sent(store, "k1") == set()


def _came_from(store: OnlineStore, user: str) -> set[str]:
    return _stored_set(store, "came_from", user)


def test_erasure_reads_the_users_own_records_for_ties_noted_before_the_came_from_sets(store: OnlineStore) -> None:
    store.record([share("s1", "p1", T0, "u1"), referred("u1", "p2", T0, "k1")])
    if isinstance(store, MemoryStore):
        store._came_from.pop("u1")
    else:
        assert isinstance(store, RedisStore)
        store.client.delete(store.keys.came_from("u1"))
    store.erase_user("u1")
    assert _sent(store, "s1") == set()
    assert _sent(store, "k1") == set()


def test_snapshot_reads_the_friends_purchases_in_the_same_trip(store: OnlineStore) -> None:
    store.record([ev("f1", "p1", "purchase", T0), ev("f1", "p2", "purchase", T0 + 9), ev("f2", "p3", "view", T0),
                  ev("u1", "p4", "purchase", T0), ev("f3", "p5", "purchase", T0), ev("f3", "p5", "refund", T0 + 1)])
    got = store.snapshot("u1", ["f1", "f2", "f3", "nobody"])
    assert got.friends_purchased == {"f1": {"p1": T0, "p2": T0 + 9}}
    assert got.purchased == {"p4": T0}
    assert store.snapshot("u1").friends_purchased == {}
    assert store.activity_of(["f3", "f1", "f2"]) == ({"f1": {"p1": T0, "p2": T0 + 9}}, {})  # new ties, later
    assert store.activity_of([]) == ({}, {})


def test_what_friends_share_is_read_with_their_purchases(store: OnlineStore) -> None:
    store.record([share("f1", "p1", T0, "u9"), share("f1", "p1", T0 + 5, None), share("f1", "p2", T0 + 2, "u1"),
                  ev("f1", "p3", "purchase", T0), share("f2", "p4", T0 + 1, None), ev("f3", "p5", "view", T0)])
    got = store.snapshot("u1", ["f1", "f2", "f3"])
    assert got.friends_shared == {"f1": {"p1": T0 + 5, "p2": T0 + 2}, "f2": {"p4": T0 + 1}}  # the last share each
    assert got.friends_purchased == {"f1": {"p3": T0}}  # a share is no purchase
    assert store.activity_of(["f2"]) == ({}, {"f2": {"p4": T0 + 1}})
    assert store.purchased("f1") == {"p3": T0}
    store.erase_user("f1")
    assert store.snapshot("u1", ["f1"]).friends_shared == {}


def test_share_records_round_trip() -> None:
    for sharer, item in [("u1", "p1"), ("", "p"), ("ü" * 300, "x:y"), ("a", "")]:
        got = unpack_share("r", pack_share(sharer, item, T0))
        assert (got.user_id, got.item_id, got.ts, got.target_user_id, got.event_type) == (sharer, item, T0, "r",
                                                                                          "share")


# -- catalog and merchandising overlays -------------------------------------------------------------------------
def test_catalog_overlay_versions(store: OnlineStore) -> None:
    assert store.items_since(0) == (0, [])
    v1 = store.put_items([{"item_id": "p1", "price": 9.5, "in_stock": True}, {"item_id": "p2", "title": "Mug"}])
    assert v1 == 1
    v2 = store.put_items([{"item_id": "p1", "in_stock": False, "category": "home"}])
    assert v2 == 2
    assert store.put_items([]) == 2
    assert store.items_since(0) == (2, [{"item_id": "p2", "title": "Mug"},
                                         {"item_id": "p1", "price": 9.5, "in_stock": False, "category": "home"}])
    assert store.items_since(1) == (2, [{"item_id": "p1", "price": 9.5, "in_stock": False, "category": "home"}])
    assert store.items_since(2) == (2, [])
    assert store.put_items([{"item_id": "p3"}]) == 3
    assert store.items_since(2) == (3, [{"item_id": "p3"}])
    with pytest.raises(ValueError, match="item_id"):
        store.put_items([{"price": 1.0}])


def test_rules(store: OnlineStore) -> None:
    assert store.rules() == (0, {})
    assert store.put_rule("boost-shoes", {"kind": "boost", "category": "shoes", "factor": 1.5}) == 1
    assert store.put_rule("pin", {"kind": "pin", "items": ["p1", "p2"]}) == 2
    assert store.put_rule("pin", {"kind": "pin", "items": ["p3"]}) == 3
    assert store.rules() == (3, {"boost-shoes": {"kind": "boost", "category": "shoes", "factor": 1.5},
                                 "pin": {"kind": "pin", "items": ["p3"]}})
    assert store.delete_rule("pin") is True
    assert store.delete_rule("pin") is False
    assert store.rules() == (4, {"boost-shoes": {"kind": "boost", "category": "shoes", "factor": 1.5}})


def test_bundle_pointer_and_ping(store: OnlineStore) -> None:
    assert store.bundle_pointer() is None
    store.set_bundle_pointer("models:/sharefeed@champion")
    store.set_bundle_pointer("/bundles/2025-11-25")
    assert store.bundle_pointer() == "/bundles/2025-11-25"
    assert store.ping() is True


def test_generation_and_lock(store: OnlineStore) -> None:
    assert store.generation() is None  # never built
    store.set_generation("g1")
    assert store.generation() == "g1"
    assert store.acquire_lock("rebuild", "a", 30) is True
    assert store.acquire_lock("rebuild", "b", 30) is False  # held by another
    assert store.acquire_lock("rebuild", "a", 30) is True  # the holder extends it
    store.release_lock("rebuild", "b")  # not the holder: nothing happens
    assert store.acquire_lock("rebuild", "b", 30) is False
    store.release_lock("rebuild", "a")
    assert store.acquire_lock("rebuild", "b", 0.05) is True
    time.sleep(0.1)  # lapsed: anyone may take it
    assert store.acquire_lock("rebuild", "a", 30) is True


def test_concurrent_records_lose_nothing(store: OnlineStore) -> None:
    def work(thread: int) -> None:
        for i in range(20):
            store.record([ev(f"u{thread}", f"p{i}", "view", T0 + i, category="c")])
            store.claim_event_ids([f"{thread}-{i}"])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(store.recent(f"u{t}")) == 20 for t in range(4))
    assert dict(store.trending(24, 100, category="c")) == {f"p{i}": pytest.approx(4.0) for i in range(20)}


# -- the Redis encoding ------------------------------------------------------------------------------------------
def test_packed_record_round_trips() -> None:
    for kind in ("view", "purchase", "refund", "wishlist"):
        record = pack_event("p0012345", kind, T0 + 0.9)
        assert unpack_event("u", record) == OnlineEvent("u", "p0012345", kind, T0)
    assert len(pack_event("p0012345", "view", T0)) == 13


def test_a_user_with_20_events_and_5_purchases_costs_at_most_1_kb(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, redis_prefix)
    user = "u0012345"
    kinds = ["view", "view", "add_to_cart", "like", "share"]
    events = [ev(user, f"p{1_000_000 + i * 7919:07d}", kinds[i % 5], T0 + i * 60) for i in range(20)]
    events += [ev(user, f"p{2_000_000 + i * 104_729:07d}", "purchase", T0 + 3_600 + i) for i in range(5)]
    store.record(events)
    store.set_consent(user, {"marketing": False})
    assert len(store.recent(user)) == 25
    assert len(store.purchased(user)) == 5
    used = store.user_bytes(user)
    print(f"bytes per user (20 events + 5 purchases + consent): {used}")
    assert 0 < used <= 1024
    keys = Keys(redis_prefix)
    client = store.client
    assert client.object("encoding", keys.recent(user)) in (b"quicklist", b"listpack")
    assert 0 < int(client.ttl(keys.recent(user))) <= USER_TTL_SECONDS
    assert 0 < int(client.ttl(keys.trending_bucket(int(T0 // HOUR)))) <= (TRENDING_BUCKETS_KEPT + 1) * HOUR
    store.close()


def test_redis_errors_propagate() -> None:
    store = RedisStore("redis://127.0.0.1:1/0")
    with pytest.raises(redis.ConnectionError):
        store.recent("u1")


def test_open_store_picks_the_implementation(redis_url: str) -> None:
    assert isinstance(open_store(None), MemoryStore)
    opened = open_store(redis_url)
    assert isinstance(opened, RedisStore)
    assert opened.ping()
    opened.close()


def test_redis_and_memory_agree_on_a_random_event_sequence(redis_url: str, redis_prefix: str) -> None:
    rng = random.Random(11)
    kinds = ["view", "view", "add_to_cart", "purchase", "share", "like", "impression", "refund", "wishlist"]
    events = [
        OnlineEvent(f"u{rng.randrange(8)}", f"p{rng.randrange(40):07d}", rng.choice(kinds),
                    T0 + rng.randrange(-3_600, 40 * 3_600) + rng.random(), rng.choice([None, "c1", "c2"]),
                    rng.choice([None, f"u{rng.randrange(8)}"]))
        for _ in range(600)
    ]
    memory, on_redis = MemoryStore(), RedisStore(redis_url, redis_prefix)
    for start in range(0, len(events), 37):
        memory.record(events[start : start + 37])
        on_redis.record(events[start : start + 37])
        if start == 37 * 5:
            memory.erase_user("u3")
            on_redis.erase_user("u3")
    for user in [f"u{n}" for n in range(8)]:
        assert on_redis.recent(user) == memory.recent(user)
        assert on_redis.purchased(user) == memory.purchased(user)
        assert on_redis.snapshot(user, ["u1", "u2"]) == memory.snapshot(user, ["u1", "u2"])
    for hours, category in [(1, None), (24, None), (TRENDING_BUCKETS_KEPT, None), (24, "c1"), (48, "c2")]:
        got, want = on_redis.trending(hours, 15, category), memory.trending(hours, 15, category)
        assert [item for item, _ in got] == [item for item, _ in want]
        assert [score for _, score in got] == pytest.approx([score for _, score in want], rel=1e-12)
    on_redis.close()


def test_standings_read_tombstones_and_consent_together(store: OnlineStore) -> None:
    store.set_consent("u1", {"marketing": False})
    store.erase_user("u2")
    erased, consents = store.standings(["u1", "u2", "u3"])
    assert erased == [False, True, False]
    assert consents[0]["marketing"] is False
    assert consents[2] == dict.fromkeys(CONSENT_PURPOSES, True)
    assert (erased, consents) == (store.erased(["u1", "u2", "u3"]), store.consents(["u1", "u2", "u3"]))
    assert store.standings([]) == ([], [])
