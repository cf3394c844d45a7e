"""Two worker processes behind one port: a reload reaches both, and /metrics counts for both."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import orjson
import pytest

from training.pipeline import TrainResult

pytest_plugins = ["tests.redis_fixture"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _renamed_copy(bundle: Path, out: Path, version: str) -> Path:
    """The same model under another version (the manifest is not among the checksummed files)."""
    shutil.copytree(bundle, out)
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    manifest["bundle_version"] = version
    (out / "manifest.json").write_bytes(orjson.dumps(manifest))
    return out


@pytest.fixture
def service(trained: TrainResult, redis_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = _free_port()
    env = {**os.environ, "SHAREFEED_REDIS_URL": redis_url, "SHAREFEED_REDIS_PREFIX": f"w{uuid.uuid4().hex[:8]}:",
           "SHAREFEED_EVENT_LOG": str(tmp_path / "log"), "SHAREFEED_RELOAD_POLL_SECONDS": "0.2"}
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "sharefeed.cli", "serve", "--bundle", str(trained.bundle_path), "--port", str(port),
         "--workers", "2"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"service did not start: {(tmp_path / 'serve.log').read_text()[-2000:]}")
        yield base, tmp_path
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _versions(base: str, calls: int) -> set[str]:
    with httpx.Client() as client:  # new connections land on either worker
        return {httpx.get(f"{base}/readyz", headers={"connection": "close"}).json()["bundle_version"]
                for _ in range(calls)} | {client.get(f"{base}/readyz").json()["bundle_version"]}


def _metric(text: str, name: str, labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(part in line for part in labels.split(",")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_reload_reaches_every_worker_and_metrics_add_up(service: tuple[str, Path], trained: TrainResult) -> None:
    base, tmp = service
    original = trained.manifest.bundle_version
    feeds = 40
    for k in range(feeds):
        answer = httpx.get(f"{base}/v1/users/u{k:06d}/feed", params={"n": 5}, headers={"connection": "close"})
        assert answer.status_code == 200
    metrics = httpx.get(f"{base}/metrics").text
    served = _metric(metrics, "sharefeed_request_seconds_count", 'endpoint="/v1/users/{user_id}/feed"')
    assert served == feeds  # both workers' requests, whichever worker answers /metrics
    pids = set(re.findall(r'sharefeed_bundle_info\{pid="(\d+)"', metrics))
    assert len(pids) == 2
    ranked = _metric(metrics, "sharefeed_candidates_ranked_count", "")
    assert 0 < ranked <= feeds  # personalized feeds report how many candidates the ranker scored

    renamed = _renamed_copy(trained.bundle_path, tmp / "next", "next-version")
    reloaded = httpx.post(f"{base}/v1/admin/reload", json={"bundle": str(renamed)})
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["previous_version"] == original
    time.sleep(1.0)  # the other worker follows the pointer within its poll interval
    assert _versions(base, 30) == {"next-version"}

    corrupt = _renamed_copy(trained.bundle_path, tmp / "corrupt", "corrupt-version")
    (corrupt / "item_factors.npy").write_bytes(b"not factors")
    refused = httpx.post(f"{base}/v1/admin/reload", json={"bundle": str(corrupt)})
    assert refused.status_code == 422
    assert "checksum" in refused.json()["detail"]
    time.sleep(0.6)
    assert _versions(base, 30) == {"next-version"}
    assert _metric(httpx.get(f"{base}/metrics").text, "sharefeed_reloads_total", 'outcome="refused"') == 1
