"""Request and response bodies of the item endpoints: item lists, catalog upserts, merchandising rules."""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from serving.merchandising import Rule

MAX_CATALOG_BATCH = 1000  # rows per POST /v1/items
ItemIdField = Field(min_length=1, max_length=256)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ItemOut(_Body):
    item_id: str
    score: float
    source: str  # similar, content, bought_together, similar_in_category, trending_live, trending, popular


class ItemListOut(_Body):
    request_id: str
    bundle_version: str
    item_id: str | None = None  # the item the list is about (similar, bought together)
    category: str | None = None
    items: list[ItemOut]
    degraded: bool | None = None  # true: the online store did not answer, the list comes from the bundle alone


class CatalogFields(_Body):
    """Fields of a catalog row; only the fields given replace the stored ones (null clears a field)."""

    category: str | None = Field(None, max_length=256)
    brand: str | None = Field(None, max_length=256)
    title: str | None = Field(None, max_length=1000)
    price: float | None = Field(None, ge=0, allow_inf_nan=False)
    in_stock: bool | None = None
    created_at: AwareDatetime | None = None


class CatalogItemIn(CatalogFields):
    item_id: str = ItemIdField


class CatalogBatchIn(_Body):
    # rows are validated one by one, so one bad row is reported without failing the rest
    items: list[dict[str, object]] = Field(min_length=1, max_length=MAX_CATALOG_BATCH)


class RowError(_Body):
    index: int
    item_id: str | None
    reason: str


class CatalogWriteOut(_Body):
    request_id: str
    bundle_version: str
    accepted: int
    rejected: list[RowError] = []
    catalog_version: int


class RuleOut(_Body):
    request_id: str
    bundle_version: str
    rules_version: int
    rule: Rule


class RulesOut(_Body):
    request_id: str
    bundle_version: str
    rules_version: int
    rules: list[Rule]
    invalid: dict[str, list[str]] = {}  # stored rules that no longer validate, and why


class RuleDeletedOut(_Body):
    request_id: str
    bundle_version: str
    rule_id: str
    deleted: bool
