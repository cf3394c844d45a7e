"""The online loop against a real Redis server: events posted to the service change the next feed."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from features.online import MemoryStore, RedisStore
from serving.app import create_app
from serving.settings import ServingSettings
from training.bundle import Bundle, load_bundle
from training.pipeline import TrainResult

pytest_plugins = ["tests.redis_fixture"]


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


@pytest.fixture
def client(bundle: Bundle, redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[TestClient]:
    store = RedisStore(redis_url, redis_prefix)
    settings = ServingSettings(redis_url=redis_url, redis_prefix=redis_prefix, event_log=tmp_path / "log")
    with TestClient(create_app(settings, bundle=bundle, store=store)) as test_client:
        yield test_client


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _feed(client: TestClient, user: str, **params: str | int) -> dict[str, object]:
    response = client.get(f"/v1/users/{user}/feed", params={"n": 20, **params})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def _ids(feed: dict[str, object]) -> list[str]:
    return [item["item_id"] for item in feed["items"]]  # type: ignore[attr-defined]


def _category(bundle: Bundle, item_id: str) -> str:
    idx = bundle.items.index_of(item_id)
    assert idx is not None
    return str(bundle.item_meta["category"].iloc[idx])


def test_a_purchase_leaves_the_next_feed_within_a_second(client: TestClient, bundle: Bundle) -> None:
    policy = bundle.manifest.repurchase
    users = bundle.users.ids[:50].tolist()
    for user in users:  # a user whose feed holds an item that is not bought twice
        items = _ids(_feed(client, user))
        once = [i for i in items if not policy.repeatable_mask(np.asarray([_category(bundle, i)], dtype=object))[0]]
        if once:
            break
    else:
        pytest.fail("no feed among 50 users holds a once-only item")
    item = once[0]
    started = time.perf_counter()
    posted = client.post("/v1/events", json={"events": [
        {"user_id": user, "item_id": item, "event_type": "purchase", "timestamp": _now()}]})
    assert posted.status_code == 200, posted.text
    assert posted.json()["accepted"] == 1
    after = _feed(client, user)
    elapsed = time.perf_counter() - started
    assert item not in _ids(after)
    assert after["step"] == "fold_in"
    assert elapsed < 1.0


def test_views_in_a_new_category_bring_that_category_into_the_feed(client: TestClient, bundle: Bundle) -> None:
    user = bundle.users.ids[3]
    before = _feed(client, user)
    shown = {_category(bundle, i) for i in _ids(before)}
    categories = bundle.item_meta["category"].dropna()
    fresh = [c for c in categories.unique().tolist() if c not in shown]
    assert fresh, "the feed already covers every category"
    category = fresh[0]
    viewed = bundle.items.ids[np.flatnonzero((bundle.item_meta["category"] == category).to_numpy())[:3]].tolist()
    started = time.perf_counter()
    events = [{"user_id": user, "item_id": i, "event_type": "view", "timestamp": _now()} for i in viewed]
    assert client.post("/v1/events", json={"events": events}).json()["accepted"] == 3
    after = _feed(client, user, explain="true")
    elapsed = time.perf_counter() - started
    in_category = [i for i in _ids(after) if _category(bundle, i) == category]
    assert in_category, f"no {category} item after viewing {viewed}"
    assert elapsed < 1.0


def test_a_new_user_who_viewed_three_items_gets_a_personal_feed(client: TestClient, bundle: Bundle) -> None:
    user = "shopper-new-1"
    cold = _feed(client, user)
    assert cold["personalized"] is False
    assert cold["step"] in ("trending", "popular")
    category = bundle.item_meta["category"].dropna().iloc[0]
    viewed = bundle.items.ids[np.flatnonzero((bundle.item_meta["category"] == category).to_numpy())[:3]].tolist()
    events = [{"user_id": user, "item_id": i, "event_type": "view", "timestamp": _now()} for i in viewed]
    assert client.post("/v1/events", json={"events": events}).json()["accepted"] == 3
    warm = _feed(client, user, explain="true")
    assert warm["personalized"] is True
    assert warm["step"] == "fold_in"
    assert _ids(warm) != _ids(cold)
    assert sum(_category(bundle, i) == category for i in _ids(warm)) >= 3


def test_events_are_idempotent_and_bad_rows_are_refused_alone(client: TestClient, bundle: Bundle) -> None:
    item = bundle.items.ids[0]
    batch = {"events": [
        {"user_id": "u-x", "item_id": item, "event_type": "view", "timestamp": _now(), "event_id": "e-1"},
        {"user_id": "u-x", "item_id": item, "event_type": "view", "timestamp": "2026-11-25T10:00:00"},
        {"user_id": "u-x", "item_id": item, "event_type": "teleport", "timestamp": _now()},
        {"user_id": "u-x", "item_id": item, "event_type": "purchase", "timestamp": _now(), "event_id": "e-2"},
    ]}
    first = client.post("/v1/events", json=batch).json()
    assert first["accepted"] == 2
    assert {r["index"] for r in first["rejected"]} == {1, 2}
    assert "zone" in first["rejected"][0]["reason"] or "zone" in first["rejected"][1]["reason"]
    again = client.post("/v1/events", json=batch).json()
    assert again["accepted"] == 0
    assert again["duplicates"] == 2


def test_withdrawn_consent_gives_a_non_personal_feed(client: TestClient, bundle: Bundle) -> None:
    user = bundle.users.ids[5]
    assert _feed(client, user)["personalized"] is True
    answer = client.put(f"/v1/users/{user}/consent", json={"personalization": False})
    assert answer.status_code == 200
    assert answer.json()["personalization"] is False
    feed = _feed(client, user)
    assert feed["personalized"] is False
    assert feed["step"] in ("trending", "popular")
    client.put(f"/v1/users/{user}/consent", json={"personalization": True})
    assert _feed(client, user)["personalized"] is True


def test_merchandising_rules_and_stock_changes_reach_the_feed(bundle: Bundle, redis_url: str, redis_prefix: str,
                                                              tmp_path: Path) -> None:
    store = RedisStore(redis_url, redis_prefix)
    settings = ServingSettings(redis_url=redis_url, redis_prefix=redis_prefix, event_log=tmp_path / "log",
                               overlay_refresh_seconds=0, max_per_category=2, diversity_window=6)
    with TestClient(create_app(settings, bundle=bundle, store=store)) as client:
        user = bundle.users.ids[7]
        first = _ids(_feed(client, user))
        head = [_category(bundle, i) for i in first[:6]]
        assert max(head.count(c) for c in head) <= 2  # diversity: at most two of a category in the first six
        banned, pinned = first[0], bundle.items.ids[-1]
        assert client.put("/v1/merchandising/rules/no-first", json={"action": "ban", "item_ids": [banned]}
                          ).status_code == 200
        assert client.put("/v1/merchandising/rules/feature", json={"action": "pin", "item_ids": [pinned],
                                                                  "position": 1}).status_code == 200
        out_of_stock = first[1]
        assert client.put(f"/v1/items/{out_of_stock}", json={"in_stock": False}).status_code == 200
        after = _feed(client, user)
        ids = _ids(after)
        assert banned not in ids
        assert out_of_stock not in ids
        assert ids[0] == pinned
        assert after["items"][0]["source"] == "pinned"  # type: ignore[index]


def test_a_new_catalog_item_reaches_feeds_and_its_viewers_get_content_neighbours(
        client: TestClient, bundle: Bundle) -> None:
    known = bundle.items.ids[0]
    category = _category(bundle, known)
    created = client.put("/v1/items/brand-new-1", json={"category": category, "price": 9.5, "in_stock": True,
                                                         "created_at": _now()})
    assert created.status_code == 200, created.text
    time.sleep(1.1)  # catalog changes reach a worker within a second
    feed = _feed(client, "cold-shopper", category=category)
    assert "brand-new-1" in _ids(feed)
    fresh = next(i for i in feed["items"] if i["item_id"] == "brand-new-1")  # type: ignore[attr-defined]
    assert fresh["source"] == "new_arrivals"
    viewer = "viewer-of-new"
    assert client.post("/v1/events", json={"events": [
        {"user_id": viewer, "item_id": "brand-new-1", "event_type": "view", "timestamp": _now()}]}
    ).json()["accepted"] == 1
    after = _feed(client, viewer)
    assert after["personalized"] is True
    assert after["step"] == "neighbours"
    assert all(_category(bundle, i) == category for i in _ids(after)[:5] if i != "brand-new-1")


def test_replay_rebuilds_redis_from_the_log_after_a_loss(bundle: Bundle, redis_url: str, redis_prefix: str,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from sharefeed.cli import main

    store = RedisStore(redis_url, redis_prefix)
    log_dir = tmp_path / "log"
    settings = ServingSettings(redis_url=redis_url, redis_prefix=redis_prefix, event_log=log_dir)
    user, item = "replayed-user", bundle.items.ids[4]
    with TestClient(create_app(settings, bundle=bundle, store=store)) as client:
        client.post("/v1/events", json={"events": [
            {"user_id": user, "item_id": item, "event_type": "purchase", "timestamp": _now()}]})
        client.put(f"/v1/users/{user}/consent", json={"marketing": False})
    keys = list(store.client.scan_iter(f"{redis_prefix}*"))
    store.client.delete(*keys)  # Redis lost everything
    assert store.purchased(user) == {}
    monkeypatch.setenv("SHAREFEED_REDIS_URL", redis_url)
    monkeypatch.setenv("SHAREFEED_REDIS_PREFIX", redis_prefix)
    result = CliRunner().invoke(main, ["replay", "--log", str(log_dir), "--bundle", str(bundle.path)])
    assert result.exit_code == 0, result.output
    assert "replayed 1 events and 1 consent/erasure rows" in result.output
    assert list(store.purchased(user)) == [item]
    assert store.consent(user)["marketing"] is False


def _sees(data: Path, viewer: str) -> set[str]:
    """Whose activity the viewer sees, from the raw tables: friends, people they follow, people who shared
    with them or referred them (the social graph's definition)."""
    import pandas as pd

    social = pd.read_parquet(data / "social.parquet")
    events = pd.read_parquet(data / "events.parquet")
    friend = social["kind"] == "friend"
    seen = set(social.loc[friend & (social["friend_id"] == viewer), "user_id"])
    seen |= set(social.loc[friend & (social["user_id"] == viewer), "friend_id"])
    seen |= set(social.loc[(social["kind"] == "follow") & (social["user_id"] == viewer), "friend_id"])
    if "target_user_id" in events.columns:
        seen |= set(events.loc[events["target_user_id"] == viewer, "user_id"])
    if "referrer_id" in events.columns:
        seen |= set(events.loc[(events["user_id"] == viewer) & events["referrer_id"].notna(), "referrer_id"])
    seen.discard(viewer)
    return seen


def test_social_proof_names_the_friends_who_really_bought_and_respects_their_consent(
        bundle: Bundle, demo_dir: Path, redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    import pandas as pd

    events = pd.read_parquet(demo_dir / "events.parquet")
    purchases = events.loc[events["event_type"] == "purchase"]
    store = RedisStore(redis_url, redis_prefix)
    settings = ServingSettings(redis_url=redis_url, redis_prefix=redis_prefix, event_log=tmp_path / "log",
                               social_proof_names=True)
    with TestClient(create_app(settings, bundle=bundle, store=store)) as client:
        checked = 0
        for user in bundle.users.ids[:80].tolist():
            feed = client.get(f"/v1/users/{user}/feed", params={"n": 20, "explain": "true"}).json()
            friends = _sees(demo_dir, user)
            for item in feed["items"]:
                buyers = set(purchases.loc[purchases["item_id"] == item["item_id"], "user_id"]) & friends
                if not buyers:
                    assert "social" not in item
                    continue
                assert item["social"]["friends_bought"] == len(buyers)
                assert set(item["social"]["friend_ids"]) <= buyers
                assert "bought this" in item["reason"]
                checked += 1
            if checked >= 5:
                break
        assert checked >= 5, "too few feed items with a friend's purchase to check"
        named = next(i for i in feed["items"] if "social" in i)
        hidden = named["social"]["friend_ids"][0]
        client.put(f"/v1/users/{hidden}/consent", json={"social_proof": False})
        erased = named["social"]["friend_ids"][-1]
        client.delete(f"/v1/users/{erased}")
        again = client.get(f"/v1/users/{user}/feed", params={"n": 20, "explain": "true"}).json()
        for item in again["items"]:
            assert hidden not in item.get("social", {}).get("friend_ids", [])
            assert erased not in item.get("social", {}).get("friend_ids", [])
    counts_only = ServingSettings(redis_url=redis_url, redis_prefix=redis_prefix, event_log=tmp_path / "log2")
    with TestClient(create_app(counts_only, bundle=bundle, store=store)) as client:
        feed = client.get(f"/v1/users/{user}/feed", params={"n": 20, "explain": "true"}).json()
        social = [i for i in feed["items"] if "social" in i]
        assert social
        assert all("friend_ids" not in i["social"] for i in social)
        assert all("friend" in i["reason"] for i in social)


def _friend_pair(bundle: Bundle) -> tuple[str, str]:
    """A user who sees someone in the bundle's graph, and that someone."""
    sees = bundle.state.user_sees
    for user in range(len(bundle.users)):
        if sees.indptr[user + 1] > sees.indptr[user]:
            return bundle.users.id_of(user), bundle.users.id_of(int(sees.indices[sees.indptr[user]]))
    raise AssertionError("no user sees anyone")


def test_a_share_sent_since_the_bundle_reaches_the_recipients_feed(client: TestClient, bundle: Bundle) -> None:
    user, _ = _friend_pair(bundle)
    before = _feed(client, user, n=50, explain="true")
    shown = set(_ids(before))
    row = bundle.users.index_of(user)
    bought = {bundle.items.id_of(int(i)) for i in bundle.bought[row].indices}
    item = next(i for i in bundle.items.ids.tolist()[::-1] if i not in shown and i not in bought)
    sharer = "someone-new"  # not in the bundle: the share still counts, the sharer is just not described
    posted = client.post("/v1/events", json={"events": [
        {"user_id": sharer, "item_id": item, "event_type": "share", "target_user_id": user, "timestamp": _now()}]})
    assert posted.json()["accepted"] == 1, posted.text
    after = _feed(client, user, n=20, explain="true")
    first = after["items"][0]  # type: ignore[index]
    assert first["item_id"] == item, "a fresh share is not at the top of the recipient's feed"
    assert first["source"] == "shared"
    assert first["reason"] == "shared with you by a friend"
    client.delete(f"/v1/users/{sharer}")  # an erased sharer's shares are not read any more
    assert "shared" not in {i["source"] for i in _feed(client, user, n=50)["items"]  # type: ignore[attr-defined]
                            if i["item_id"] == item}


def test_a_friends_purchase_since_the_bundle_counts_in_features_and_social_proof(
        client: TestClient, bundle: Bundle) -> None:
    from features.ranking import FEATURE_NAMES, pair_features
    from serving.recommender import Recommender, UserContext

    user, friend = _friend_pair(bundle)
    feed = _feed(client, user, n=50, explain="true")
    plain = [i for i in feed["items"] if "social" not in i]  # type: ignore[attr-defined]
    item = plain[0]["item_id"]
    recommender = Recommender(bundle)
    user_idx, item_idx = bundle.users.index_of(user), bundle.items.index_of(item)
    assert user_idx is not None
    assert item_idx is not None
    now = time.time()
    column = FEATURE_NAMES.index("friends_bought_1d")

    def friends_bought_1d(context: UserContext) -> float:
        profile = recommender._profile(user_idx, context)
        assert profile is not None
        row = pair_features(profile.state, np.asarray([profile.row]), np.asarray([item_idx]), {}, {})
        return float(row[0, column])

    quiet = friends_bought_1d(UserContext(recent=(), purchased={}, friends_purchased={"x": {item: now}}))
    assert friends_bought_1d(UserContext(friends_purchased={friend: {item: now}})) == quiet + 1
    assert friend in recommender.friend_ids(user)

    posted = client.post("/v1/events", json={"events": [
        {"user_id": friend, "item_id": item, "event_type": "purchase", "timestamp": _now()}]})
    assert posted.json()["accepted"] == 1, posted.text
    after = {i["item_id"]: i for i in _feed(client, user, n=50, explain="true")["items"]}  # type: ignore[attr-defined]
    assert item in after
    assert after[item]["social"]["friends_bought"] == 1
    assert after[item]["reason"] == "a friend bought this"
    client.put(f"/v1/users/{friend}/consent", json={"social_proof": False})  # their purchase is theirs again
    hidden = {i["item_id"]: i for i in _feed(client, user, n=50, explain="true")["items"]}  # type: ignore[attr-defined]
    assert "social" not in hidden.get(item, {})
    assert hidden.get(item, {}).get("source") != "friends_bought"


def test_what_a_friend_shares_since_the_bundle_counts_in_the_users_features(client: TestClient, bundle: Bundle
                                                                           ) -> None:
    from features.ranking import FEATURE_NAMES, pair_features
    from serving.recommender import Recommender

    user, friend = _friend_pair(bundle)
    item = bundle.items.ids.tolist()[-1]
    recommender = Recommender(bundle)
    user_idx, item_idx = bundle.users.index_of(user), bundle.items.index_of(item)
    assert user_idx is not None
    assert item_idx is not None
    columns = [FEATURE_NAMES.index("friends_shared_1d"), FEATURE_NAMES.index("friends_viewed_1d")]

    def friends_shared_and_viewed_1d() -> list[float]:
        view = client.app.state.service.user_view(user)  # type: ignore[attr-defined]
        profile = recommender._profile(user_idx, view.context)
        assert profile is not None
        row = pair_features(profile.state, np.asarray([profile.row]), np.asarray([item_idx]), {}, {})
        return [float(row[0, c]) for c in columns]

    before = friends_shared_and_viewed_1d()
    posted = client.post("/v1/events", json={"events": [  # shared with someone else: the user still sees it
        {"user_id": friend, "item_id": item, "event_type": "share", "target_user_id": _stranger(bundle, user),
         "timestamp": _now()}]})
    assert posted.json()["accepted"] == 1, posted.text
    view = client.app.state.service.user_view(user)  # type: ignore[attr-defined]
    assert item in view.context.friends_shared[friend]
    assert friends_shared_and_viewed_1d() == [before[0] + 1, before[1] + 1]  # a share is a positive event too
    client.put(f"/v1/users/{friend}/consent", json={"social_proof": False})
    assert friend not in client.app.state.service.user_view(user).context.friends_shared  # type: ignore[attr-defined]


def _stranger(bundle: Bundle, user: str) -> str:
    """A bundle user whom `user` does not see."""
    row = bundle.users.index_of(user)
    assert row is not None
    seen = set(bundle.state.user_sees[row].indices.tolist())
    return next(bundle.users.id_of(k) for k in range(len(bundle.users)) if k != row and k not in seen)


@pytest.mark.parametrize("tie", ["share", "referral"])
def test_someone_who_shares_with_the_user_or_refers_them_becomes_a_tie_whose_purchases_count(
        client: TestClient, bundle: Bundle, tie: str) -> None:
    """A share makes its sharer, an event through a referral its referrer, one of the people the user sees (a
    rebuilt graph would hold the tie): their purchases since the bundle reach the user's context and social
    proof, consent permitting."""
    user, _ = _friend_pair(bundle)
    stranger = _stranger(bundle, user)
    assert stranger not in client.app.state.service.recommender.friend_ids(user)  # type: ignore[attr-defined]
    feed = _feed(client, user, n=50, explain="true")
    item = next(i for i in feed["items"] if "social" not in i)["item_id"]  # type: ignore[attr-defined]

    passed_on = bundle.items.ids.tolist()[-1]
    posted = client.post("/v1/events", json={"events": [
        {"user_id": stranger, "item_id": item, "event_type": "purchase", "timestamp": _now()},
        {"user_id": stranger, "item_id": passed_on, "event_type": "share", "timestamp": _now()}]})
    assert posted.json()["accepted"] == 2, posted.text
    view = client.app.state.service.user_view(user)  # type: ignore[attr-defined]
    assert stranger not in view.context.friends_purchased  # not a tie yet: their purchase is not read
    assert stranger not in view.context.friends_shared
    assert "social" not in {i["item_id"]: i for i in _feed(client, user, n=50)["items"]}.get(item, {})  # type: ignore[attr-defined]

    other = next(i for i in bundle.items.ids.tolist() if i != item)
    event = ({"user_id": stranger, "item_id": other, "event_type": "share", "target_user_id": user} if tie == "share"
             else {"user_id": user, "item_id": other, "event_type": "view", "referrer_id": stranger})
    posted = client.post("/v1/events", json={"events": [{**event, "timestamp": _now()}]})
    assert posted.json()["accepted"] == 1, posted.text
    view = client.app.state.service.user_view(user)  # type: ignore[attr-defined]
    assert item in view.context.friends_purchased[stranger]
    assert passed_on in view.context.friends_shared[stranger]
    after = {i["item_id"]: i for i in _feed(client, user, n=50, explain="true")["items"]}  # type: ignore[attr-defined]
    assert after[item]["social"]["friends_bought"] == 1
    assert after[item]["reason"] == "a friend bought this"

    client.put(f"/v1/users/{stranger}/consent", json={"social_proof": False})
    view = client.app.state.service.user_view(user)  # type: ignore[attr-defined]
    assert stranger not in view.context.friends_purchased
    hidden = {i["item_id"]: i for i in _feed(client, user, n=50, explain="true")["items"]}  # type: ignore[attr-defined]
    assert "social" not in hidden.get(item, {})
    assert client.delete(f"/v1/users/{stranger}").status_code == 202  # erased: no tie, no share, nothing stored
    view = client.app.state.service.user_view(user)  # type: ignore[attr-defined]
    assert stranger not in view.context.referred_by
    assert stranger not in [e.user_id for e in view.context.shared_to]
    assert stranger not in client.app.state.service.store.snapshot(user).referred_by  # type: ignore[attr-defined]


def test_a_store_failure_reading_a_new_ties_purchases_leaves_the_feed_up(bundle: Bundle, tmp_path: Path) -> None:
    user, _ = _friend_pair(bundle)
    stranger = _stranger(bundle, user)
    asked: list[str] = []

    class Failing(MemoryStore):
        def activity_of(self, user_ids: Sequence[str]
                        ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
            if stranger in user_ids:  # the read after the snapshot
                asked.append(stranger)
                raise redis.ConnectionError("down")
            return super().activity_of(user_ids)

    settings = ServingSettings(event_log=tmp_path / "log")
    with TestClient(create_app(settings, bundle=bundle, store=Failing())) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while not service.recovery.ready and time.monotonic() < deadline:  # the first check finds the store
            time.sleep(0.05)
        item = bundle.items.ids.tolist()[0]
        posted = client.post("/v1/events", json={"events": [
            {"user_id": stranger, "item_id": item, "event_type": "share", "target_user_id": user,
             "timestamp": _now()}]})
        assert posted.json()["accepted"] == 1, posted.text
        feed = _feed(client, user, n=20, explain="true")
        assert feed["personalized"]
        assert feed["items"]
        view = service.user_view(user)
        assert not view.degraded
        assert [e.user_id for e in view.context.shared_to] == [stranger]
        assert asked  # the new tie's purchases were asked for, and that failed
        assert service.recovery.ready  # a read that failed is not an outage of the event path


def test_fresh_shares_take_the_first_seats_one_per_sharer_and_explain_from_the_users_own_history(
        bundle: Bundle) -> None:
    from features.store import OnlineEvent
    from serving.recommender import Recommender, UserContext

    recommender = Recommender(bundle)
    recent = bundle.recent
    row = next(r for r in range(1, len(bundle.users))  # not row 0: a one-user view's row is 0
               if recent.indptr[r + 1] > recent.indptr[r]
               and not set(recent.indices[recent.indptr[r] : recent.indptr[r + 1]].tolist())
               & set(recent.indices[recent.indptr[0] : recent.indptr[1]].tolist()))
    user = bundle.users.id_of(row)
    now = time.time()
    owned = {bundle.items.id_of(int(i)) for i in bundle.bought[row].indices}
    if bundle.manifest.served.exclude_seen:  # the user's own items are kept out of their list too
        owned |= {bundle.items.id_of(int(i)) for i in bundle.state.pair_weight[row].indices}
    free = [i for i in bundle.items.ids.tolist() if i not in owned]

    def shared(sharer: str, item: str, age_hours: float) -> OnlineEvent:
        return OnlineEvent(sharer, item, "share", now - 3600 * age_hours, None, user)

    context = UserContext(shared_to=[shared("s1", free[0], 1), shared("s1", free[1], 2), shared("s2", free[2], 3),
                                     shared("s3", free[3], 24 * 4)])
    result = recommender.feed(user, 20, context=context)
    assert [i.item_id for i in result.items[:2]] == [free[0], free[2]]  # s1's newest, then s2's; s3's is too old
    assert {i.source.value for i in result.items[:2]} == {"shared"}
    assert result.step is not None
    assert result.step.value != "shared"  # the seats are not the feed's step
    profile = recommender._profile(row, context)
    assert profile is not None
    assert not profile.online  # shares alone do not refold the user
    anchors = recommender._anchors(_as_feed(result, bundle), profile)  # type: ignore[arg-type]
    history = set(bundle.recent.indices[bundle.recent.indptr[row] : bundle.recent.indptr[row + 1]].tolist())
    assert anchors, "no pick explained by the history: nothing checked"
    assert set(anchors.values()) <= history  # "similar to X you looked at": X from this user's history only


def _as_feed(result: object, bundle: Bundle) -> object:
    from features.feed import Feed

    items = result.items  # type: ignore[attr-defined]
    sources = tuple(i.source for i in items)
    return Feed(bundle.items.indexes([i.item_id for i in items]), np.asarray([i.score for i in items]), sources,
                sources)
