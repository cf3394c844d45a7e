"""Deployment settings of the HTTP service: which bundle, where to listen, where events and online state
live. No model hyperparameters: everything about the model comes from the bundle."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from features.store import CLAIM_TAKEOVER_SECONDS


def _default_event_log() -> Path:
    return Path.home() / ".sharefeed" / "eventlog"


def default_keys_file() -> Path:
    return Path.home() / ".sharefeed" / "keys.json"


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHAREFEED_", extra="ignore")

    bundle: Path | None = None
    model_alias: str | None = None  # or serve what an MLflow registered-model alias names (resolved by the CLI)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)  # more than one needs a shared online store (redis_url)
    max_n: int = Field(200, ge=1)  # the largest feed a caller may ask for
    max_batch: int = Field(1000, ge=1)  # events per POST /v1/events
    redis_url: str | None = None  # the online store; None keeps it in process (one worker only)
    redis_prefix: str = "sf:"
    event_log: Path = Field(default_factory=_default_event_log)  # the durable log `train --data` reads
    reload_poll_seconds: float = Field(1.0, gt=0)  # how often a worker checks which bundle to serve
    overlay_refresh_seconds: float = Field(1.0, ge=0)  # how soon catalog changes and rules reach a worker
    segments_dir: Path = Field(default_factory=lambda: Path.home() / ".sharefeed" / "segments")  # snapshots and
    # saved segment definitions, shared by every worker
    audit_log: Path = Field(default_factory=lambda: Path.home() / ".sharefeed" / "audit.jsonl")  # every export
    control_refresh_seconds: float = Field(1.0, ge=0)  # how soon another worker's consent change or erasure is
    # read from the event log (this worker's own count at once)
    erasure_retention_hours: float = Field(24.0, gt=0)  # an erased user's events leave the log within this
    compaction_interval_seconds: float = Field(3600.0, ge=0)  # how often the service compacts (0: never, use
    # `sharefeed compact` from cron)
    segment_ttl_seconds: float = Field(7 * 86_400.0, gt=0)  # how long a segment snapshot is kept
    social_proof_names: bool = False  # name the friends behind "friends bought this" (else counts only)
    keys_file: Path = Field(default_factory=default_keys_file)  # API keys (hashes and scopes); none: open
    api_keys: str | None = None  # or the same JSON inline (SHAREFEED_API_KEYS)
    rate_limit_per_second: int = Field(0, ge=0)  # requests per key and second (0: no limit)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # larger request bodies get 413
    max_per_category: int | None = Field(None, ge=1)  # diversity: at most this many items of a category ...
    diversity_window: int = Field(10, ge=1)  # ... among the first this many of a feed
    # The online store through outages (serving.recovery): how often a worker checks it, how far back an
    # emptied store is rebuilt from the event log (the 90 days a quiet user's online state lives), and how
    # many events a worker keeps for it before it falls back to reading the outage back from the log.
    recovery_poll_seconds: float = Field(1.0, gt=0)
    recovery_window_seconds: float = Field(90 * 86_400.0, gt=0)
    recovery_backlog_events: int = Field(100_000, ge=0)
    # An event id claimed (pending) by a request that has not logged it this long is taken over by a retry:
    # its process died between the claim and the log append. Far longer than an fsync'ed append takes.
    claim_takeover_seconds: float = Field(CLAIM_TAKEOVER_SECONDS, gt=0)
