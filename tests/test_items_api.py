"""The item routes through the ASGI app: similar, bought together, trending, catalog writes, rules."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from fastapi import FastAPI
from fastapi.testclient import TestClient

from features.online import MemoryStore
from features.store import OnlineEvent
from serving.catalog import Catalog
from serving.item_schemas import MAX_CATALOG_BATCH
from serving.items import items_router
from serving.recommender import Recommender
from serving.settings import ServingSettings
from training.bundle import MANIFEST, SCHEMA_VERSION, Bundle, BundleError, load_bundle
from training.pipeline import TrainResult


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


def _app(bundle: Bundle, store: MemoryStore | None) -> FastAPI:
    app = FastAPI()
    app.include_router(items_router(ServingSettings(max_n=50)))
    app.state.recommender = Recommender(bundle)
    app.state.store = store
    return app


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def client(bundle: Bundle, store: MemoryStore) -> Iterator[TestClient]:
    with TestClient(_app(bundle, store)) as test_client:
        yield test_client


def _popular(bundle: Bundle, rank: int = 0) -> str:
    return bundle.items.id_of(int(np.argsort(-bundle.popularity.popular, kind="stable")[rank]))


def _category(bundle: Bundle, item_id: str) -> str:
    return str(bundle.item_meta["category"].iloc[bundle.items.index_of(item_id)])


def _ids(body: dict[str, Any]) -> list[str]:
    return [i["item_id"] for i in body["items"]]


def test_similar_is_cosine_over_the_factors(client: TestClient, bundle: Bundle) -> None:
    item = _popular(bundle)
    response = client.get(f"/v1/items/{item}/similar", params={"n": 5}, headers={"x-request-id": "r-1"})
    assert response.status_code == 200
    body = response.json()
    assert body["request_id"] == "r-1"
    assert body["bundle_version"] == bundle.version
    assert body["item_id"] == item
    assert len(body["items"]) == 5
    assert {i["source"] for i in body["items"]} == {"similar"}
    factors = bundle.item_factors / np.linalg.norm(bundle.item_factors, axis=1, keepdims=True).clip(1e-6)
    own = bundle.items.index_of(item)
    cosine = factors @ factors[own]
    cosine[own] = -np.inf
    cosine[(bundle.popularity.popular == 0) | (bundle.item_meta["in_stock"].fillna(True) == False)] = -np.inf  # noqa: E712
    expected = [bundle.items.id_of(int(i)) for i in np.argsort(-cosine, kind="stable")[:5]]
    assert _ids(body) == expected
    assert [i["score"] for i in body["items"]] == pytest.approx(np.sort(cosine)[::-1][:5].tolist(), abs=1e-5)


def test_unknown_item_is_a_404_that_says_so(client: TestClient) -> None:
    for path in ("similar", "bought-together"):
        response = client.get(f"/v1/items/no-such-item/{path}")
        assert response.status_code == 404
        assert "unknown item 'no-such-item'" in response.json()["detail"]


def test_new_catalog_item_gets_content_neighbours(client: TestClient, bundle: Bundle) -> None:
    anchor = _popular(bundle)
    category = _category(bundle, anchor)
    put = client.put("/v1/items/brand-new", json={"category": category, "price": 10.0, "in_stock": True,
                                                  "created_at": "2026-11-20T00:00:00Z"})
    assert put.status_code == 200, put.text
    assert put.json()["accepted"] == 1
    body = client.get("/v1/items/brand-new/similar", params={"n": 5}).json()
    assert len(body["items"]) == 5
    assert {i["source"] for i in body["items"]} == {"content"}
    members = {bundle.items.id_of(i) for i in np.flatnonzero(bundle.item_meta["category"].to_numpy() == category)}
    assert set(_ids(body)) <= members
    # and the new item is a content neighbour of the next new item in its category (fresh first on a tie)
    client.put("/v1/items/newer", json={"category": category, "price": 10.0})
    assert "brand-new" in _ids(client.get("/v1/items/newer/similar", params={"n": 50}).json())


def test_out_of_stock_items_leave_every_list(client: TestClient, bundle: Bundle) -> None:
    item = _popular(bundle)
    first = _ids(client.get(f"/v1/items/{item}/similar", params={"n": 3}).json())[0]
    trending_top = _ids(client.get("/v1/trending", params={"n": 3}).json())[0]
    batch = [{"item_id": first, "in_stock": False}, {"item_id": trending_top, "in_stock": False}]
    assert client.post("/v1/items", json={"items": batch}).json()["accepted"] == 2
    assert first not in _ids(client.get(f"/v1/items/{item}/similar", params={"n": 20}).json())
    assert trending_top not in _ids(client.get("/v1/trending", params={"n": 50}).json())


def test_bought_together_then_similar_in_the_same_category(bundle: Bundle, store: MemoryStore) -> None:
    ids = bundle.items.ids
    anchor = _popular(bundle)
    a = bundle.items.index_of(anchor)
    assert a is not None
    others = [i for i in range(len(ids)) if i != a][:3]
    matrix = sp.csr_matrix(([0.9, 0.5, 0.7], ([a, a, a], others)), shape=(len(ids), len(ids)), dtype=np.float32)
    custom = dataclasses.replace(bundle, bought_together=matrix)
    with TestClient(_app(custom, store)) as client:
        client.put(f"/v1/items/{ids[others[1]]}", json={"in_stock": False})
        body = client.get(f"/v1/items/{anchor}/bought-together", params={"n": 6}).json()
    assert _ids(body)[:2] == [ids[others[0]], ids[others[2]]]  # best first; the one out of stock is gone
    assert [i["source"] for i in body["items"]][:2] == ["bought_together"] * 2
    rest = body["items"][2:]
    assert len(rest) == 4
    assert {i["source"] for i in rest} == {"similar_in_category"}
    assert {_category(bundle, i["item_id"]) for i in rest} == {_category(bundle, anchor)}
    assert ids[others[1]] not in _ids(body)


def test_trending_merges_the_live_window_in_stock_and_by_category(client: TestClient, bundle: Bundle,
                                                                   store: MemoryStore) -> None:
    quiet = bundle.items.id_of(int(np.argsort(bundle.popularity.trending, kind="stable")[0]))
    category = _category(bundle, quiet)
    ts = bundle.manifest.data_window.now.timestamp()
    store.record([OnlineEvent(f"u{i}", quiet, "purchase", ts + i, category) for i in range(30)])
    body = client.get("/v1/trending", params={"n": 10}).json()
    assert len(body["items"]) == 10
    assert _ids(body)[0] == quiet  # first in the live list, absent from the bundle's
    assert body["items"][0]["source"] == "trending_live"
    assert "trending" in {i["source"] for i in body["items"][1:]}
    in_category = client.get("/v1/trending", params={"n": 10, "category": category}).json()
    assert in_category["category"] == category
    assert _ids(in_category)[0] == quiet
    assert {_category(bundle, i) for i in _ids(in_category)} == {category}


def test_trending_without_a_store_is_the_bundle_table(bundle: Bundle) -> None:
    with TestClient(_app(bundle, None)) as client:
        body = client.get("/v1/trending", params={"n": 5}).json()
        sold_out = (bundle.item_meta["in_stock"].fillna(True) == False).to_numpy()  # noqa: E712
        order = [int(i) for i in np.argsort(-bundle.popularity.trending, kind="stable") if not sold_out[i]]
        assert sold_out.any()  # the demo catalog has items out of stock: they must not show
        assert _ids(body) == [bundle.items.id_of(i) for i in order[:5]]
        assert client.put("/v1/items/x", json={"price": 1.0}).status_code == 503


def test_catalog_batch_reports_rows_it_rejects(client: TestClient) -> None:
    rows: list[dict[str, Any]] = [{"item_id": "n1", "price": 3.5}, {"item_id": "n2", "price": -1},
                                  {"price": 2.0}, {"item_id": "n3", "colour": "red"}, {"item_id": "n4"}]
    body = client.post("/v1/items", json={"items": rows}).json()
    assert body["accepted"] == 2
    reasons = {r["index"]: r for r in body["rejected"]}
    assert set(reasons) == {1, 2, 3}
    assert "price" in reasons[1]["reason"]
    assert reasons[1]["item_id"] == "n2"
    assert "item_id" in reasons[2]["reason"]
    assert "colour" in reasons[3]["reason"]
    assert client.get("/v1/items/n1/similar").status_code == 200
    too_many = [{"item_id": f"i{i}"} for i in range(MAX_CATALOG_BATCH + 1)]
    assert client.post("/v1/items", json={"items": too_many}).status_code == 422
    assert client.put("/v1/items/x", json={"created_at": "2026-01-01T00:00:00"}).status_code == 422  # no zone


def test_merchandising_rules_round_trip(client: TestClient, bundle: Bundle) -> None:
    rule = {"action": "pin", "item_ids": ["p1"], "position": 2, "starts_at": "2026-11-01T00:00:00Z"}
    put = client.put("/v1/merchandising/rules/black-friday", json=rule)
    assert put.status_code == 200, put.text
    assert put.json()["rule"]["id"] == "black-friday"
    assert put.json()["bundle_version"] == bundle.version
    client.put("/v1/merchandising/rules/no-socks", json={"action": "ban", "categories": ["socks"]})
    listed = client.get("/v1/merchandising/rules").json()
    assert [r["id"] for r in listed["rules"]] == ["black-friday", "no-socks"]
    assert listed["rules_version"] == 2
    one = client.get("/v1/merchandising/rules/black-friday").json()["rule"]
    assert one["position"] == 2
    assert one["starts_at"].startswith("2026-11-01T00:00:00")
    assert client.delete("/v1/merchandising/rules/black-friday").json()["deleted"] is True
    assert client.delete("/v1/merchandising/rules/black-friday").status_code == 404
    assert client.get("/v1/merchandising/rules/black-friday").status_code == 404


def test_invalid_rules_are_refused_with_the_reason(client: TestClient) -> None:
    response = client.put("/v1/merchandising/rules/r1", json={"action": "pin", "item_ids": ["a"]})
    assert response.status_code == 422
    assert "needs a position" in response.text
    assert client.put("/v1/merchandising/rules/bad id", json={"action": "ban", "item_ids": ["a"]}).status_code == 422
    assert client.get("/v1/merchandising/rules").json()["rules"] == []


def test_n_is_bounded_by_the_settings(client: TestClient, bundle: Bundle) -> None:
    assert client.get(f"/v1/items/{_popular(bundle)}/similar", params={"n": 51}).status_code == 422
    assert client.get("/v1/trending", params={"n": 0}).status_code == 422


def test_no_bundle_is_a_503(store: MemoryStore) -> None:
    app = FastAPI()
    app.include_router(items_router(ServingSettings()))
    app.state.recommender = None
    app.state.store = store
    with TestClient(app) as client:
        assert client.get("/v1/trending").status_code == 503


class _CatalogRows:
    """A catalog source that counts what it hands out (the refresh must ask only for changes)."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.asked: list[int] = []
        self.handed = 0

    def items_since(self, version: int) -> tuple[int, list[dict[str, object]]]:
        self.asked.append(version)
        current, rows = self.store.items_since(version)
        self.handed += len(rows)
        return current, rows


