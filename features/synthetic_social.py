"""The synthetic population behind `features.synthetic`: users' tastes and habits, communities, the friendship
graph with planted influencers and decoys, how shares and purchases spread through it, and its two tables.

Everything is vectorized over users, edges or events; the only Python loops run over categories.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from features.schema import SOCIAL_COLUMNS, SOCIAL_KINDS

DAY_MS = 86_400_000
HOUR_MS = 3_600_000

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
I8 = NDArray[np.int8]


class Role(IntEnum):
    NORMAL = 0
    INFLUENCER = 1
    DECOY = 2


class VisitKind(IntEnum):
    ORGANIC = 0
    REFERRAL = 1  # the user opens an item a friend shared with them
    SOCIAL = 2  # the user sees that a friend bought the item ("3 friends bought this")
    REBUY = 3  # a consumable runs out


# Per role (indexed by Role): how often they share, how many people one share reaches, how likely a
# recipient opens it, how much a referred visit converts, how much their purchases sway friends.
# Decoys look like influencers in the graph and spam shares to their crowd, but nobody acts on them.
_SHARE_PROPENSITY = np.array([1.0, 6.0, 2.0])
_EXTRA_RECIPIENTS = np.array([0.4, 4.0, 2.0])
_PULL = np.array([0.30, 0.70, 0.04])
TRUST = np.array([1.2, 1.8, 0.05])
_INFLUENCE = np.array([1.0, 1.5, 0.05])


@dataclass(frozen=True, slots=True)
class Visits:
    """Item views about to happen: who, what, when (epoch ms), through whom, which session (-1: new)."""

    user: I64
    item: I64
    ts: I64
    referrer: I64
    session: I64
    kind: I8

    @staticmethod
    def concat(parts: list[Visits]) -> Visits:
        return Visits(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))

    @staticmethod
    def arrive(user: I64, item: I64, ts: I64, kind: VisitKind, referrer: I64 | None = None) -> Visits:
        """Visits in new sessions (assigned when they happen)."""
        none = np.full(len(user), -1, np.int64)
        return Visits(user, item, ts, none if referrer is None else referrer, none, np.full(len(user), kind, np.int8))

    def take(self, mask: NDArray[np.bool_] | I64) -> Visits:
        return Visits(*(getattr(self, f)[mask] for f in _FIELDS))

    def __len__(self) -> int:
        return len(self.user)


_FIELDS = ("user", "item", "ts", "referrer", "session", "kind")


@dataclass(frozen=True, slots=True)
class Shares:
    sharer: I64
    target: I64
    item: I64
    ts: I64
    session: I64


@dataclass(frozen=True, slots=True)
class Population:
    pref: F64  # users x categories, rows sum to 1
    cum_pref: F64
    taste: F64  # pref divided by the user's top preference: 1 on their favourite category
    activity: F64  # mean 1, heavy tailed
    price_level: F64  # preferred log-price relative to the category median
    price_sensitivity: F64
    role: I8
    region: I64
    signup_ms: I64
    active_from_day: I64  # first window day the user acts on
    edges_src: I64  # social table rows; a follow is fan -> influencer
    edges_dst: I64
    edges_follow: NDArray[np.bool_]
    reach_ptr: I64  # whom a user's shares can reach: friends, and fans for influencers (CSR)
    reach_idx: I64
    friend_ptr: I64  # friends only (CSR): who sees a user's purchases
    friend_idx: I64


def build_population(
    rng: np.random.Generator, users: int, categories: int, days: int, influencers: int, decoys: int, start_ms: int
) -> Population:
    """Draw tastes by community, then a homophilous friendship graph with influencers' fans and decoys."""
    n_comm = max(2, users // 120)
    comm_taste = rng.dirichlet(np.full(categories, 0.3), size=n_comm)
    community = rng.integers(0, n_comm, users)
    # A user's taste is a Dirichlet draw around their community's taste: shared, yet personal.
    pref = rng.gamma(0.06 + 3.0 * comm_taste[community]) + 1e-9
    pref /= pref.sum(axis=1, keepdims=True)

    role = np.zeros(users, dtype=np.int8)
    picked = rng.permutation(users)[: influencers + decoys]
    role[picked[:influencers]] = Role.INFLUENCER
    role[picked[influencers:]] = Role.DECOY
    infl = picked[:influencers]
    specialty = pref[infl].argmax(axis=1)
    # Creators are known for one category: sharpen their taste so their fans share it.
    pref[infl] = 0.3 * pref[infl] + 0.7 * np.eye(categories)[specialty]

    activity = rng.lognormal(-0.6, 1.1, users)
    activity /= activity.mean()
    activity[role == Role.INFLUENCER] *= 3.0
    activity[role == Role.DECOY] *= 2.0  # busy accounts: they browse and share a lot, to no effect

    signup_day = np.where(rng.random(users) < 0.12, rng.uniform(0, days * 0.8, users), -rng.uniform(1, 720, users))
    signup_day[role != Role.NORMAL] = -rng.uniform(30, 720, int((role != Role.NORMAL).sum()))
    comm_region = rng.integers(0, 6, n_comm)
    region = np.where(rng.random(users) < 0.8, comm_region[community], rng.integers(0, 6, users))

    friend_src, friend_dst = _draw_friendships(rng, community, role)
    fan, idol = _draw_follows(rng, pref, infl, specialty, users)
    reach_ptr, reach_idx = _csr(
        users, np.concatenate([friend_src, friend_dst, idol]), np.concatenate([friend_dst, friend_src, fan])
    )
    friend_ptr, friend_idx = _csr(
        users, np.concatenate([friend_src, friend_dst]), np.concatenate([friend_dst, friend_src])
    )
    return Population(
        pref=pref,
        cum_pref=np.cumsum(pref, axis=1),
        taste=pref / pref.max(axis=1, keepdims=True),
        activity=activity,
        price_level=rng.normal(0.0, 0.35, users),
        price_sensitivity=rng.lognormal(0.3, 0.5, users),
        role=role,
        region=region,
        signup_ms=(start_ms + signup_day * DAY_MS).astype(np.int64),
        active_from_day=np.maximum(0, np.floor(signup_day) + 1).astype(np.int64),
        edges_src=np.concatenate([friend_src, fan]),
        edges_dst=np.concatenate([friend_dst, idol]),
        edges_follow=np.concatenate([np.zeros(len(friend_src), bool), np.ones(len(fan), bool)]),
        reach_ptr=reach_ptr,
        reach_idx=reach_idx,
        friend_ptr=friend_ptr,
        friend_idx=friend_idx,
    )


def tabulate_people(pop: Population, user_ids: pa.Array) -> tuple[pa.Table, pa.Table]:
    """The users table (region, signup time) and the social table (each friendship once, follows fan -> idol)."""
    regions = pa.array(["north", "south", "east", "west", "central", "coast"])
    users = {"user_id": user_ids, "region": pc.take(regions, pop.region), "signup_at": timestamps(pop.signup_ms)}
    kinds = pc.take(pa.array(SOCIAL_KINDS), pop.edges_follow.astype(np.int8))
    social = [take_ids(user_ids, pop.edges_src), take_ids(user_ids, pop.edges_dst), kinds]
    return pa.table(users), pa.table(dict(zip(SOCIAL_COLUMNS, social, strict=True)))


def timestamps(ms: I64) -> pa.Array:
    return pa.array(ms.astype(np.int64) * 1_000_000, type=pa.timestamp("ns", tz="UTC"))


def take_ids(ids: pa.Array, idx: NDArray) -> pa.Array:
    """External ids for dense indexes; -1 becomes null."""
    return pc.take(ids, pa.array(idx, mask=idx < 0))


def numbered(prefix: str, idx: NDArray, width: int) -> pa.Array:
    """Ids like u000042 for dense indexes, built in Arrow (millions of Python strings would be slow)."""
    digits = pc.utf8_lpad(pc.cast(pa.array(idx, mask=idx < 0), pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(prefix, digits, "")


def draw_categories(rng: np.random.Generator, pop: Population, users: I64) -> I64:
    """A category for each of these users, by their taste."""
    picked = (pop.cum_pref[users] < rng.random(len(users))[:, None]).sum(axis=1)
    return np.asarray(np.minimum(picked, pop.cum_pref.shape[1] - 1), dtype=np.int64)


def time_of_day_ms(rng: np.random.Generator, n: int) -> I64:
    """When sessions start: an evening peak, a lunch bump, some activity at any hour."""
    hour = np.select(
        [rng.random(n) < 0.5, rng.random(n) < 0.6],
        [rng.normal(20.5, 2.0, n), rng.normal(12.5, 1.5, n)],
        rng.uniform(0, 24, n),
    )
    return np.asarray(np.mod(hour, 24.0) * HOUR_MS, dtype=np.int64)


def _crowd_size(users: int) -> float:
    """How many fans an influencer has, and as many friends a decoy has: comparable degree by design."""
    return float(np.clip(users * 0.03, 15, 150))


def _draw_friendships(rng: np.random.Generator, community: I64, role: I8) -> tuple[I64, I64]:
    users = len(community)
    sociability = rng.lognormal(0.0, 0.6, users)
    out = rng.poisson(7.0 * sociability / sociability.mean())
    src = np.repeat(np.arange(users), out)
    # Homophily: most friends come from one's own community, the rest from anywhere.
    members = np.argsort(community, kind="stable")
    comm_size = np.bincount(community)
    comm_start = np.cumsum(comm_size) - comm_size
    c = community[src]
    local = members[comm_start[c] + (rng.random(len(src)) * comm_size[c]).astype(np.int64)]
    dst = np.where(rng.random(len(src)) < 0.85, local, rng.integers(0, users, len(src)))
    # Decoys befriend a crowd of random (so mostly uninterested) people.
    decoys = np.flatnonzero(role == Role.DECOY)
    crowd = rng.poisson(_crowd_size(users), len(decoys))
    src = np.concatenate([src, np.repeat(decoys, crowd)])
    dst = np.concatenate([dst, rng.integers(0, users, int(crowd.sum()))])
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    key = distinct((lo * users + hi)[lo != hi])
    return key // users, key % users


def _draw_follows(rng: np.random.Generator, pref: F64, infl: I64, specialty: I64, users: int) -> tuple[I64, I64]:
    """Fans follow creators of the category they love: the draw favours users with a high preference."""
    n_fans = np.maximum(1, rng.poisson(_crowd_size(users), len(infl)))
    fans, idols = [], []
    for c in np.unique(specialty):
        of_c = infl[specialty == c]
        weight = pref[:, c] ** 2
        total = int(n_fans[specialty == c].sum())
        fans.append(rng.choice(users, size=total, p=weight / weight.sum()))
        idols.append(np.repeat(of_c, n_fans[specialty == c]))
    fan = np.concatenate(fans) if fans else np.zeros(0, np.int64)
    idol = np.concatenate(idols) if idols else np.zeros(0, np.int64)
    key = distinct((fan * users + idol)[fan != idol])
    return key // users, key % users


def distinct(keys: I64) -> I64:
    """Sorted unique values; numpy's hash-based `unique` is several times slower on these sizes."""
    keys = np.sort(keys)
    return keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if len(keys) else keys


def _first_of_each(keys: I64) -> I64:
    """Positions of the first occurrence of every distinct key, in their original order."""
    order = np.argsort(keys, kind="stable")
    ranked = keys[order]
    return np.sort(order[np.concatenate([[True], ranked[1:] != ranked[:-1]])] if len(keys) else order)


def _csr(users: int, src: I64, dst: I64) -> tuple[I64, I64]:
    order = np.argsort(src, kind="stable")
    ptr = np.zeros(users + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=users), out=ptr[1:])
    return ptr, dst[order].astype(np.int64)


def _expand(ptr: I64, idx: I64, rows: I64) -> tuple[I64, I64]:
    """For each row's user, all of their neighbours: (position of the row, neighbour)."""
    deg = ptr[rows + 1] - ptr[rows]
    rep = np.repeat(np.arange(len(rows)), deg)
    offset = np.arange(len(rep)) - np.repeat(np.cumsum(deg) - deg, deg)
    return rep, idx[ptr[rows][rep] + offset]


def spread_word(
    rng: np.random.Generator, pop: Population, seen: Visits, bought: I64, ts_buy: I64, item_cat: I64, start_ms: int
) -> tuple[Shares, Visits]:
    """What a batch of views and purchases sets off in the graph: shares, opened shares, friends noticing."""
    # Views are shared now and then, purchases far more often.
    purchases = Visits(
        seen.user[bought], seen.item[bought], ts_buy, seen.referrer[bought], seen.session[bought], seen.kind[bought]
    )
    acts = Visits.concat([seen, purchases])
    rate = np.concatenate([np.full(len(seen), 0.006), np.full(len(bought), 0.10)])
    shares = _share_items(rng, pop, acts, rate, start_ms)
    caused = Visits.concat(
        [
            _open_shares(rng, pop, shares, item_cat),
            _notice_purchases(rng, pop, seen.user[bought], seen.item[bought], ts_buy, item_cat),
        ]
    )
    return shares, caused


def _share_items(rng: np.random.Generator, pop: Population, acts: Visits, rate: F64, start_ms: int) -> Shares:
    """Some views and purchases are shared, each to one or a few people the sharer reaches."""
    role = pop.role[acts.user]
    chosen = np.flatnonzero(rng.random(len(acts)) < rate * _SHARE_PROPENSITY[role])
    user = acts.user[chosen]
    deg = pop.reach_ptr[user + 1] - pop.reach_ptr[user]
    n_rec = np.minimum(deg, 1 + rng.poisson(_EXTRA_RECIPIENTS[pop.role[user]]))
    rep = np.repeat(np.arange(len(user)), n_rec)
    target = pop.reach_idx[pop.reach_ptr[user[rep]] + (rng.random(len(rep)) * deg[rep]).astype(np.int64)]
    # Sending the same item twice to one person in one go is one share.
    first = _first_of_each(rep * len(pop.role) + target)
    rep, target = rep[first], target[first]
    src = chosen[rep]
    ts = acts.ts[src] + 5_000 + rng.exponential(120_000, len(rep)).astype(np.int64)
    # Nobody receives a share before they joined.
    ok = (ts - start_ms) // DAY_MS >= pop.active_from_day[target]
    return Shares(acts.user[src][ok], target[ok], acts.item[src][ok], ts[ok], acts.session[src][ok])


def _open_shares(rng: np.random.Generator, pop: Population, shares: Shares, item_cat: I64) -> Visits:
    """Recipients open a share more often when it matches their taste and when the sharer has pull."""
    n = len(shares.ts)
    p = _PULL[pop.role[shares.sharer]] * (0.15 + 0.85 * pop.taste[shares.target, item_cat[shares.item]])
    keep = rng.random(n) < p
    delay = 60_000 + rng.lognormal(np.log(2 * HOUR_MS), 1.0, n).astype(np.int64)
    return Visits.arrive(
        shares.target[keep], shares.item[keep], (shares.ts + delay)[keep], VisitKind.REFERRAL, shares.sharer[keep]
    )


def _notice_purchases(
    rng: np.random.Generator, pop: Population, buyer: I64, item: I64, ts: I64, item_cat: I64
) -> Visits:
    """Friends notice a purchase and some look at the item later: "friends bought X" is a real signal."""
    rep, friend = _expand(pop.friend_ptr, pop.friend_idx, buyer)
    # Taste gates it: people notice what friends buy in the categories they care about.
    p = 0.05 * _INFLUENCE[pop.role[buyer[rep]]] * pop.taste[friend, item_cat[item[rep]]] ** 1.5
    keep = rng.random(len(rep)) < p
    rep, friend = rep[keep], friend[keep]
    delay = rng.lognormal(np.log(DAY_MS), 1.0, len(rep)).astype(np.int64) + 600_000
    return Visits.arrive(friend, item[rep], ts[rep] + delay, VisitKind.SOCIAL)
