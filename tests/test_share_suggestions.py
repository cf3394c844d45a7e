"""Share suggestions through the HTTP route on the session's trained bundle, and the bundle's social files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from features.attribution import attribute
from features.dataset import load_dataset
from features.ledger import ControlLedger
from features.online import MemoryStore
from features.social import build_social_graph
from serving.merchandising import Rule, RuleAction
from serving.privacy import Privacy
from serving.recommender import Recommender
from serving.settings import ServingSettings
from serving.share_suggestions import RANKED_CANDIDATES, ShareInputs, ranked_feed, share_router, suggest_shares
from training.bundle import MANIFEST, Bundle, BundleError, load_bundle
from training.params import TrainParams
from training.pipeline import TrainResult


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


@pytest.fixture(scope="module")
def client(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = FastAPI()
    app.include_router(share_router(ServingSettings(max_n=50)))
    app.state.recommender = SimpleNamespace(bundle=bundle)
    app.state.privacy = Privacy(ControlLedger(tmp_path_factory.mktemp("log")), MemoryStore())
    with TestClient(app) as test_client:
        yield test_client


def _sharer(bundle: Bundle) -> str:
    """The user with the most friends and followers who has a factor row."""
    degree = bundle.social_graph.out_degree()[: len(bundle.users)]
    return bundle.users.id_of(int(np.argmax(degree)))


def _get(client: TestClient, user_id: str, **params: int) -> dict[str, Any]:
    response = client.get(f"/v1/users/{user_id}/share-suggestions", params=params,
                          headers={"X-Request-ID": "req-1"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_suggestions_rank_items_for_reachable_friends(client: TestClient, bundle: Bundle) -> None:
    user = _sharer(bundle)
    body = _get(client, user, n=5, friends_per_item=2)
    assert body["request_id"] == "req-1"
    assert body["bundle_version"] == bundle.version
    assert 1 <= len(body["items"]) <= 5
    reach = set(bundle.social_graph.reach_of(user))
    values = [item["expected_conversions"] for item in body["items"]]
    assert values == sorted(values, reverse=True)
    for item in body["items"]:
        assert 1 <= len(item["friends"]) <= 2
        assert {f["user_id"] for f in item["friends"]} <= reach
        assert user not in {f["user_id"] for f in item["friends"]}
        assert item["expected_conversions"] == pytest.approx(sum(f["expected_conversions"] for f in item["friends"]))
        assert item["source"] in ("recent", "als")


def _ranked_app(bundle: Bundle, store: MemoryStore, directory: Path) -> FastAPI:
    app = FastAPI()
    app.include_router(share_router(ServingSettings(max_n=50)))
    app.state.recommender = Recommender(bundle)
    app.state.privacy = Privacy(ControlLedger(directory / "log"), store)
    return app


def test_with_a_ranker_the_items_follow_the_users_feed(bundle: Bundle, tmp_path: Path) -> None:
    app = _ranked_app(bundle, MemoryStore(), tmp_path)
    user = _sharer(bundle)
    feed = app.state.recommender.feed(user, RANKED_CANDIDATES)
    assert feed.ranked > 0, "the session's bundle has a ranker"
    with TestClient(app) as client:
        body = _get(client, user, n=8, friends_per_item=2)
    items = [item["item_id"] for item in body["items"]]
    assert len(items) == 8
    assert {item["source"] for item in body["items"]} == {"feed"}
    # the feed's items in the feed's order, skipping only those no friend would buy
    in_feed = [i.item_id for i in feed.items]
    positions = [in_feed.index(item) for item in items]
    assert positions == sorted(positions)
    inputs = ShareInputs.from_bundle(bundle)
    formula = [i.item_id for i in suggest_shares(inputs, bundle.users.index_of(user), 8, 2).items]
    assert items != formula  # the served list is not the no-ranker formula's
    reach = set(bundle.social_graph.reach_of(user))
    for item in body["items"]:
        assert 1 <= len(item["friends"]) <= 2
        assert {f["user_id"] for f in item["friends"]} <= reach
        assert item["expected_conversions"] > 0


def test_the_ranker_path_keeps_consent_erasure_and_bans(bundle: Bundle, tmp_path: Path) -> None:
    store = MemoryStore()
    app = _ranked_app(bundle, store, tmp_path)
    user = _sharer(bundle)
    with TestClient(app) as client:
        first = _get(client, user, n=5, friends_per_item=3)
        named = first["items"][0]["friends"][0]["user_id"]
        store.erase_user(named)
        assert named not in {f["user_id"] for i in _get(client, user, n=50, friends_per_item=50)["items"]
                             for f in i["friends"]}
        store.set_consent(user, {"personalization": False})
        withheld = _get(client, user)
        assert withheld["items"] == []
        assert "personalization withheld" in withheld["reason"]
    # a banned item is not in the feed the suggestions are taken from
    inputs = ShareInputs.from_bundle(bundle)
    top = first["items"][0]["item_id"]
    ban = Rule(id="no-top", action=RuleAction.BAN, item_ids=[top])
    banned = ranked_feed(app.state.recommender, user, inputs, rules=[ban])
    assert len(banned) > 0  # the ranker ordered a feed
    assert bundle.items.index_of(top) not in set(banned.tolist())
    assert bundle.items.index_of(top) in set(ranked_feed(app.state.recommender, user, inputs).tolist())


def test_expected_conversions_are_open_rate_times_als_affinity(client: TestClient, bundle: Bundle) -> None:
    user = _sharer(bundle)
    body = _get(client, user, n=3, friends_per_item=3)
    row = bundle.user_influence["open_rate"].get(user, bundle.manifest.social["open_rate"])
    assert body["open_rate"] == pytest.approx(row)
    for item in body["items"]:
        i = bundle.items.index_of(item["item_id"])
        assert i is not None
        for friend in item["friends"]:
            f = bundle.users.index_of(friend["user_id"])
            assert f is not None
            affinity = float(np.clip(bundle.user_factors[f] @ bundle.item_factors[i], 0.0, 1.0))
            assert friend["affinity"] == pytest.approx(affinity, rel=1e-4)
            assert friend["expected_conversions"] == pytest.approx(body["open_rate"] * affinity, rel=1e-4)
            assert bundle.bought[f, i] == 0  # nobody is asked to buy what they have


def test_friends_who_bought_an_item_are_left_out_for_it(bundle: Bundle) -> None:
    inputs = ShareInputs.from_bundle(bundle)
    user_idx = bundle.users.index_of(_sharer(bundle))
    assert user_idx is not None
    first = suggest_shares(inputs, user_idx, n=1, friends_per_item=1).items[0]
    item_idx, friend_idx = bundle.items.index_of(first.item_id), bundle.users.index_of(first.friends[0].user_id)
    assert item_idx is not None
    assert friend_idx is not None
    bought = bundle.bought.tolil()
    bought[friend_idx, item_idx] = 1.0
    again = suggest_shares(replace(inputs, bought=bought.tocsr()), user_idx, n=50, friends_per_item=50)
    for item in again.items:
        if item.item_id == first.item_id:
            assert first.friends[0].user_id not in {f.user_id for f in item.friends}


def test_unknown_user_gets_an_empty_list_with_a_reason(client: TestClient, bundle: Bundle) -> None:
    body = _get(client, "nobody-at-all")
    assert body["items"] == []
    assert "unknown user" in body["reason"]
    assert body["bundle_version"] == bundle.version


def test_user_without_friends_gets_a_reason(bundle: Bundle) -> None:
    inputs = ShareInputs.from_bundle(bundle)
    lonely = build_social_graph(None, pd.DataFrame({c: pd.Series([], dtype="str") for c in
                                                    ("user_id", "item_id", "event_type", "target_user_id",
                                                     "referrer_id")}).assign(
        ts=pd.Series([], dtype="datetime64[ns, UTC]")), pd.Timestamp("2030-01-01T00:00:00Z"), users=bundle.users)
    alone = replace(inputs, graph=lonely)
    result = suggest_shares(alone, 0)
    assert result.items == ()
    assert result.reason is not None
    assert "no friends" in result.reason


def test_parameters_are_bounded(client: TestClient) -> None:
    assert client.get("/v1/users/u1/share-suggestions", params={"n": 0}).status_code == 422
    assert client.get("/v1/users/u1/share-suggestions", params={"n": 51}).status_code == 422
    assert client.get("/v1/users/u1/share-suggestions", params={"friends_per_item": 0}).status_code == 422


def test_no_bundle_is_a_503() -> None:
    app = FastAPI()
    app.include_router(share_router(ServingSettings()))
    with TestClient(app) as test_client:
        assert test_client.get("/v1/users/u1/share-suggestions").status_code == 503


def test_bundle_carries_the_social_tables_as_of_now(bundle: Bundle, demo_dir: Path) -> None:
    files = bundle.manifest.files
    for name in ("social_graph.npz", "social_users.parquet", "user_influence.parquet", "item_share_stats.parquet"):
        assert name in files
    data = load_dataset(demo_dir, TrainParams().weights.keys())
    cut = bundle.manifest.data_window.now + pd.Timedelta(1, "ns")
    expected = attribute(data.events, pd.Timestamp(cut))
    pd.testing.assert_frame_equal(bundle.user_influence, expected.users, check_dtype=False, check_names=False)
    assert bundle.manifest.social["open_rate"] == pytest.approx(expected.rates["open_rate"])
    graph = build_social_graph(data.social, data.events, pd.Timestamp(cut), users=bundle.users)
    np.testing.assert_array_equal(bundle.social_graph.indptr, graph.indptr)
    np.testing.assert_array_equal(bundle.social_graph.indices, graph.indices)


def test_a_bundle_with_a_tampered_graph_or_an_older_schema_is_refused(bundle: Bundle, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    (copy / "social_graph.npz").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match=r"checksum mismatch for social_graph\.npz"):
        load_bundle(copy)
    shutil.rmtree(copy)
    shutil.copytree(bundle.path, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["schema_version"] = 3
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 3 is not supported"):
        load_bundle(copy)