def test_catalog_refresh_applies_only_changed_rows(bundle: Bundle) -> None:
    source, catalog = _CatalogRows(), Catalog(bundle)
    known = bundle.items.id_of(0)
    idx = 0
    source.store.put_items([{"item_id": known, "price": 99.5, "in_stock": False, "category": "zz-new-category"}])
    assert catalog.refresh(source) == 1
    assert catalog.price[idx] == 99.5
    assert not catalog.in_stock[idx]
    assert catalog.category_of(known) == "zz-new-category"
    assert catalog.members("zz-new-category").tolist() == [idx]
    assert bundle.item_meta["price"].iloc[idx] != 99.5  # the bundle itself is untouched
    assert catalog.refresh(source) == 0  # nothing changed since
    source.store.put_items([{"item_id": "fresh-1", "category": "c", "created_at": "2026-11-01T00:00:00Z"},
                            {"item_id": "fresh-2", "category": "c", "created_at": "2026-11-02T00:00:00Z"},
                            {"item_id": "fresh-3", "category": "d", "in_stock": False}])
    assert catalog.refresh(source) == 3
    assert source.asked == [0, 1, 1]
    assert source.handed == 4
    assert [m.item_id for m in catalog.fresh_items(5)] == ["fresh-2", "fresh-1"]  # newest first, in stock only
    assert [m.item_id for m in catalog.fresh_items(5, category="d")] == []
    source.store.put_items([{"item_id": "fresh-1", "price": 4.0}])
    catalog.refresh(source)
    meta = catalog.meta("fresh-1")
    assert meta is not None
    assert (meta.category, meta.price) == ("c", 4.0)  # a partial row keeps the other fields
    calls = len(source.asked)
    catalog.refresh(source, max_age_s=60.0)
    assert len(source.asked) == calls  # too soon: no round trip


