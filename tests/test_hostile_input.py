"""Regressions from fuzzing the HTTP API (benchmarks/fuzz.py, issue #7): each input here once gave a 5xx or
was accepted as garbage. Each must now be a 4xx with its reason, or a row rejected with its reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from features.tables import read_file, records_table
from features.validation import check_events
from features.weights import DEFAULT_EVENT_WEIGHTS
from serving.app import create_app
from serving.settings import ServingSettings
from training.bundle import Bundle, load_bundle
from training.pipeline import TrainResult

EVENT_TYPES = tuple(DEFAULT_EVENT_WEIGHTS)
GOOD = '{"user_id": "u1", "item_id": "p1", "event_type": "view", "timestamp": "2026-11-25T10:00:00Z"}'


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


@pytest.fixture
def client(bundle: Bundle, tmp_path: Path) -> Iterator[TestClient]:
    settings = ServingSettings(event_log=tmp_path / "log", segments_dir=tmp_path / "segments")
    with TestClient(create_app(settings, bundle=bundle)) as test_client:  # a 500 raises here
        yield test_client


def _raw(client: TestClient, method: str, path: str, body: str) -> tuple[int, dict[str, object]]:
    answer = client.request(method, path, content=body.encode(), headers={"content-type": "application/json"})
    return answer.status_code, answer.json()


# A lone UTF-16 surrogate in a JSON string: Python's json module takes it, but it cannot be written as UTF-8
# (the event log, the pandas/arrow text of the ingest, a segment file, even the 422 that echoed it): 500s.
@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/events", '{"events": [{"user_id": "\\ud800x", "item_id": "p1", "event_type": "view", '
                           '"timestamp": "2026-11-25T10:00:00Z"}, ' + GOOD + "]}"),
    ("PUT", "/v1/segments/saved/top", '{"kind": "propensity", "category": "a\\udfffb"}'),
    ("PUT", "/v1/merchandising/rules/r1", '{"action": "boost", "item_ids": ["p1"], "note": "a\\udfffb"}'),
    ("POST", "/v1/admin/reload", '{"bundle": "\\ud800"}'),
    ("POST", "/v1/rank", '{"user_id": "\\udc00", "item_ids": ["p1"]}'),
])
def test_a_lone_surrogate_in_a_body_is_a_422_with_the_reason(client: TestClient, method: str, path: str,
                                                             body: str) -> None:
    status, answer = _raw(client, method, path, body)
    assert status == 422, answer
    assert "surrogate" in str(answer["detail"])


def test_a_surrogate_pair_is_text_like_any_other(client: TestClient) -> None:
    status, answer = _raw(client, "POST", "/v1/events",
                          '{"events": [{"user_id": "u\\ud83d\\ude00", "item_id": "p1", "event_type": "view", '
                          '"timestamp": "2026-11-25T10:00:00Z"}]}')
    assert (status, answer["accepted"], answer["rejected"]) == (200, 1, [])


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400])
def test_numbers_json_does_not_allow_or_a_double_cannot_hold_are_a_422(client: TestClient, value: str) -> None:
    status, answer = _raw(client, "POST", "/v1/events",
                          f'{{"events": [{GOOD[:-1]}, "price": {value}}}]}}')
    assert status == 422, answer
    assert answer["detail"][0]["type"] == "json_invalid"  # type: ignore[index]


def test_similar_items_of_an_extreme_price_do_not_overflow(client: TestClient) -> None:
    # content neighbours compare prices as log(price / anchor): 1e308 / 5e-324 overflowed (a warning, so a
    # 500 wherever warnings are errors)
    assert client.put("/v1/items/tiny", json={"category": "fuzz", "price": 5e-324}).status_code == 200
    assert client.put("/v1/items/huge", json={"category": "fuzz", "price": 1e308}).status_code == 200
    for item in ("tiny", "huge"):
        answer = client.get(f"/v1/items/{item}/similar", params={"n": 5})
        assert answer.status_code == 200, answer.text
        assert answer.json()["items"]


def test_reload_of_a_path_the_file_system_refuses_keeps_the_bundle(client: TestClient, bundle: Bundle) -> None:
    for path in ("x" * 5000, "a/" + "b" * 300):  # ENAMETOOLONG, for the whole path and for one part
        answer = client.post("/v1/admin/reload", json={"bundle": path})
        assert answer.status_code == 422, answer.text
        assert "still serving the previous one" in answer.json()["detail"]
        assert len(answer.json()["detail"]) < 600  # the path is not echoed whole
    assert client.get("/readyz").json()["bundle_version"] == bundle.version


# -- the loaders: a JSON object or array where the contract wants one value was accepted as its Python repr

def test_an_object_or_array_id_in_a_batch_is_rejected_and_the_rest_kept(client: TestClient) -> None:
    good = {"user_id": "u1", "item_id": "p1", "event_type": "view", "timestamp": "2026-11-25T10:00:00Z"}
    batch = [good | {"user_id": {"a": 1}}, good | {"item_id": [1, 2]}, good | {"price": {"amount": 3}}, good]
    answer = client.post("/v1/events", json={"events": batch}).json()
    assert answer["accepted"] == 1
    assert answer["rejected"] == [
        {"index": 0, "reason": "user_id is an object, not a single value"},
        {"index": 1, "reason": "item_id is an array, not a single value"},
        {"index": 2, "reason": "price is an object, not a single value"},
    ]


def test_an_object_id_in_a_jsonl_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(GOOD + "\n" + GOOD.replace('"u1"', '{"nested": "u1"}') + "\n")
    check = check_events(read_file(path), EVENT_TYPES)
    assert len(check.accepted) == 1
    assert check.rejects[["row", "reason"]].to_dict("records") == [
        {"row": 2, "reason": "user_id is an object, not a single value"}]


def test_a_record_with_a_lone_surrogate_is_rejected_not_a_crash() -> None:
    # what a Python caller (or a lenient parser) can hand to the ingest path: it used to raise UnicodeEncodeError
    good = {"user_id": "u1", "item_id": "p1", "event_type": "view", "timestamp": "2026-11-25T10:00:00Z"}
    frame = records_table([good | {"user_id": "\ud800"}, good | {"\udfff": "x"}, good], "request")
    check = check_events(frame, EVENT_TYPES)
    assert check.accepted["user_id"].tolist() == ["u1"]
    assert check.rejects["row"].tolist() == [0, 1]
    assert check.rejects["reason"].str.contains("not valid Unicode text").all()
