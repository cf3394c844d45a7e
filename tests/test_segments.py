"""Audience segments through the ASGI app: every kind, filters, pagination, exports, saved definitions,
and the rule that an erased or opted-out user is in no segment and no export."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from features.ledger import ControlLedger
from features.online import MemoryStore
from features.propensity import PropensityContext
from features.rfm import GROUP_CODES, LifecycleGroup, compute_rfm
from serving.privacy import Privacy
from serving.recommender import Recommender
from serving.segment_routes import segments_router
from serving.segment_service import PARQUET_METADATA_KEY
from serving.segment_social import ReachGraph
from serving.segments import take_allowed
from serving.settings import ServingSettings
from training.bundle import Bundle, load_bundle
from training.pipeline import TrainResult


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


def _app(bundle: Bundle, store: MemoryStore, directory: Path, ttl: float = 3600.0) -> FastAPI:
    app = FastAPI()
    app.include_router(segments_router(ServingSettings(segments_dir=directory, segment_ttl_seconds=ttl)))
    app.state.recommender = Recommender(bundle)
    app.state.privacy = Privacy(ControlLedger(directory / "log"), store)
    return app


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def client(bundle: Bundle, store: MemoryStore, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(_app(bundle, store, tmp_path / "segments")) as test_client:
        yield test_client


def _query(client: TestClient, definition: dict[str, Any], page_size: int = 100) -> dict[str, Any]:
    response = client.post("/v1/segments/query", json={"definition": definition, "page_size": page_size})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _top_category(bundle: Bundle) -> str:
    counts = pd.Series(np.asarray(bundle.state.item_buyers)).groupby(np.asarray(bundle.state.item_category)).sum()
    return bundle.manifest.categories[int(counts.drop(-1, errors="ignore").idxmax())]


def _all_ids(client: TestClient, segment_id: str, limit: int = 37) -> list[str]:
    ids: list[str] = []
    cursor: str | None = ""
    while cursor is not None:
        page = client.get(f"/v1/segments/{segment_id}", params={"cursor": cursor, "limit": limit}).json()
        ids += [m["user_id"] for m in page["items"]]
        cursor = page["next_cursor"]
    return ids


def test_propensity_category_ranks_by_score_and_keeps_it(client: TestClient, bundle: Bundle) -> None:
    category = _top_category(bundle)
    body = _query(client, {"kind": "propensity", "category": category, "size": 50})
    assert body["size"] == 50
    assert len(body["items"]) == 50
    scores = [m["score"] for m in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # the score is the bundle's propensity model (tests/test_propensity.py): its probability for each member
    items = np.flatnonzero(np.asarray(bundle.state.item_category) == bundle.manifest.categories.index(category))
    context = PropensityContext(bundle.state, bundle.user_factors, bundle.item_factors)
    model = bundle.manifest.propensity["category"]
    full = model.probability(context.features(context.target(items), np.arange(len(bundle.users))))
    assert scores[0] == pytest.approx(float(full.max()), rel=1e-5)
    expected = {bundle.users.id_of(int(u)) for u in np.argsort(-full)[:45]}
    assert expected <= {m["user_id"] for m in body["items"]}


def test_propensity_item_and_brand_and_exclude_buyers(client: TestClient, bundle: Bundle) -> None:
    item = bundle.items.id_of(int(np.argmax(bundle.state.item_buyers)))
    all_users = _query(client, {"kind": "propensity", "item_id": item, "size": 400}, page_size=0)
    without = _query(client, {"kind": "propensity", "item_id": item, "size": 400,
                              "filters": {"exclude_current_buyers": True}}, page_size=0)
    idx = bundle.items.index_of(item)
    buyers = {bundle.users.id_of(int(u)) for u in bundle.state.pair_purchases.tocsc()[:, idx].nonzero()[0]}
    assert buyers
    assert set(_all_ids(client, all_users["segment_id"])) & buyers
    assert not set(_all_ids(client, without["segment_id"])) & buyers
    brand = bundle.manifest.brands[0]
    assert _query(client, {"kind": "propensity", "brand": brand, "size": 5})["size"] == 5


def test_pagination_walks_the_snapshot_once(client: TestClient, bundle: Bundle) -> None:
    body = _query(client, {"kind": "propensity", "category": _top_category(bundle), "size": 120}, page_size=10)
    ids = _all_ids(client, body["segment_id"], limit=13)
    assert len(ids) == len(set(ids)) == 120
    assert ids[:10] == [m["user_id"] for m in body["items"]]


def test_lookalike_excludes_seeds_and_prefers_neighbours(client: TestClient, bundle: Bundle) -> None:
    vectors = bundle.user_factors / np.linalg.norm(bundle.user_factors, axis=1, keepdims=True).clip(1e-9)
    seed = 0
    seeds = [bundle.users.id_of(seed)]
    body = _query(client, {"kind": "lookalike", "seed_user_ids": seeds, "size": 20})
    ids = [m["user_id"] for m in body["items"]]
    assert seeds[0] not in ids
    nearest = np.argsort(-(vectors @ vectors[seed]), kind="stable")[1:21]
    assert ids[0] == bundle.users.id_of(int(nearest[0]))
    assert body["items"][0]["score"] == pytest.approx(float(vectors[nearest[0]] @ vectors[seed]), rel=1e-4)
    # seeded from another segment, by score threshold instead of a count
    sharers = _query(client, {"kind": "social", "signal": "top_sharers", "size": 10})
    threshold = _query(client, {"kind": "lookalike", "seed_segment_id": sharers["segment_id"], "method": "max",
                                "size": None, "min_score": 0.9}, page_size=1000)
    members = [m["user_id"] for m in threshold["items"]]
    assert members
    assert min(m["score"] for m in threshold["items"]) >= 0.9
    assert not set(members) & {m["user_id"] for m in sharers["items"]}


def test_lifecycle_groups_follow_the_documented_rules(client: TestClient, bundle: Bundle) -> None:
    rfm = compute_rfm(bundle.state)
    assert ((rfm.group >= 0) == (bundle.state.user_baskets > 0)).all()
    body = _query(client, {"kind": "lifecycle", "groups": ["champions", "loyal"], "size": 10_000}, page_size=0)
    ids = _all_ids(client, body["segment_id"], limit=500)
    expected = np.isin(rfm.group, [GROUP_CODES[LifecycleGroup.CHAMPIONS], GROUP_CODES[LifecycleGroup.LOYAL]])
    assert len(ids) == int(expected.sum()) > 0
    for user_id in ids:
        idx = bundle.users.index_of(user_id)
        assert idx is not None
        assert rfm.f[idx] >= 4
        assert rfm.r[idx] >= 3


def test_social_kinds(client: TestClient, bundle: Bundle) -> None:
    shares = bundle.state.user_type_counts[:, 3]
    body = _query(client, {"kind": "social", "signal": "top_sharers", "size": 5})
    assert body["items"][0]["score"] == float(shares.max())
    influencers = _query(client, {"kind": "social", "signal": "influencers", "size": 5})
    table = bundle.user_influence
    best = table.loc[table["conversions"] > 0, "influence"].idxmax()
    assert influencers["items"][0]["user_id"] == best
    assert influencers["items"][0]["score"] == pytest.approx(float(table.loc[best, "influence"]), rel=1e-5)
    item = int(np.argmax(bundle.state.item_buyers))
    friends = _query(client, {"kind": "social", "signal": "friends_of_buyers", "item_id": bundle.items.id_of(item),
                              "size": 50})
    buyers = set(bundle.state.pair_purchases.tocsc()[:, item].nonzero()[0].tolist())
    members = [bundle.users.index_of(m["user_id"]) for m in friends["items"]]
    assert friends["size"] > 0
    assert not set(members) & buyers
    graph = bundle.social_graph
    reached_by_buyers = {int(v) for b in buyers for v in graph.reach(b)[0]}
    assert set(members) <= reached_by_buyers
    member = friends["items"][0]["user_id"]
    community = _query(client, {"kind": "social", "signal": "community", "user_id": member, "size": 1000})
    assert member in {m["user_id"] for m in community["items"]}


def test_label_propagation_finds_two_cliques() -> None:
    import scipy.sparse as sp

    edges = [(a, b) for a in range(4) for b in range(4) if a != b] + [
        (a, b) for a in range(4, 8) for b in range(4, 8) if a != b] + [(3, 4)]
    rows, cols = zip(*edges, strict=True)
    labels = ReachGraph(sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(8, 8))).communities()
    assert len(set(labels[:4])) == 1
    assert len(set(labels[4:])) == 1
    assert labels[0] != labels[7]


def test_filters_active_and_categories(client: TestClient, bundle: Bundle) -> None:
    category = _top_category(bundle)
    body = _query(client, {"kind": "lifecycle", "size": 10_000,
                           "filters": {"active_days": 3, "never_bought_categories": [category]}}, page_size=0)
    code = bundle.manifest.categories.index(category)
    bought = bundle.state.pair_purchases.tocsr()
    since = bundle.state.cutoff_seconds - 3 * 86_400
    for user_id in _all_ids(client, body["segment_id"], limit=500):
        idx = bundle.users.index_of(user_id)
        assert idx is not None
        assert bundle.state.user_last_seen[idx] >= since
        assert not (np.asarray(bundle.state.item_category)[bought[idx].indices] == code).any()
    bought_body = _query(client, {"kind": "propensity", "item_id": bundle.items.id_of(0), "size": 30,
                                  "filters": {"bought_categories": [category]}})
    for member in bought_body["items"]:
        idx = bundle.users.index_of(member["user_id"])
        assert idx is not None
        assert (np.asarray(bundle.state.item_category)[bought[idx].indices] == code).any()


def test_erased_and_opted_out_users_appear_nowhere(client: TestClient, bundle: Bundle, store: MemoryStore) -> None:
    category = _top_category(bundle)
    definition = {"kind": "propensity", "category": category, "size": 40}
    before = _query(client, definition)
    erased, opted_out, late = (m["user_id"] for m in before["items"][:3])
    store.erase_user(erased)
    store.set_consent(opted_out, {"marketing": False})
    after = _query(client, definition)
    ids = [m["user_id"] for m in after["items"]]
    assert len(ids) == 40
    assert erased not in ids
    assert opted_out not in ids
    sharers = _query(client, {"kind": "lifecycle", "size": 100_000}, page_size=0)
    assert not {erased, opted_out} & set(_all_ids(client, sharers["segment_id"], limit=1000))
    # erased after the snapshot was taken: gone from its pages and both exports too
    store.erase_user(late)
    assert late not in _all_ids(client, after["segment_id"])
    for fmt in ("csv", "parquet"):
        exported = client.get(f"/v1/segments/{after['segment_id']}/export", params={"format": fmt})
        frame = (pd.read_csv(io.BytesIO(exported.content), comment="#", dtype={"user_id": str}) if fmt == "csv"
                 else pd.read_parquet(io.BytesIO(exported.content)))
        assert not {erased, opted_out, late} & set(frame["user_id"])
        assert len(frame) == 39


def _every_kind(bundle: Bundle) -> dict[str, dict[str, Any]]:
    """One definition of each kind and signal (EVERY_KIND), on this bundle's data."""
    item = bundle.items.id_of(int(np.argmax(bundle.state.item_buyers)))
    sharer = bundle.users.id_of(int(np.argmax(bundle.state.user_type_counts[:, 3])))
    return {
        "propensity category": {"kind": "propensity", "category": _top_category(bundle), "size": 30},
        "propensity item": {"kind": "propensity", "item_id": item, "size": 30},
        "propensity brand": {"kind": "propensity", "brand": bundle.manifest.brands[0], "size": 30},
        "lookalike": {"kind": "lookalike", "seed_user_ids": [bundle.users.id_of(0)], "size": 30},
        "lifecycle": {"kind": "lifecycle", "size": 30},
        "top sharers": {"kind": "social", "signal": "top_sharers", "size": 30},
        "influencers": {"kind": "social", "signal": "influencers", "size": 30},
        "friends of buyers": {"kind": "social", "signal": "friends_of_buyers", "item_id": item, "size": 30},
        "community": {"kind": "social", "signal": "community", "user_id": sharer, "size": 30},
    }


