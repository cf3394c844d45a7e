"""Request and response bodies of the HTTP API (v1)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SocialOut(_Body):
    friends_bought: int  # people this shopper follows or is friends with who bought the item
    friend_ids: list[str] | None = None  # named only where the deployment allows it


class FeedItemOut(_Body):
    item_id: str
    score: float
    source: str
    reason: str | None = None
    social: SocialOut | None = None


class FeedOut(_Body):
    request_id: str
    bundle_version: str
    user_id: str
    personalized: bool
    step: str | None  # which step of the fallback chain answered first
    degraded: bool = False  # the online store did not answer: events since training were not used
    items: list[FeedItemOut]


class RankIn(_Body):
    user_id: str = Field(min_length=1, max_length=256)
    item_ids: list[str] = Field(min_length=1, max_length=1000)
    explain: bool = False


class RankOut(_Body):
    request_id: str
    bundle_version: str
    user_id: str
    personalized: bool
    items: list[FeedItemOut]  # every item asked about, best first; items the model lacks come last


class EventsIn(_Body):
    # Rows stay loose here: each is validated on its own so one bad row cannot refuse the batch.
    events: list[dict[str, Any]] = Field(min_length=1)


class RowRejected(_Body):
    index: int  # position in the posted batch
    reason: str


class EventsOut(_Body):
    request_id: str
    accepted: int
    duplicates: int
    rejected: list[RowRejected]
    online_updated: bool  # False: durably logged, the online state catches up on replay


class ConsentIn(_Body):
    personalization: bool | None = None
    marketing: bool | None = None
    social_proof: bool | None = None


class ConsentOut(_Body):
    request_id: str
    user_id: str
    personalization: bool
    marketing: bool
    social_proof: bool


class ErasedOut(_Body):
    request_id: str
    user_id: str
    erased: bool


class ReloadIn(_Body):
    bundle: str | None = None  # a bundle directory; default: reread the one being served


class ReloadOut(_Body):
    request_id: str
    bundle_version: str
    previous_version: str | None
    bundle: str


class HealthOut(_Body):
    status: str
    bundle_version: str | None = None