def test_content_neighbours_rank_category_then_brand_then_price(bundle: Bundle) -> None:
    source, catalog = _CatalogRows(), Catalog(bundle)
    source.store.put_items([
        {"item_id": "anchor", "category": "kites", "brand": "acme", "price": 10.0},
        {"item_id": "same-all", "category": "kites", "brand": "acme", "price": 10.5},
        {"item_id": "far-price", "category": "kites", "brand": "acme", "price": 80.0},
        {"item_id": "other-brand", "category": "kites", "brand": "zeta", "price": 10.0},
        {"item_id": "other-category", "category": "boats", "brand": "acme", "price": 10.0},
        {"item_id": "sold-out", "category": "kites", "brand": "acme", "price": 10.0, "in_stock": False},
    ])
    catalog.refresh(source)
    found = catalog.content_neighbours("anchor", 4)
    assert [i for i, _ in found] == ["same-all", "far-price", "other-brand", "other-category"]
    assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
    assert catalog.content_neighbours("nobody-knows", 3) == []


def test_a_bundle_of_the_previous_schema_is_refused(trained: TrainResult, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(trained.bundle_path, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["schema_version"] = SCHEMA_VERSION - 1
    del manifest["files"]["bought_together.npz"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"schema version {SCHEMA_VERSION - 1} is not supported"):
        load_bundle(old)
