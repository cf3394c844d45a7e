"""A deterministic synthetic social-commerce data set in the input data contract, for `sharefeed demo-data`.

It owns the catalog (categories, brands, prices, popularity, new arrivals, trend bursts), the day-by-day
simulation of sessions, funnels, shares, referrals, social proof and repeat purchases, and the files it
writes: events, items, users, social, plus truth.json with what was planted, so evaluations can check it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.schema import EVENT_COLUMNS, ITEM_COLUMNS, EventType, Table
from features.synthetic_social import (
    DAY_MS,
    F64,
    I64,
    TRUST,
    Population,
    Role,
    VisitKind,
    Visits,
    build_population,
    distinct,
    draw_categories,
    numbered,
    spread_word,
    tabulate_people,
    take_ids,
    time_of_day_ms,
    timestamps,
)

# Readable category names, alternating: consumables are rebought at intervals, durables are bought once.
_CONSUMABLES = ("snacks", "skincare", "coffee", "pet_food", "beauty", "baby", "household", "drinks", "vitamins", "tea")
_DURABLES = ("electronics", "decor", "fashion", "toys", "sports", "books", "kitchen", "furniture", "jewelry", "garden")
_TYPES = (EventType.VIEW, EventType.ADD_TO_CART, EventType.PURCHASE, EventType.SHARE, EventType.LIKE, EventType.REFUND)
VIEW, CART, BUY, SHARE, LIKE, REFUND = range(len(_TYPES))
_EVENTS_PER_SESSION = 4.0  # views, funnel steps, likes, shares and the visits they cause, per session
_MAX_WAVES = 12  # consequences landing on the same day are simulated that day, up to this many rounds
_WRITE_ROWS = 250_000  # events are converted to strings and written in slices to keep memory modest


class DemoDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    users: Annotated[int, Field(ge=10)] = 5_000
    items: Annotated[int, Field(ge=1)] = 2_000
    categories: Annotated[int, Field(ge=1)] = 20
    days: Annotated[int, Field(ge=1)] = 60
    events_per_user_day: Annotated[float, Field(gt=0)] = 0.6  # activity intensity: about this many events/user/day
    influencers: Annotated[int, Field(ge=0)] = 0  # 0 means automatic: about 1% of users
    decoys: Annotated[int, Field(ge=0)] = 0  # 0 means automatic: about 1% of users (many friends, no conversions)
    seed: int = 7
    start: datetime = datetime(2026, 9, 1, tzinfo=UTC)

    @field_validator("start")
    @classmethod
    def _start_is_utc(cls, start: datetime) -> datetime:
        if start.tzinfo is None:
            raise ValueError("start needs a time zone")
        return start.astimezone(UTC)

    @model_validator(mode="after")
    def _fits(self) -> DemoDataConfig:
        if self.items < self.categories:
            raise ValueError("items must be at least categories: every category needs an item")
        if self.influencer_count + self.decoy_count > self.users // 2:
            raise ValueError("influencers and decoys must stay a minority of users")
        return self

    @property
    def influencer_count(self) -> int:
        return self.influencers or max(1, round(self.users * 0.01))

    @property
    def decoy_count(self) -> int:
        return self.decoys or max(1, round(self.users * 0.01))


@dataclass(frozen=True, slots=True)
class DemoDataSummary:
    events: int
    users: int
    items: int
    social_edges: int
    shares: int
    referred_purchases: int
    out_dir: Path


@dataclass(frozen=True, slots=True)
class _Catalog:
    names: list[str]  # per category
    consumable: NDArray[np.bool_]  # per category
    rebuy_days: F64  # per category: typical days until a consumable runs out
    cat: I64  # per item from here on
    brand: I64
    price: F64
    rel_log_price: F64  # log price minus the category's median log price
    popularity: F64  # Zipf within each category
    quality: F64  # in (0, 1): raises conversion
    created_ms: I64
    available_day: I64  # first window day the item can be seen (the day after it was created)
    order: I64  # items sorted by category, the head of each category first
    bounds: I64  # category c occupies order[bounds[c]:bounds[c + 1]]
    trend_item: I64
    trend_start: F64
    trend_days: F64
    trend_strength: F64


def _build_catalog(rng: np.random.Generator, cfg: DemoDataConfig, start_ms: int) -> _Catalog:
    n, C = cfg.items, cfg.categories
    named = 2 * min(len(_CONSUMABLES), len(_DURABLES))
    names = [(_DURABLES, _CONSUMABLES)[c % 2 == 0][c // 2] if c < named else f"c{c:02d}" for c in range(C)]
    consumable = np.array([c % 2 == 0 if c < named else c % 3 == 0 for c in range(C)])
    cat = np.concatenate([np.arange(C), rng.choice(C, n - C, p=rng.dirichlet(np.full(C, 3.0)))])
    rng.shuffle(cat)
    order = np.lexsort((rng.random(n), cat))
    bounds = np.searchsorted(cat[order], np.arange(C + 1))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - bounds[cat[order]]
    # Brands carry quality across their items; popularity is a long tail within each category.
    n_brands = np.maximum(2, np.sqrt(np.bincount(cat, minlength=C)).astype(np.int64))
    brand_first = np.cumsum(n_brands) - n_brands
    brand = brand_first[cat] + (rng.random(n) * n_brands[cat]).astype(np.int64)
    brand_q = rng.normal(0.0, 0.5, int(n_brands.sum()))
    popularity = (rank + 1.0) ** -1.0 * np.exp(0.5 * brand_q[brand] + rng.normal(0.0, 0.3, n))
    quality = 1.0 / (1.0 + np.exp(-(brand_q[brand] + rng.normal(0.0, 0.8, n))))
    median = np.where(consumable, rng.lognormal(np.log(12), 0.4, C), rng.lognormal(np.log(60), 0.6, C))
    rel_log_price = rng.normal(0.0, 0.45, n)
    price = np.round(median[cat] * np.exp(rel_log_price), 2) + 0.0
    # A quarter of the catalog arrives during the window; each category's head item is always there.
    created_day = np.where(rng.random(n) < 0.25, rng.uniform(0, cfg.days - 1, n), -rng.uniform(1, 365, n))
    created_day[rank == 0] = -rng.uniform(1, 365, C)
    available_day = np.maximum(0, np.floor(created_day) + 1).astype(np.int64)
    # Trends lift items from the tail, not the head that is popular anyway.
    trend_item = rng.choice(np.flatnonzero(rank > 0), min(max(2, n // 150), n - C), replace=False)
    n_trend = len(trend_item)
    trend_start = np.maximum(rng.uniform(0, max(0, cfg.days - 3), n_trend), available_day[trend_item])
    keep = trend_start < cfg.days - 2
    return _Catalog(
        names=names,
        consumable=consumable,
        rebuy_days=np.where(consumable, rng.uniform(6, 20, C), np.nan),
        cat=cat,
        brand=brand,
        price=price,
        rel_log_price=rel_log_price,
        popularity=popularity,
        quality=quality,
        created_ms=(start_ms + created_day * DAY_MS).astype(np.int64),
        available_day=available_day,
        order=order,
        bounds=bounds,
        trend_item=trend_item[keep],
        trend_start=trend_start[keep],
        trend_days=rng.uniform(2, 6, n_trend)[keep],
        trend_strength=rng.uniform(2, 6, n_trend)[keep],
    )


def _weigh_items(cat: _Catalog, day: int) -> F64:
    """Today's chance of being looked at: popularity, a freshness boost for new arrivals, trend bursts."""
    age = day - cat.available_day
    new = cat.available_day > 0
    w: F64 = cat.popularity * (age >= 0) * np.where(new, 1.0 + 4.0 * np.exp(-np.maximum(age, 0) / 6.0), 1.0)
    phase = (day + 0.5 - cat.trend_start) / cat.trend_days
    burst = np.where((phase > 0) & (phase < 1), np.sin(np.pi * np.clip(phase, 0, 1)), 0.0)
    head = cat.popularity[cat.order[cat.bounds[:-1]]]  # a burst lifts an item to the top of its category
    np.add.at(w, cat.trend_item, cat.trend_strength * head[cat.cat[cat.trend_item]] * burst)
    return w


