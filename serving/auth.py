"""API keys with scopes: who may call what.

A key is shown once when created (`sharefeed keys create`) and stored only as a SHA-256 hash, in a JSON file
(`SHAREFEED_KEYS_FILE`) or in `SHAREFEED_API_KEYS` (the same JSON). A key reads `sf_<id>_<secret>`: the id
finds the entry, the secret's hash is compared in constant time. Keys travel as `Authorization: Bearer <key>`;
no key is 401, a key without the endpoint's scope is 403. With no key configured at all the service runs
open (development) and says so at start.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import orjson
from pydantic import BaseModel, ConfigDict, Field


class Scope(StrEnum):
    FEED_READ = "feed:read"
    EVENTS_WRITE = "events:write"
    SEGMENTS_READ = "segments:read"
    ADMIN = "admin"


# Each route template and method -> the scope it needs. A route missing here needs `admin` (safe default);
# PUBLIC routes need no key.
PUBLIC = frozenset({("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/docs"),
                    ("GET", "/openapi.json"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc")})
ROUTE_SCOPES: dict[tuple[str, str], Scope] = {
    ("GET", "/v1/users/{user_id}/feed"): Scope.FEED_READ,
    ("POST", "/v1/rank"): Scope.FEED_READ,
    ("GET", "/v1/items/{item_id}/similar"): Scope.FEED_READ,
    ("GET", "/v1/items/{item_id}/bought-together"): Scope.FEED_READ,
    ("GET", "/v1/trending"): Scope.FEED_READ,
    ("GET", "/v1/users/{user_id}/share-suggestions"): Scope.FEED_READ,
    ("POST", "/v1/events"): Scope.EVENTS_WRITE,
    ("PUT", "/v1/users/{user_id}/consent"): Scope.EVENTS_WRITE,
    ("POST", "/v1/segments/query"): Scope.SEGMENTS_READ,
    ("GET", "/v1/segments/{segment_id}"): Scope.SEGMENTS_READ,
    ("GET", "/v1/segments/{segment_id}/export"): Scope.SEGMENTS_READ,
    ("GET", "/v1/segments/saved"): Scope.SEGMENTS_READ,
    ("PUT", "/v1/segments/saved/{name}"): Scope.SEGMENTS_READ,
    ("POST", "/v1/segments/saved/{name}/run"): Scope.SEGMENTS_READ,
}
PREFIX = "sf"


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    name: str = ""
    hash: str  # sha256 hex of the secret part
    scopes: list[Scope] = Field(min_length=1)
    created_at: datetime
    revoked: bool = False


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyEntry] = Field(default_factory=list)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyRing:
    """The configured keys; `check` answers who a presented key is (None when it is not a valid key)."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        self._by_id = {entry.id: entry for entry in entries if not entry.revoked}
        self.configured = bool(entries)

    @classmethod
    def load(cls, path: Path | None, inline: str | None) -> KeyRing:
        entries: list[KeyEntry] = []
        if inline:
            entries += KeyFile.model_validate_json(inline).keys
        if path is not None and path.is_file():
            entries += KeyFile.model_validate_json(path.read_bytes()).keys
        return cls(entries)

    def check(self, presented: str) -> KeyEntry | None:
        parts = presented.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX:
            return None
        entry = self._by_id.get(parts[1])
        if entry is None:
            hmac.compare_digest(_digest(parts[2]), _digest(""))  # same work whether or not the id exists
            return None
        return entry if hmac.compare_digest(_digest(parts[2]), entry.hash) else None


class Keys:
    """The key ring of a running service, reread when the key file changes (checked at most once a second),
    so a created or revoked key takes effect without a restart."""

    def __init__(self, path: Path | None, inline: str | None) -> None:
        self._path, self._inline = path, inline
        self._stamp: float | None = None
        self._checked = 0.0
        self.ring = KeyRing.load(path, inline)
        self._stamp = self._mtime()

    def _mtime(self) -> float | None:
        try:
            return self._path.stat().st_mtime if self._path is not None else None
        except FileNotFoundError:
            return None

    def current(self) -> KeyRing:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            stamp = self._mtime()
            if stamp != self._stamp:
                self.ring, self._stamp = KeyRing.load(self._path, self._inline), stamp
        return self.ring


def required_scope(method: str, route: str) -> Scope | None:
    """The scope a route needs; None for public routes."""
    if (method, route) in PUBLIC or (method == "HEAD" and ("GET", route) in PUBLIC):
        return None
    return ROUTE_SCOPES.get((method, route), Scope.ADMIN)


# -- managing the key file (the `sharefeed keys` commands) -------------------------------------------------

def _read(path: Path) -> KeyFile:
    return KeyFile.model_validate_json(path.read_bytes()) if path.is_file() else KeyFile()


def _write(path: Path, keys: KeyFile) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(orjson.dumps(keys.model_dump(mode="json"), option=orjson.OPT_INDENT_2))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def create_key(path: Path, scopes: list[Scope], name: str = "") -> tuple[KeyEntry, str]:
    """A new key: its entry (stored, hashed) and the key itself (shown once, never stored)."""
    keys = _read(path)
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    entry = KeyEntry(id=key_id, name=name, hash=_digest(secret), scopes=sorted(set(scopes)),
                     created_at=datetime.now(UTC))
    keys.keys.append(entry)
    _write(path, keys)
    return entry, f"{PREFIX}_{key_id}_{secret}"


def list_keys(path: Path) -> list[KeyEntry]:
    return _read(path).keys


def revoke_key(path: Path, key_id: str) -> bool:
    keys = _read(path)
    found = False
    for entry in keys.keys:
        if entry.id == key_id and not entry.revoked:
            entry.revoked = found = True
    if found:
        _write(path, keys)
    return found
