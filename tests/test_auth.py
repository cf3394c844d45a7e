"""Scoped API keys on every endpoint, key management, rate and size limits."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.auth import Scope, create_key, required_scope
from serving.settings import ServingSettings
from sharefeed.cli import main
from training.bundle import Bundle, load_bundle
from training.pipeline import TrainResult


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "keys.json"
    made = {scope.value: create_key(path, [scope], f"test {scope.value}")[1] for scope in Scope}
    return made | {"file": str(path)}


@pytest.fixture
def client(bundle: Bundle, keys: dict[str, str], tmp_path: Path) -> Iterator[TestClient]:
    settings = ServingSettings(keys_file=Path(keys["file"]), event_log=tmp_path / "log", max_body_bytes=64 * 1024)
    with TestClient(create_app(settings, bundle=bundle)) as test_client:
        yield test_client


def _routes(client: TestClient) -> list[tuple[str, str]]:
    """Every operation of the OpenAPI document (included routers too)."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path) for path, operations in paths.items() for method in operations]


def _call(client: TestClient, method: str, path: str, key: str | None) -> int:
    url = re.sub(r"\{[^}]+\}", "x1", path)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.request(method, url, headers=headers, json={}).status_code


def test_every_endpoint_asks_for_its_scope(client: TestClient, keys: dict[str, str]) -> None:
    routes = _routes(client)
    assert len(routes) >= 24
    for method, path in routes:
        needed = required_scope(method, path)
        if needed is None:
            assert _call(client, method, path, None) not in (401, 403), path
            continue
        assert _call(client, method, path, None) == 401, (method, path)
        assert _call(client, method, path, "sf_nope_nope") == 401, (method, path)
        for scope in Scope:
            status = _call(client, method, path, keys[scope.value])
            if scope in (needed, Scope.ADMIN):
                assert status not in (401, 403), (method, path, scope, status)
            else:
                assert status == 403, (method, path, scope, status)


def test_feed_with_the_right_key_answers(client: TestClient, keys: dict[str, str], bundle: Bundle) -> None:
    user = bundle.users.ids[0]
    answer = client.get(f"/v1/users/{user}/feed", headers={"Authorization": f"Bearer {keys['feed:read']}"})
    assert answer.status_code == 200
    assert answer.json()["items"]
    assert client.get("/healthz").status_code == 200


def test_bodies_over_the_limit_get_413(client: TestClient, keys: dict[str, str]) -> None:
    events = [{"user_id": "u", "item_id": "p", "event_type": "view", "timestamp": "2026-11-25T10:00:00Z"}] * 2000
    answer = client.post("/v1/events", json={"events": events},
                         headers={"Authorization": f"Bearer {keys['events:write']}"})
    assert answer.status_code == 413
    assert "bytes" in answer.json()["detail"]
    streamed = client.post("/v1/events", content=iter([b"x" * 1024] * 100),  # no Content-Length to go by
                           headers={"Authorization": f"Bearer {keys['events:write']}"})
    assert streamed.status_code == 413


def test_rate_limit_answers_429_per_key(bundle: Bundle, keys: dict[str, str], tmp_path: Path) -> None:
    settings = ServingSettings(keys_file=Path(keys["file"]), event_log=tmp_path / "log", rate_limit_per_second=5)
    with TestClient(create_app(settings, bundle=bundle)) as client:
        auth = {"Authorization": f"Bearer {keys['feed:read']}"}
        statuses = [client.get("/v1/trending", headers=auth).status_code for _ in range(12)]
        assert statuses.count(429) >= 1
        assert statuses[:5] == [200] * 5
        other = client.get("/v1/trending", headers={"Authorization": f"Bearer {keys['admin']}"})
        assert other.status_code == 200  # another key has its own budget


def test_keys_cli_prints_the_key_once_lists_and_revokes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        bundle: Bundle) -> None:
    path = tmp_path / "cli-keys.json"
    monkeypatch.setenv("SHAREFEED_KEYS_FILE", str(path))
    made = CliRunner().invoke(main, ["keys", "create", "--scope", "feed:read", "--name", "storefront"])
    assert made.exit_code == 0, made.output
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("sf_")
    assert key not in path.read_text()  # only the hash is stored
    key_id = key.split("_")[1]
    listed = CliRunner().invoke(main, ["keys", "list"])
    assert key_id in listed.stdout
    assert "active" in listed.stdout
    settings = ServingSettings(event_log=tmp_path / "log")
    with TestClient(create_app(settings, bundle=bundle)) as client:
        auth = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/trending", headers=auth).status_code == 200
        assert CliRunner().invoke(main, ["keys", "revoke", key_id]).exit_code == 0
        client.app.state.keys._checked = -10.0  # type: ignore[attr-defined]  # skip the once-a-second wait
        assert client.get("/v1/trending", headers=auth).status_code == 401