# Compact dtypes: millions of events are held until they are sorted and written.
_ROW_DTYPES: dict[str, type[np.integer]] = {"user": np.int32, "item": np.int32, "type": np.int8, "ts": np.int64}
_ROW_DTYPES |= {"session": np.int32, "target": np.int32, "referrer": np.int32, "quantity": np.int8}


def _rows(kind: int, user: I64, item: I64, ts: I64, session: I64, **optional: NDArray) -> dict[str, NDArray]:
    n = len(user)
    given = {"user": user, "item": item, "type": np.full(n, kind), "ts": ts, "session": session, **optional}
    return {
        k: given[k].astype(t) if k in given else np.full(n, -1 if k != "quantity" else 0, t)
        for k, t in _ROW_DTYPES.items()
    }


def _stack(rows: list[dict[str, NDArray]]) -> dict[str, NDArray]:
    return {k: np.concatenate([r[k] for r in rows]) for k in _ROW_DTYPES}


class _Simulation:
    """Runs the window day by day; within a day every step is vectorized over all visits of that step."""

    def __init__(self, rng: np.random.Generator, cfg: DemoDataConfig, cat: _Catalog, pop: Population) -> None:
        self.rng, self.cfg, self.cat, self.pop = rng, cfg, cat, pop
        self.start_ms = int(cfg.start.timestamp() * 1000)
        self.end_ms = self.start_ms + cfg.days * DAY_MS
        self.sessions = 0
        # user * items + item for durables already bought: sorted up to yesterday, plus today's.
        self.owned = np.zeros(0, np.int64)
        self.owned_today: list[I64] = []
        self.pending: dict[int, list[Visits]] = {}
        self.rows: list[dict[str, NDArray]] = []  # today's events
        self.days: list[dict[str, NDArray]] = []  # earlier days' events, stacked
        self.cum_w = np.zeros(0)

    def run(self, progress: Callable[[str], None]) -> dict[str, NDArray]:
        for day in range(self.cfg.days):
            self.cum_w = np.cumsum(_weigh_items(self.cat, day)[self.cat.order])
            queue = [self._browse(day), *self.pending.pop(day, [])]
            for _ in range(_MAX_WAVES):
                if not queue:
                    break
                queue = self._schedule(self._visit(Visits.concat(queue)), day)
            if queue:
                self.pending.setdefault(day + 1, []).extend(queue)
            self.owned = distinct(np.concatenate([self.owned, *self.owned_today]))
            today = _stack(self.rows)
            self.days.append({k: v[today["ts"] < self.end_ms] for k, v in today.items()})
            self.rows, self.owned_today = [], []
            if (day + 1) % 10 == 0 or day + 1 == self.cfg.days:
                progress(f"simulated day {day + 1}/{self.cfg.days}")
        return _stack(self.days)

    def _browse(self, day: int) -> Visits:
        """Organic sessions: heavy-tailed activity, more at weekends, a category per session, a few views."""
        rng, pop = self.rng, self.pop
        weekend = (self.cfg.start.weekday() + day) % 7 >= 5
        rate = self.cfg.events_per_user_day / _EVENTS_PER_SESSION * pop.activity * (1.25 if weekend else 0.9)
        s_user = np.repeat(np.arange(len(rate)), rng.poisson(rate * (day >= pop.active_from_day)))
        n = len(s_user)
        s_start = self.start_ms + day * DAY_MS + time_of_day_ms(rng, n)
        s_cat = draw_categories(rng, pop, s_user)
        n_views = rng.geometric(0.4, n)
        sess = np.repeat(np.arange(n), n_views)
        gaps = 3_000 + rng.exponential(45_000, len(sess))
        csum = np.cumsum(gaps)
        first = np.cumsum(n_views) - n_views
        ts = s_start[sess] + (csum - np.repeat(csum[first] - gaps[first], n_views)).astype(np.int64)
        user = s_user[sess]
        cat = np.where(rng.random(len(sess)) < 0.75, s_cat[sess], draw_categories(rng, pop, user))
        session = self.sessions + sess
        self.sessions += n
        return Visits(
            user, self._draw_items(user, cat), ts, np.full(len(sess), -1), session, np.zeros(len(sess), np.int8)
        )

    def _draw_items(self, user: I64, cat: I64, k: int = 3) -> I64:
        """k candidates by today's weights in the category; the user takes the one that fits their budget."""
        c, rng, n = self.cat, self.rng, len(user)
        lo = np.where(c.bounds[cat] > 0, self.cum_w[np.maximum(c.bounds[cat] - 1, 0)], 0.0)
        total = self.cum_w[c.bounds[cat + 1] - 1] - lo
        pos = np.searchsorted(self.cum_w, lo[:, None] + rng.random((n, k)) * total[:, None], side="right")
        # Rounding can step past the category's end; the head item is always available to fall back on.
        pos = np.where(pos < c.bounds[cat + 1][:, None], pos, c.bounds[cat][:, None])
        cand = c.order[pos]
        misfit = (c.rel_log_price[cand] - self.pop.price_level[user][:, None]) ** 2
        util = -2.0 * self.pop.price_sensitivity[user][:, None] * misfit + rng.gumbel(size=(n, k))
        return np.asarray(cand[np.arange(n), util.argmax(axis=1)], dtype=np.int64)

    def _visit(self, v: Visits) -> Visits:
        """The funnel for one batch of visits; returns the visits its purchases and shares cause."""
        rng, pop, c = self.rng, self.pop, self.cat
        new_session = v.session < 0
        session = np.where(new_session, self.sessions + np.cumsum(new_session) - 1, v.session)
        self.sessions += int(new_session.sum())
        u, i, cat = v.user, v.item, c.cat[v.item]
        fit, p_cart, p_buy = self._odds(v)
        cart = np.flatnonzero(rng.random(len(v)) < np.minimum(p_cart, 0.95))
        buy = cart[rng.random(len(cart)) < p_buy[cart]]
        # A durable carted twice in one batch (the same session, mostly) is still bought once.
        once = np.zeros(len(buy), bool)
        once[np.unique(u[buy].astype(np.int64) * self.cfg.items + i[buy], return_index=True)[1]] = True
        buy = buy[once | c.consumable[cat[buy]]]
        ts_cart = v.ts + 10_000 + rng.exponential(60_000, len(v)).astype(np.int64)
        ts_buy = ts_cart + 20_000 + rng.exponential(240_000, len(v)).astype(np.int64)
        like = np.flatnonzero(rng.random(len(v)) < 0.02 + 0.08 * fit)
        ts_like = v.ts[like] + 2_000 + rng.exponential(20_000, len(like)).astype(np.int64)
        qty = np.where(c.consumable[cat], 1 + rng.poisson(0.4, len(v)), 1 + (rng.random(len(v)) < 0.03))
        refund = buy[rng.random(len(buy)) < np.where(c.consumable[cat[buy]], 0.015, 0.05)]
        ts_refund = ts_buy[refund] + rng.uniform(1, 12, len(refund)) * DAY_MS
        self.rows += [
            _rows(VIEW, u, i, v.ts, session, referrer=v.referrer),
            _rows(LIKE, u[like], i[like], ts_like, session[like]),
            _rows(CART, u[cart], i[cart], ts_cart[cart], session[cart], referrer=v.referrer[cart]),
            _rows(BUY, u[buy], i[buy], ts_buy[buy], session[buy], referrer=v.referrer[buy], quantity=qty[buy]),
            _rows(REFUND, u[refund], i[refund], ts_refund.astype(np.int64), np.full(len(refund), -1, np.int64)),
        ]
        durable = buy[~c.consumable[cat[buy]]]
        self.owned_today.append(u[durable].astype(np.int64) * self.cfg.items + i[durable])
        seen = Visits(u, i, v.ts, v.referrer, session, v.kind)
        shares, caused = spread_word(rng, pop, seen, buy, ts_buy[buy], c.cat, self.start_ms)
        self.rows.append(_rows(SHARE, shares.sharer, shares.item, shares.ts, shares.session, target=shares.target))
        return Visits.concat([caused, self._rebuy(u[buy], i[buy], ts_buy[buy], qty[buy])])

    def _odds(self, v: Visits) -> tuple[F64, F64, F64]:
        """How well each item fits its visitor, and the chances to cart it and then to buy it."""
        pop, c, u, i, cat = self.pop, self.cat, v.user, v.item, self.cat.cat[v.item]
        misfit = (c.rel_log_price[i] - pop.price_level[u]) ** 2
        fit = pop.taste[u, cat] * np.exp(-0.5 * pop.price_sensitivity[u] * misfit)
        qf = 0.6 + 0.8 * c.quality[i]
        # A share converts as well as the sharer is trusted; "friends bought it" adds a little on its own.
        trust = TRUST[pop.role[v.referrer]] * (v.referrer >= 0) + (v.referrer < 0)
        p_cart = np.select(
            [v.kind == VisitKind.REBUY, v.kind == VisitKind.REFERRAL, v.kind == VisitKind.SOCIAL],
            [np.full(len(v), 0.85), (0.05 + 0.30 * fit) * qf * trust, (0.04 + 0.17 * fit) * qf * 1.5],
            (0.04 + 0.17 * fit) * qf,
        )
        p_buy = np.where(v.kind == VisitKind.REBUY, 0.9, (0.2 + 0.3 * fit) * np.minimum(trust, 1.0))
        # Nobody buys the same sofa twice.
        p_buy = np.where(self._owns(u * self.cfg.items + i) & ~c.consumable[cat], 0.02 * p_buy, p_buy)
        return fit, p_cart, p_buy

    def _owns(self, keys: I64) -> NDArray[np.bool_]:
        at = np.minimum(np.searchsorted(self.owned, keys), max(len(self.owned) - 1, 0))
        before = (self.owned[at] == keys) if len(self.owned) else np.zeros(len(keys), bool)
        return before | np.isin(keys, np.concatenate([np.zeros(0, np.int64), *self.owned_today]))

    def _rebuy(self, user: I64, item: I64, ts: I64, qty: I64) -> Visits:
        """A consumable runs out after about its cycle times the quantity bought, and many reorder it."""
        days = self.cat.rebuy_days[self.cat.cat[item]] * qty
        keep = self.cat.consumable[self.cat.cat[item]] & (self.rng.random(len(user)) < 0.6)
        wait = (self.rng.gamma(4.0, 0.25, len(user)) * np.nan_to_num(days) * DAY_MS).astype(np.int64)
        return Visits.arrive(user[keep], item[keep], (ts + wait)[keep], VisitKind.REBUY)

    def _schedule(self, v: Visits, today: int) -> list[Visits]:
        """Keep visits inside the window from users who have joined; queue later days, return today's."""
        day = (v.ts - self.start_ms) // DAY_MS
        v = v.take((v.ts < self.end_ms) & (day >= self.pop.active_from_day[v.user]))
        day = (v.ts - self.start_ms) // DAY_MS
        for d in np.unique(day[day > today]):
            self.pending.setdefault(int(d), []).append(v.take(day == d))
        return [v.take(day <= today)] if (day <= today).any() else []