EVERY_KIND = ("propensity category", "propensity item", "propensity brand", "lookalike", "lifecycle", "top sharers",
              "influencers", "friends of buyers", "community")


@pytest.mark.parametrize("name", EVERY_KIND)
def test_an_erased_member_leaves_every_kind_of_segment(client: TestClient, bundle: Bundle, store: MemoryStore,
                                                       name: str) -> None:
    definition = _every_kind(bundle)[name]
    before = _query(client, definition)
    anchors = {definition.get("user_id"), *definition.get("seed_user_ids", [])}
    erased = next(m["user_id"] for m in before["items"] if m["user_id"] not in anchors)
    store.erase_user(erased)
    after = _query(client, definition)
    assert after["items"], "the segment still has members"
    assert erased not in _all_ids(client, after["segment_id"])
    exported = client.get(f"/v1/segments/{after['segment_id']}/export", params={"format": "csv"})
    frame = pd.read_csv(io.BytesIO(exported.content), comment="#", dtype={"user_id": str})
    assert len(frame) > 0
    assert erased not in set(frame["user_id"])
    # and from the snapshot taken before the erasure
    assert erased not in _all_ids(client, before["segment_id"])


def test_exports_carry_ids_scores_and_definition_only(client: TestClient, bundle: Bundle) -> None:
    definition = {"kind": "propensity", "category": _top_category(bundle), "size": 150}
    body = _query(client, definition)
    csv = client.get(f"/v1/segments/{body['segment_id']}/export", params={"format": "csv"})
    assert csv.status_code == 200
    assert csv.headers["content-type"].startswith("text/csv")
    first_line, _, rest = csv.content.partition(b"\n")
    header = json.loads(first_line[2:])
    assert header["definition"]["category"] == definition["category"]
    assert header["segment_id"] == body["segment_id"]
    frame = pd.read_csv(io.BytesIO(rest), dtype={"user_id": str})
    assert list(frame.columns) == ["user_id", "score"]
    assert len(frame) == 150
    assert frame["user_id"].head(100).tolist() == [m["user_id"] for m in body["items"]]
    parquet = client.get(f"/v1/segments/{body['segment_id']}/export", params={"format": "parquet"})
    table = pq.read_table(io.BytesIO(parquet.content))
    assert table.column_names == ["user_id", "score"]
    assert table.num_rows == 150
    info = json.loads(table.schema.metadata[PARQUET_METADATA_KEY])
    assert info["definition"]["kind"] == "propensity"
    assert np.allclose(table.column("score").to_numpy(), frame["score"].to_numpy(), rtol=1e-5)


