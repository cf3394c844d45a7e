"""Request and response bodies of the HTTP API (v1)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeedItemOut(_Body):
    item_id: str
    score: float
    source: str
    reason: str | None = None


class FeedOut(_Body):
    request_id: str
    bundle_version: str
    user_id: str
    personalized: bool
    step: str | None  # which step of the fallback chain answered first
    items: list[FeedItemOut]


class HealthOut(_Body):
    status: str
    bundle_version: str | None = None