def generate_demo_data(
    out_dir: Path, config: DemoDataConfig, progress: Callable[[str], None] | None = None
) -> DemoDataSummary:
    """Simulate the configured window and write events, items, users, social and truth.json to out_dir."""
    say = progress or (lambda _msg: None)
    rng = np.random.default_rng(config.seed)
    start_ms = int(config.start.timestamp() * 1000)
    catalog = _build_catalog(rng, config, start_ms)
    pop = build_population(
        rng, config.users, config.categories, config.days, config.influencer_count, config.decoy_count, start_ms
    )
    say(f"built {config.items} items and {config.users} users with {len(pop.edges_src)} social edges")
    events = _Simulation(rng, config, catalog, pop).run(say)
    out_dir.mkdir(parents=True, exist_ok=True)
    user_ids = numbered("u", np.arange(config.users), max(6, len(str(config.users - 1))))
    item_ids = numbered("p", np.arange(config.items), max(5, len(str(config.items - 1))))
    say(f"writing {len(events['ts'])} events")
    _write_events(out_dir / f"{Table.EVENTS}.parquet", events, catalog.price, user_ids, item_ids)
    _write_catalog(out_dir / f"{Table.ITEMS}.parquet", rng, catalog, item_ids)
    users, social = tabulate_people(pop, user_ids)
    pq.write_table(users, out_dir / f"{Table.USERS}.parquet")
    pq.write_table(social, out_dir / f"{Table.SOCIAL}.parquet")
    _write_truth(out_dir / "truth.json", config, catalog, pop, user_ids, item_ids)
    return DemoDataSummary(
        events=len(events["ts"]),
        users=config.users,
        items=config.items,
        social_edges=len(pop.edges_src),
        shares=int((events["type"] == SHARE).sum()),
        referred_purchases=int(((events["type"] == BUY) & (events["referrer"] >= 0)).sum()),
        out_dir=out_dir,
    )