def test_saved_definitions_make_a_new_snapshot_each_run(client: TestClient, bundle: Bundle,
                                                        store: MemoryStore) -> None:
    definition = {"kind": "social", "signal": "top_sharers", "size": 10}
    saved = client.put("/v1/segments/saved/sharers", json=definition)
    assert saved.status_code == 200
    assert saved.json()["definition"]["signal"] == "top_sharers"
    listed = client.get("/v1/segments/saved").json()
    assert [s["name"] for s in listed["segments"]] == ["sharers"]
    first = client.post("/v1/segments/saved/sharers/run").json()
    store.erase_user(first["items"][0]["user_id"])
    second = client.post("/v1/segments/saved/sharers/run", json={"page_size": 5}).json()
    assert second["segment_id"] != first["segment_id"]
    assert second["saved_name"] == "sharers"
    assert first["items"][0]["user_id"] not in {m["user_id"] for m in second["items"]}
    assert len(second["items"]) == 5
    assert client.post("/v1/segments/saved/nope/run").status_code == 404


@pytest.mark.parametrize(("definition", "status", "fragment"), [
    ({"kind": "propensity", "size": 10}, 422, "exactly one of item_id"),
    ({"kind": "propensity", "category": "no-such-category"}, 422, "unknown category"),
    ({"kind": "propensity", "item_id": "no-such-item"}, 422, "unknown item"),
    ({"kind": "lookalike", "seed_user_ids": ["nobody"]}, 422, "none of the seed users"),
    ({"kind": "lookalike", "seed_segment_id": "0" * 32}, 404, "not found"),
    ({"kind": "lifecycle", "filters": {"attributes": {"region": "north"}}}, 422, "users table"),
    ({"kind": "lifecycle", "filters": {"exclude_current_buyers": True}}, 422, "needs a target"),
    ({"kind": "social", "signal": "friends_of_buyers"}, 422, "needs item_id"),
    ({"kind": "lifecycle", "size": None}, 422, "size, a min_score"),
    ({"kind": "lifecycle", "colour": "red"}, 422, "colour"),
    ({"kind": "nope"}, 422, "kind"),
])
def test_bad_queries_are_clear_4xx(client: TestClient, definition: dict[str, Any], status: int,
                                   fragment: str) -> None:
    response = client.post("/v1/segments/query", json={"definition": definition})
    assert response.status_code == status
    assert fragment in json.dumps(response.json())


