"""HTTP routes about items: similar, bought together, trending; catalog upserts; merchandising rules.

Handlers parse, call one domain function (`serving.related.ItemLists`, the store) and map the result.
They read `app.state.recommender` (its `.bundle`) and `app.state.store` (the online store); the item
lists for a bundle are built on first use and kept on `app.state.item_lists`.
"""

import logging
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import ValidationError

from features.online import STORE_ERRORS
from features.store import OnlineStore
from serving import metrics
from serving.bodies import StrictJSONRoute
from serving.catalog import Catalog
from serving.deps import RequestId
from serving.item_schemas import (
    CatalogBatchIn,
    CatalogFields,
    CatalogItemIn,
    CatalogWriteOut,
    ItemListOut,
    ItemOut,
    RowError,
    RuleDeletedOut,
    RuleOut,
    RulesOut,
)
from serving.merchandising import Rule, RuleBook, RuleSpec
from serving.related import ItemLists, ListItem, UnknownItemError, item_lists_for
from serving.settings import ServingSettings
from training.bundle import Bundle

CATALOG_MAX_AGE_S = 1.0  # how stale the catalog overlay may be on a read (writes refresh it at once)
log = logging.getLogger(__name__)


def _bundle(request: Request) -> Bundle:
    recommender = getattr(request.app.state, "recommender", None)
    if recommender is None:
        raise HTTPException(status_code=503, detail="no model bundle is loaded")
    bundle: Bundle = recommender.bundle
    return bundle


def _store(request: Request) -> OnlineStore | None:
    store: OnlineStore | None = getattr(request.app.state, "store", None)
    return store


def _writable_store(store: Annotated[OnlineStore | None, Depends(_store)]) -> OnlineStore:
    if store is None:
        raise HTTPException(status_code=503, detail="no online store is configured")
    return store


BundleDep = Annotated[Bundle, Depends(_bundle)]
StoreDep = Annotated[OnlineStore | None, Depends(_store)]
WritableStore = Annotated[OnlineStore, Depends(_writable_store)]
ItemIdPath = Annotated[str, Path(min_length=1, max_length=256)]
RuleIdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


def _lists(request: Request, bundle: BundleDep, store: StoreDep) -> ItemLists:
    """The item lists of the served bundle, with the catalog overlay at most CATALOG_MAX_AGE_S old."""
    shared = getattr(request.app.state, "catalog", None)
    catalog = shared if isinstance(shared, Catalog) and shared.bundle is bundle else None
    lists = item_lists_for(request.app.state, bundle, catalog)
    if store is not None:
        try:
            lists.catalog.refresh(store, max_age_s=CATALOG_MAX_AGE_S)
        except STORE_ERRORS:  # lists from the catalog as last read
            log.warning("online store unavailable: catalog changes as last read", exc_info=True)
    return lists


ListsDep = Annotated[ItemLists, Depends(_lists)]


def _out(items: Sequence[ListItem]) -> list[ItemOut]:
    return [ItemOut(item_id=i.item_id, score=i.score, source=i.source.value) for i in items]


def _unknown(exc: UnknownItemError) -> HTTPException:
    return HTTPException(status_code=404, detail=f"unknown item {exc.item_id!r}: not in the model or the catalog")


