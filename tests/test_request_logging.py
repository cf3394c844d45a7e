"""Logs hold no raw request bodies: a marker string sent in the bodies of every write endpoint — as ids, as
values that get a row rejected, in malformed JSON, in an oversized body — reaches no log record, at DEBUG,
uvicorn's loggers included, on a real uvicorn server. Responses may echo a rejected value; logs may not."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import orjson
import pytest
import uvicorn

from serving.app import create_app
from serving.settings import ServingSettings
from training.bundle import Bundle, load_bundle
from training.pipeline import TrainResult

MARK = f"SENTINEL{uuid.uuid4().hex}"
LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "fastapi", "starlette", "serving",
           "features")
MAX_BODY = 64 * 1024


def _bodies(item_id: str, user_id: str) -> dict[tuple[str, str], list[object]]:
    """Per write endpoint, bodies carrying the marker where that endpoint reads content (objects are JSON)."""
    return {
        ("POST", "/v1/events"): [{"events": [
            {"user_id": MARK, "item_id": item_id, "event_type": "view", "timestamp": "2026-01-05T10:00:00Z"},
            {"user_id": user_id, "item_id": MARK, "event_type": "purchase", "timestamp": "2026-01-05T10:00:00Z",
             "target_user_id": MARK, "referrer_id": MARK, "session_id": MARK, "request_id": MARK},
            {"user_id": user_id, "item_id": item_id, "event_type": MARK, "timestamp": "2026-01-05T10:00:00Z"},
            {"user_id": user_id, "item_id": item_id, "event_type": "view", "timestamp": MARK},
            {"user_id": user_id, "item_id": item_id, "event_type": "view", "timestamp": "2026-01-05T10:00:00Z",
             "price": MARK, MARK: MARK},
        ]}],
        ("PUT", "/v1/users/{user_id}/consent"): [{"marketing": False, MARK: True}, {"marketing": MARK},
                                                 {"marketing": False}],
        ("DELETE", "/v1/users/{user_id}"): [{"reason": MARK}],
        ("POST", "/v1/rank"): [{"user_id": MARK, "item_ids": [MARK, item_id], "explain": True},
                               {"user_id": user_id, "item_ids": [MARK]}],
        ("POST", "/v1/admin/reload"): [{"bundle": f"/nowhere/{MARK}"}],
        ("PUT", "/v1/items/{item_id}"): [{"title": MARK, "category": MARK, "brand": MARK},
                                         {"title": MARK, "price": MARK}],
        ("POST", "/v1/items"): [{"items": [{"item_id": MARK, "title": MARK}, {"item_id": 5, "title": MARK},
                                           {"item_id": MARK, "price": MARK}]}],
        ("PUT", "/v1/merchandising/rules/{rule_id}"): [
            {"action": "boost", "item_ids": [MARK], "note": MARK},
            {"action": "pin", "item_ids": [MARK], "note": MARK},  # no position: refused with a reason
            {"action": MARK}],
        ("DELETE", "/v1/merchandising/rules/{rule_id}"): [{"note": MARK}],
        ("POST", "/v1/segments/query"): [
            {"definition": {"kind": "propensity", "category": MARK}},
            {"definition": {"kind": "propensity", "item_id": MARK}},
            {"definition": {"kind": "lookalike", "seed_user_ids": [MARK]}},
            {"definition": {"kind": "lookalike", "seed_segment_id": MARK[:32]}},
            {"definition": {"kind": "social", "signal": "community", "user_id": MARK}},
            {"definition": {"kind": MARK}},
            {"definition": {"kind": "lifecycle", "size": 5, "filters": {"attributes": {MARK: MARK}}}}],
        ("PUT", "/v1/segments/saved/{name}"): [{"kind": "propensity", "item_id": MARK}, {"kind": MARK}],
        ("POST", "/v1/segments/saved/{name}/run"): [{"page_size": MARK}, {"page_size": 3}],
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


@pytest.fixture
def served(bundle: Bundle, tmp_path: Path, caplog: pytest.LogCaptureFixture,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name in LOGGERS:  # whatever an earlier uvicorn set up: every record reaches caplog, at DEBUG
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
        caplog.set_level(logging.DEBUG, logger=name)
    settings = ServingSettings(event_log=tmp_path / "log", segments_dir=tmp_path / "segments",
                               max_body_bytes=MAX_BODY)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, bundle=bundle), host="127.0.0.1", port=port,
                                           log_level="debug", log_config=None, access_log=True))
    thread = threading.Thread(target=server.run, name="uvicorn-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _record_text(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text += logging.Formatter().formatException(record.exc_info)
    return text + (record.stack_info or "")


def test_no_request_body_reaches_a_log(served: str, bundle: Bundle, caplog: pytest.LogCaptureFixture) -> None:
    item_id, user_id = bundle.items.ids[0], bundle.users.ids[0]
    bodies = _bodies(item_id, user_id)
    with httpx.Client(base_url=served, timeout=30) as client:
        openapi = client.get("/openapi.json").json()
        writes = {(method.upper(), path) for path, operations in openapi["paths"].items()
                  for method in operations if method in ("post", "put", "patch", "delete")}
        assert writes == set(bodies), "a write endpoint without marker bodies in this test"
        statuses: list[int] = []
        for (method, template), payloads in sorted(bodies.items()):
            url = re.sub(r"\{[^}]+\}", "x1", template)
            contents = [orjson.dumps(p) for p in payloads]
            contents += [b'{"events": [{"user_id": "' + MARK.encode() + b'", ',  # malformed JSON
                         b'{"x": "' + MARK.encode() * (MAX_BODY // len(MARK) + 1) + b'"}']  # over the size limit
            for content in contents:
                response = client.request(method, url, content=content,  # a new connection each: a 500 ends one
                                          headers={"content-type": "application/json", "connection": "close"})
                statuses.append(response.status_code)
        chunked = client.post("/v1/events", content=iter([MARK.encode()] * (MAX_BODY // len(MARK) + 1)),
                              headers={"content-type": "application/json"})  # no Content-Length: counted as read
        assert chunked.status_code == 413
        rejected = client.post("/v1/events", json=bodies[("POST", "/v1/events")][0]).json()
        assert any(MARK in r["reason"] for r in rejected["rejected"])  # the response may echo what it refused
    assert statuses.count(413) == len(bodies)
    assert 200 in statuses
    assert 422 in statuses
    access = [r for r in caplog.records if r.name == "uvicorn.access"]
    assert len(access) >= len(statuses)  # the capture sees uvicorn's records
    leaked = [f"{r.name}: {_record_text(r)[:200]}" for r in caplog.records if MARK in _record_text(r)]
    assert not leaked