def test_unknown_segment_bad_cursor_and_expiry(bundle: Bundle, store: MemoryStore, tmp_path: Path) -> None:
    with TestClient(_app(bundle, store, tmp_path / "s", ttl=3600)) as client:
        body = _query(client, {"kind": "social", "signal": "top_sharers", "size": 3})
        assert client.get(f"/v1/segments/{body['segment_id']}", params={"cursor": "x1"}).status_code == 400
        assert client.get("/v1/segments/" + "f" * 32).status_code == 404
        assert client.get("/v1/segments/../../etc/export").status_code == 404
    with TestClient(_app(bundle, store, tmp_path / "t", ttl=1e-6)) as client:
        body = _query(client, {"kind": "social", "signal": "top_sharers", "size": 3})
        assert client.get(f"/v1/segments/{body['segment_id']}").status_code == 404
        assert client.get(f"/v1/segments/{body['segment_id']}/export").status_code == 404


def test_cli_segment_honours_the_event_logs_erasures(bundle: Bundle, trained: TrainResult, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from click.testing import CliRunner

    from features.eventlog import EventLog, consent_row, erase_row
    from sharefeed.cli import main

    log_dir = tmp_path / "log"
    monkeypatch.setenv("SHAREFEED_EVENT_LOG", str(log_dir))
    monkeypatch.delenv("SHAREFEED_REDIS_URL", raising=False)
    args = ["segment", "--bundle", str(trained.bundle_path), "--kind", "propensity", "--category",
            _top_category(bundle), "--top", "25"]
    first = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a.csv")])
    assert first.exit_code == 0, first.output
    before = pd.read_csv(tmp_path / "a.csv", comment="#", dtype={"user_id": str})
    assert len(before) == 25
    log = EventLog(log_dir)
    log.append([erase_row(before["user_id"][0], time.time()),
                consent_row(before["user_id"][1], {"marketing": False}, time.time())])
    log.close()
    second = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b.parquet")])
    assert second.exit_code == 0, second.output
    after = pd.read_parquet(tmp_path / "b.parquet")
    assert len(after) == 25
    assert not set(before["user_id"][:2]) & set(after["user_id"])
    bad = CliRunner().invoke(main, ["segment", "--bundle", str(trained.bundle_path), "--kind", "social",
                                    "--out", str(tmp_path / "c.csv")])
    assert bad.exit_code == 2


def test_every_export_is_in_the_audit_log_without_a_row_of_it(client: TestClient, tmp_path: Path) -> None:
    from serving import audit
    from serving.settings import ServingSettings

    settings = ServingSettings()
    made = client.post("/v1/segments/query", json={"definition": {"kind": "lifecycle"}, "page_size": 5})
    assert made.status_code == 200, made.text
    segment_id = made.json()["segment_id"]
    exported = client.get(f"/v1/segments/{segment_id}/export", params={"format": "csv"})
    assert exported.status_code == 200
    rows = len(exported.text.strip().splitlines()) - 2  # the definition line and the header
    entries = audit.read(settings.audit_log)
    assert entries[-1]["segment_id"] == segment_id
    assert entries[-1]["rows"] == rows
    assert entries[-1]["complete"] is True
    assert entries[-1]["who"] == "open-mode"
    assert entries[-1]["definition"]["kind"] == "lifecycle"
    first_member = exported.text.strip().splitlines()[2].split(",")[0].strip('"')
    assert first_member not in settings.audit_log.read_text()


def test_the_audit_names_the_key_never_its_secret(bundle: Bundle, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from serving import audit
    from serving.app import create_app
    from serving.auth import Scope, create_key

    keys_file = tmp_path / "keys.json"
    entry, key = create_key(keys_file, [Scope.SEGMENTS_READ], "crm export job")
    settings = ServingSettings(keys_file=keys_file, event_log=tmp_path / "log", segments_dir=tmp_path / "segments",
                               audit_log=tmp_path / "audit.jsonl")
    started = datetime.now(UTC)
    with TestClient(create_app(settings, bundle=bundle)) as client:
        auth = {"Authorization": f"Bearer {key}"}
        made = client.post("/v1/segments/query", json={"definition": {"kind": "lifecycle", "size": 30}}, headers=auth)
        exported = client.get(f"/v1/segments/{made.json()['segment_id']}/export", params={"format": "parquet"},
                              headers=auth)
        assert exported.status_code == 200
    (entry_out,) = audit.read(settings.audit_log)
    assert entry_out["who"] == entry.id
    assert entry_out["key_name"] == "crm export job"
    assert started <= datetime.fromisoformat(entry_out["at"]) <= datetime.now(UTC)
    assert entry_out["definition"]["size"] == 30
    assert entry_out["rows"] == len(pd.read_parquet(io.BytesIO(exported.content))) == 30
    assert entry_out["complete"] is True
    text = settings.audit_log.read_text()
    assert key.split("_", 2)[2] not in text
    assert entry.hash not in text


def test_an_export_cut_off_is_audited_as_incomplete(bundle: Bundle, store: MemoryStore, tmp_path: Path) -> None:
    from serving.privacy import Privacy
    from serving.segment_service import Segments
    from serving.segment_snapshots import ROW_GROUP, SnapshotStore
    from serving.segments import SegmentEngine

    segments = Segments(SegmentEngine(bundle), SnapshotStore(tmp_path / "s", 3600),
                        Privacy(ControlLedger(tmp_path / "log"), store))
    meta = segments.snapshots.create(np.resize(bundle.users.ids, ROW_GROUP + 10),  # two row groups
                                     np.ones(ROW_GROUP + 10, dtype=np.float32), {"kind": "lifecycle"}, bundle.version)
    ended: list[tuple[int, bool]] = []
    stream = segments.export(meta.segment_id, "csv", lambda _, rows, complete: ended.append((rows, complete)))
    next(stream)  # the definition line
    next(stream)  # the first row group
    stream.close()  # the client went away
    assert ended == [(ROW_GROUP, False)]


def test_a_larger_fetch_that_reorders_near_ties_checks_and_keeps_each_user_once(tmp_path: Path) -> None:
    """`take_allowed` fetches more when privacy drops members; the larger fetch may order near-ties the other
    way round (float32 rounding differs with the rows scored together): nobody is kept twice or skipped."""
    ids = np.asarray([f"u{k}" for k in range(400)], dtype=object)
    store = MemoryStore()
    for k in range(0, 400, 2):
        store.set_consent(f"u{k}", {"marketing": False})  # every other user opted out: a refetch is needed

    def fetch(n: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.arange(min(n, 400))
        if n > 280:  # the first fetch holds 280; the larger one swaps a near-tie across that end
            order[[279, 281]] = order[[281, 279]]
        return order, np.linspace(1.0, 0.5, len(order)).astype(np.float32)

    members = take_allowed(fetch, 150, ids, Privacy(ControlLedger(tmp_path / "log"), store), ["marketing"])
    chosen = members.user_idx.tolist()
    assert len(chosen) == len(set(chosen)) == 150
    assert all(k % 2 == 1 for k in chosen)
    assert 281 in chosen  # the user the swap moved before the first fetch's end is still checked
