"""Bodies of the segment API: a segment definition (one of four kinds, plus filters) and the answers.

A definition is what a saved segment stores and what every snapshot and export carries, so it is a strict
model (`extra="forbid"`): a misspelt field is a 422, never a silently different audience.
"""

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from features.rfm import LifecycleGroup

MAX_SEGMENT_SIZE = 5_000_000
MAX_PAGE = 10_000
MAX_SEEDS = 100_000
MAX_MAX_SEEDS = 1_000  # seeds searched one by one when `method` is "max"
Id = Annotated[str, Field(min_length=1, max_length=256)]
SegmentName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Filters(_Strict):
    """Conditions every member must meet; all given ones apply. Marketing consent and erasure are always
    checked, whatever is given here."""

    attributes: dict[str, str] | None = None  # users-table columns (region, ...): refused when the bundle has none
    active_days: int | None = Field(None, ge=1, le=3650)  # an event in the last N days before the bundle's now
    bought_categories: list[Id] | None = None  # bought in at least one of these
    never_bought_categories: list[Id] | None = None  # bought in none of these
    exclude_current_buyers: bool = False  # propensity: drop users who already bought the target
    consent: list[Literal["personalization", "marketing", "social_proof"]] | None = None  # further purposes


class _Kind(_Strict):
    size: int | None = Field(1000, ge=1, le=MAX_SEGMENT_SIZE)  # top N; None with min_score: every user above it
    min_score: float | None = None
    filters: Filters = Filters()

    @model_validator(mode="after")
    def _bounded(self) -> "_Kind":
        if self.size is None and self.min_score is None:
            raise ValueError("give a size, a min_score, or both")
        return self


class PropensityQuery(_Kind):
    """Users most likely to buy an item, any item of a category, or any item of a brand."""

    kind: Literal["propensity"]
    item_id: Id | None = None
    category: Id | None = None
    brand: Id | None = None

    @model_validator(mode="after")
    def _one_target(self) -> "PropensityQuery":
        if sum(v is not None for v in (self.item_id, self.category, self.brand)) != 1:
            raise ValueError("give exactly one of item_id, category, brand")
        return self


class LookalikeQuery(_Kind):
    """Users most like the seeds (cosine over user vectors); seeds are never members."""

    kind: Literal["lookalike"]
    seed_user_ids: list[Id] | None = Field(None, max_length=MAX_SEEDS)
    seed_segment_id: Id | None = None
    method: Literal["centroid", "max"] = "centroid"  # similarity to the seeds' mean, or to the closest seed

    @model_validator(mode="after")
    def _one_seed_source(self) -> "LookalikeQuery":
        if (self.seed_user_ids is None) == (self.seed_segment_id is None):
            raise ValueError("give exactly one of seed_user_ids, seed_segment_id")
        if self.seed_user_ids is not None and not self.seed_user_ids:
            raise ValueError("seed_user_ids is empty")
        return self


class LifecycleQuery(_Kind):
    """Buyers by RFM score, optionally only some lifecycle groups (features.rfm documents the rules)."""

    kind: Literal["lifecycle"]
    groups: list[LifecycleGroup] | None = None


class SocialQuery(_Kind):
    """Social segments: top sharers, influencers by attributed conversions, friends of an item's buyers,
    the community of a user."""

    kind: Literal["social"]
    signal: Literal["top_sharers", "influencers", "friends_of_buyers", "community"]
    item_id: Id | None = None  # friends_of_buyers
    user_id: Id | None = None  # community: a member

    @model_validator(mode="after")
    def _needs(self) -> "SocialQuery":
        if self.signal == "friends_of_buyers" and self.item_id is None:
            raise ValueError("friends_of_buyers needs item_id")
        if self.signal == "community" and self.user_id is None:
            raise ValueError("community needs user_id")
        return self


SegmentDefinition = Annotated[
    PropensityQuery | LookalikeQuery | LifecycleQuery | SocialQuery, Field(discriminator="kind")
]


class QueryIn(_Strict):
    definition: SegmentDefinition
    page_size: int = Field(100, ge=0, le=MAX_PAGE)


class RunIn(_Strict):
    page_size: int = Field(100, ge=0, le=MAX_PAGE)


class MemberOut(_Strict):
    user_id: str
    score: float


class PageOut(_Strict):
    request_id: str
    segment_id: str
    size: int  # members when the snapshot was taken
    items: list[MemberOut]
    next_cursor: str | None  # pass as ?cursor= for the next page; None at the end


class SnapshotOut(PageOut):
    bundle_version: str
    created_at: datetime
    expires_at: datetime
    definition: SegmentDefinition
    saved_name: str | None = None


class SavedOut(_Strict):
    name: str
    definition: SegmentDefinition
    updated_at: datetime


class SavedListOut(_Strict):
    request_id: str
    segments: list[SavedOut]
