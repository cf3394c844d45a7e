"""The item metadata the service uses: the bundle's snapshot overlaid with the store's catalog rows.

Prices, stock, categories and titles change between trainings; items appear that no model has seen yet
("new items"). `Catalog.refresh` pulls only the rows changed since the version it last applied, so it is
cheap to call often; arrays over the bundle's item indexes are updated in place, row by row.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import numpy as np
import pandas as pd

from features.repurchase import NO_CATEGORY
from training.bundle import Bundle

PRICE_BUCKET = 0.1  # content neighbours: prices within ~10% of each other count as equally near


class CatalogSource(Protocol):
    def items_since(self, version: int) -> tuple[int, list[dict[str, object]]]: ...


@dataclass(frozen=True, slots=True)
class ItemMeta:
    item_id: str
    category: str  # NO_CATEGORY when unknown
    brand: str | None
    title: str | None
    price: float | None
    in_stock: bool  # unknown stock counts as in stock (as in the bundle)
    created_at: float | None  # epoch seconds


def _text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return str(value)


def _price(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        price = float(str(value))
    except ValueError:
        return None
    return price if math.isfinite(price) else None


def _stock(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no")
    return value is not False and value != 0


def _epoch(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    try:  # NaT ("NaT", "") raises on timestamp(): missing, like an unparseable value
        stamp = pd.Timestamp(value if isinstance(value, datetime) else str(value))
        if stamp.tzinfo is None:
            stamp = stamp.tz_localize("UTC")
        return float(stamp.timestamp())
    except ValueError:
        return None


def _category(value: object) -> str:
    text = _text(value)
    return text if text else NO_CATEGORY


def _merged(base: ItemMeta, row: Mapping[str, object]) -> ItemMeta:
    return ItemMeta(
        base.item_id,
        _category(row["category"]) if "category" in row else base.category,
        _text(row["brand"]) if "brand" in row else base.brand,
        _text(row["title"]) if "title" in row else base.title,
        _price(row["price"]) if "price" in row else base.price,
        _stock(row["in_stock"]) if "in_stock" in row else base.in_stock,
        _epoch(row["created_at"]) if "created_at" in row else base.created_at,
    )


class Catalog:
    """Item metadata over the bundle's item indexes plus the items the bundle does not know.

    Readers may run concurrently with `refresh`: a reader sees each row either before or after a change.
    """

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        meta = bundle.item_meta
        self.ids = bundle.items.ids
        # copies: the overlay writes into these arrays, and pandas may hand out read-only views
        self.category: np.ndarray = np.array(meta["category"].fillna(NO_CATEGORY).to_numpy(dtype=object))
        self.brand: np.ndarray = np.asarray([_text(v) for v in meta["brand"].tolist()], dtype=object)
        self.title: np.ndarray = np.asarray([_text(v) for v in meta["title"].tolist()], dtype=object)
        self.price: np.ndarray = np.array(meta["price"].to_numpy(dtype=np.float64, na_value=np.nan))
        self.in_stock: np.ndarray = np.array((meta["in_stock"].fillna(True) != False).to_numpy(dtype=bool))  # noqa: E712
        created = meta["created_at"]
        seconds = created.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[ns]").astype("int64") / 1e9
        self.created_at: np.ndarray = np.where(created.isna().to_numpy(), np.nan, seconds.to_numpy(np.float64))
        self.version = 0  # the store's catalog version applied last
        self.new_items: dict[str, ItemMeta] = {}  # items the store knows and the bundle does not
        self._by_category: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._checked = -math.inf

    # -- reading -----------------------------------------------------------------------------------------
    def index_of(self, item_id: str) -> int | None:
        return self.bundle.items.index_of(item_id)

    def knows(self, item_id: str) -> bool:
        return item_id in self.bundle.items or item_id in self.new_items

    def meta(self, item_id: str) -> ItemMeta | None:
        idx = self.index_of(item_id)
        if idx is None:
            return self.new_items.get(item_id)
        price, created = float(self.price[idx]), float(self.created_at[idx])
        return ItemMeta(item_id, str(self.category[idx]), _text(self.brand[idx]), _text(self.title[idx]),
                        None if math.isnan(price) else price, bool(self.in_stock[idx]),
                        None if math.isnan(created) else created)

    def category_of(self, item_id: str) -> str | None:
        """The item's category (None when unknown): what merchandising rules and diversity match on."""
        meta = self.meta(item_id)
        return meta.category if meta is not None and meta.category != NO_CATEGORY else None

    def available(self, item_id: str) -> bool:
        """In stock, or not known to be out of it."""
        meta = self.meta(item_id)
        return meta is None or meta.in_stock

    def members(self, category: str) -> np.ndarray:
        """Bundle item indexes in `category` (as overlaid)."""
        groups = self._by_category
        if groups is None:
            indices = pd.Series(np.arange(len(self.category))).groupby(self.category).indices
            groups = {str(k): np.asarray(v, dtype=np.int64) for k, v in indices.items()}
            self._by_category = groups
        return groups.get(category, np.empty(0, dtype=np.int64))

    def fresh_items(self, n: int, category: str | None = None) -> list[ItemMeta]:
        """New items in stock, newest first (by created_at; unknown dates last), for a freshness boost."""
        chosen = [m for m in self.new_items.values() if m.in_stock and (category is None or m.category == category)]
        chosen.sort(key=lambda m: (-(m.created_at if m.created_at is not None else -math.inf), m.item_id))
        return chosen[: max(0, n)]

    def content_neighbours(self, item_id: str, n: int) -> list[tuple[str, float]]:
        """Items like one the model cannot place: same category, then same brand, then nearest price;
        new items before bundle items and newer before older on a tie. In stock only, best first, with a
        score in [0, 1] (0.5 category + 0.3 brand + 0.2 price closeness)."""
        anchor = self.meta(item_id)
        if anchor is None:
            return []
        fresh = [m for m in self.new_items.values() if m.item_id != item_id and m.in_stock]
        category = np.concatenate([self.category, np.asarray([m.category for m in fresh], dtype=object)])
        brand = np.concatenate([self.brand, np.asarray([m.brand for m in fresh], dtype=object)])
        price = np.concatenate([self.price, np.asarray([m.price if m.price is not None else np.nan for m in fresh])])
        created = np.concatenate(
            [self.created_at, np.asarray([m.created_at if m.created_at is not None else np.nan for m in fresh])]
        )
        is_new = np.concatenate([np.zeros(len(self.ids), dtype=bool), np.ones(len(fresh), dtype=bool)])
        ok = np.concatenate([self.in_stock, np.ones(len(fresh), dtype=bool)])
        own = self.index_of(item_id)
        if own is not None:
            ok[own] = False
        same_category = (category == anchor.category) & (anchor.category != NO_CATEGORY)
        same_brand = (brand == anchor.brand) & (anchor.brand is not None)
        if anchor.price is not None and anchor.price > 0:
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # 1e308 / 0.5: inf, no warning
                distance = np.abs(np.log(price / anchor.price))
            distance = np.where(np.isfinite(distance), distance, np.inf)
        else:
            distance = np.full(len(price), np.inf)
        bucket = np.where(np.isfinite(distance), np.floor(distance / PRICE_BUCKET), np.iinfo(np.int32).max)
        newest = np.where(np.isnan(created), -np.inf, created)
        rows = np.flatnonzero(ok)
        order = rows[np.lexsort((rows, -newest[rows], ~is_new[rows], bucket[rows], ~same_brand[rows],
                                 ~same_category[rows]))][: max(0, n)]
        score = 0.5 * same_category + 0.3 * same_brand + 0.2 * np.exp(-np.where(np.isfinite(distance), distance, 50.0))
        ids = [str(self.ids[i]) if i < len(self.ids) else fresh[i - len(self.ids)].item_id for i in order.tolist()]
        return list(zip(ids, score[order].astype(float).tolist(), strict=True))

    # -- refreshing --------------------------------------------------------------------------------------
    def refresh(self, store: CatalogSource, *, max_age_s: float = 0.0) -> int:
        """Apply the store's catalog rows changed since the last refresh; returns how many were applied.
        With `max_age_s`, skip the round trip when the last one is more recent than that."""
        now = time.monotonic()
        if now - self._checked < max_age_s:
            return 0
        with self._lock:
            self._checked = now
            version, rows = store.items_since(self.version)
            if version < self.version:  # the store lost its data and counts again from 0: read all it has
                version, rows = store.items_since(0)
            for row in rows:
                self._apply(row)
            self.version = version
            return len(rows)

    def _apply(self, row: Mapping[str, object]) -> None:
        item_id = str(row["item_id"])
        idx = self.index_of(item_id)
        if idx is None:
            base = self.new_items.get(item_id) or ItemMeta(item_id, NO_CATEGORY, None, None, None, True, None)
            self.new_items = {**self.new_items, item_id: _merged(base, row)}  # swapped whole: readers never wait
            return
        fields = self._fields(row)
        if "category" in fields and fields["category"] != self.category[idx]:
            self.category[idx] = fields["category"]
            self._by_category = None
        for name in ("brand", "title", "in_stock"):
            if name in fields:
                getattr(self, name)[idx] = fields[name]
        if "price" in fields:
            self.price[idx] = np.nan if fields["price"] is None else fields["price"]
        if "created_at" in fields:
            self.created_at[idx] = np.nan if fields["created_at"] is None else fields["created_at"]

    @staticmethod
    def _fields(row: Mapping[str, object]) -> dict[str, object]:
        parse = {"category": _category, "brand": _text, "title": _text, "price": _price, "in_stock": _stock,
                 "created_at": _epoch}
        return {name: parse[name](value) for name, value in row.items() if name in parse}
