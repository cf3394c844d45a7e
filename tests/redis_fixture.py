"""A real Redis server for the tests: SHAREFEED_REDIS_URL when set, else a private redis-server.

The private server runs on a free port in a temporary directory with persistence off, for the session.
Use it with `pytest_plugins = ["tests.redis_fixture"]` or by importing `redis_url` into a test module;
`redis_prefix` gives each test its own key prefix so tests never see each other's keys.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REDIS_SERVER = "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=0.2) as client:
                if client.ping():
                    return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer within 10 s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("SHAREFEED_REDIS_URL")
    if configured:
        yield configured
        return
    binary = REDIS_SERVER if os.path.exists(REDIS_SERVER) else shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary and SHAREFEED_REDIS_URL is not set")
    workdir = tmp_path_factory.mktemp("redis")
    port = _free_port()
    log = workdir / "redis.log"
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
         "--appendonly", "no", "--logfile", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_until_up(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    return f"sft:{uuid.uuid4().hex[:10]}:"