def _write_events(path: Path, events: dict[str, NDArray], price: F64, user_ids: pa.Array, item_ids: pa.Array) -> None:
    """Sorted by time; ids become strings one slice at a time so the string columns never all coexist."""
    order = np.argsort(events["ts"], kind="stable")
    type_names = pa.array([t.value for t in _TYPES])
    columns = [c for c in EVENT_COLUMNS if c != "request_id"]
    width = max(8, len(str(len(order))))
    with pq.ParquetWriter(path, _event_schema(columns)) as writer:
        for lo in range(0, max(len(order), 1), _WRITE_ROWS):
            rows = order[lo : lo + _WRITE_ROWS]
            e = {k: v[rows] for k, v in events.items()}
            bought = e["type"] == BUY
            arrays = {
                "user_id": take_ids(user_ids, e["user"]),
                "item_id": take_ids(item_ids, e["item"]),
                "event_type": pc.take(type_names, pa.array(e["type"])),
                "timestamp": timestamps(e["ts"]),
                "event_id": numbered("e", lo + np.arange(len(rows)), width),
                "target_user_id": take_ids(user_ids, e["target"]),
                "referrer_id": take_ids(user_ids, e["referrer"]),
                "session_id": numbered("s", e["session"], width),
                "quantity": pa.array(e["quantity"], mask=~bought),
                "price": pa.array(price[e["item"]], mask=~bought),
            }
            writer.write_table(pa.table([arrays[c] for c in columns], schema=_event_schema(columns)))