def items_router(settings: ServingSettings) -> APIRouter:
    """The item routes; `settings.max_n` bounds every list."""
    router = APIRouter(tags=["items"], route_class=StrictJSONRoute)
    N = Annotated[int, Query(ge=1, le=settings.max_n)]

    @router.get("/v1/items/{item_id}/similar", response_model=ItemListOut, response_model_exclude_none=True)
    def similar(item_id: ItemIdPath, lists: ListsDep, request_id: RequestId, n: N = 20) -> ItemListOut:
        try:
            items = lists.similar(item_id, n)
        except UnknownItemError as exc:
            raise _unknown(exc) from exc
        return ItemListOut(request_id=request_id, bundle_version=lists.version, item_id=item_id, items=_out(items))

    @router.get("/v1/items/{item_id}/bought-together", response_model=ItemListOut,
                response_model_exclude_none=True)
    def bought_together(item_id: ItemIdPath, lists: ListsDep, request_id: RequestId, n: N = 10) -> ItemListOut:
        try:
            items = lists.bought_together(item_id, n)
        except UnknownItemError as exc:
            raise _unknown(exc) from exc
        return ItemListOut(request_id=request_id, bundle_version=lists.version, item_id=item_id, items=_out(items))

    @router.get("/v1/trending", response_model=ItemListOut, response_model_exclude_none=True)
    def trending(lists: ListsDep, store: StoreDep, request_id: RequestId, n: N = 20,
                 category: Annotated[str | None, Query(max_length=256)] = None) -> ItemListOut:
        degraded = None
        try:
            items = lists.trending(store, n, category)
        except STORE_ERRORS:  # the last hours' events are in the store: the bundle's trending alone
            log.warning("online store unavailable: trending from the bundle", exc_info=True)
            metrics.DEGRADED.labels(endpoint="trending").inc()
            items, degraded = lists.trending(None, n, category), True
        return ItemListOut(request_id=request_id, bundle_version=lists.version, category=category, items=_out(items),
                           degraded=degraded)

    @router.put("/v1/items/{item_id}", response_model=CatalogWriteOut)
    def put_item(item_id: ItemIdPath, body: CatalogFields, lists: ListsDep, store: WritableStore,
                 request_id: RequestId) -> CatalogWriteOut:
        version = store.put_items([{"item_id": item_id, **body.model_dump(mode="json", exclude_unset=True)}])
        lists.catalog.refresh(store)
        return CatalogWriteOut(request_id=request_id, bundle_version=lists.version, accepted=1,
                               catalog_version=version)

    @router.post("/v1/items", response_model=CatalogWriteOut)
    def post_items(body: CatalogBatchIn, lists: ListsDep, store: WritableStore,
                   request_id: RequestId) -> CatalogWriteOut:
        rows, rejected = [], []
        for index, raw in enumerate(body.items):
            try:
                rows.append(CatalogItemIn.model_validate(raw).model_dump(mode="json", exclude_unset=True))
            except ValidationError as exc:
                rejected.append(RowError(index=index, item_id=_row_id(raw), reason=_reason(exc)))
        version = store.put_items(rows) if rows else lists.catalog.version
        lists.catalog.refresh(store)
        return CatalogWriteOut(request_id=request_id, bundle_version=lists.version, accepted=len(rows),
                               rejected=rejected, catalog_version=version)

    @router.get("/v1/merchandising/rules", response_model=RulesOut)
    def list_rules(bundle: BundleDep, store: WritableStore, request_id: RequestId) -> RulesOut:
        book = RuleBook()
        rules = book.refresh(store)
        return RulesOut(request_id=request_id, bundle_version=bundle.version, rules_version=book.version,
                        rules=list(rules), invalid=book.invalid)

    @router.get("/v1/merchandising/rules/{rule_id}", response_model=RuleOut)
    def get_rule(rule_id: RuleIdPath, bundle: BundleDep, store: WritableStore, request_id: RequestId) -> RuleOut:
        book = RuleBook()
        found = [rule for rule in book.refresh(store) if rule.id == rule_id]
        if not found:
            detail = f"unknown rule {rule_id!r}" if rule_id not in book.invalid else \
                f"rule {rule_id!r} is stored but invalid: {'; '.join(book.invalid[rule_id])}"
            raise HTTPException(status_code=404, detail=detail)
        return RuleOut(request_id=request_id, bundle_version=bundle.version, rules_version=book.version,
                       rule=found[0])

    @router.put("/v1/merchandising/rules/{rule_id}", response_model=RuleOut)
    def put_rule(rule_id: RuleIdPath, body: RuleSpec, bundle: BundleDep, store: WritableStore,
                 request_id: RequestId) -> RuleOut:
        rule = Rule.model_validate({**body.model_dump(), "id": rule_id})
        version = store.put_rule(rule_id, body.model_dump(mode="json", exclude_none=True))
        return RuleOut(request_id=request_id, bundle_version=bundle.version, rules_version=version, rule=rule)

    @router.delete("/v1/merchandising/rules/{rule_id}", response_model=RuleDeletedOut)
    def delete_rule(rule_id: RuleIdPath, bundle: BundleDep, store: WritableStore,
                    request_id: RequestId) -> RuleDeletedOut:
        if not store.delete_rule(rule_id):
            raise HTTPException(status_code=404, detail=f"unknown rule {rule_id!r}")
        return RuleDeletedOut(request_id=request_id, bundle_version=bundle.version, rule_id=rule_id, deleted=True)

    return router


def _row_id(raw: dict[str, object]) -> str | None:
    item_id = raw.get("item_id")
    return item_id if isinstance(item_id, str) else None


def _reason(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
    return "; ".join(parts)