def _event_schema(columns: list[str]) -> pa.Schema:
    types = {"timestamp": pa.timestamp("ns", tz="UTC"), "quantity": pa.int64(), "price": pa.float64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in columns])


def _write_catalog(path: Path, rng: np.random.Generator, cat: _Catalog, item_ids: pa.Array) -> None:
    """Real catalogs miss fields: about 3% of prices are absent, though purchases still carry theirs."""
    n = len(cat.cat)
    brand = [f"brand{b:04d}" for b in cat.brand]
    columns = {
        "item_id": item_ids,
        "category": pa.array(np.array(cat.names)[cat.cat]),
        "brand": pa.array(brand),
        "title": pa.array([f"{b} {cat.names[c]} no. {i}" for i, (b, c) in enumerate(zip(brand, cat.cat, strict=True))]),
        "price": pa.array(cat.price, mask=rng.random(n) < 0.03),
        "in_stock": pa.array(rng.random(n) < 0.94),
        "created_at": timestamps(cat.created_ms),
    }
    pq.write_table(pa.table({c: columns[c] for c in ITEM_COLUMNS}), path)


def _write_truth(
    path: Path, cfg: DemoDataConfig, cat: _Catalog, pop: Population, user_ids: pa.Array, item_ids: pa.Array
) -> None:
    """What was planted; not part of the input contract, so a model never gets to read it."""

    def ids(source: pa.Array, idx: I64) -> list[str]:
        return list(take_ids(source, idx).to_pylist())

    rebuy = [None if np.isnan(d) else round(float(d), 1) for d in cat.rebuy_days]
    day0 = cfg.start.timestamp()
    starts = [datetime.fromtimestamp(day0 + d * 86_400, UTC).isoformat() for d in cat.trend_start]
    truth = {
        "config": cfg.model_dump(mode="json"),
        "influencers": ids(user_ids, np.flatnonzero(pop.role == Role.INFLUENCER)),
        "decoys": ids(user_ids, np.flatnonzero(pop.role == Role.DECOY)),
        "categories": {
            n: {"consumable": bool(cat.consumable[c]), "rebuy_days": rebuy[c]} for c, n in enumerate(cat.names)
        },
        "consumable_categories": [n for c, n in enumerate(cat.names) if cat.consumable[c]],
        "trending": [
            {"item_id": item, "start": start, "days": round(float(days), 1)}
            for item, start, days in zip(ids(item_ids, cat.trend_item), starts, cat.trend_days, strict=True)
        ],
    }
    path.write_text(json.dumps(truth, indent=2) + "\n")
