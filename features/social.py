"""The social graph: who reaches whom, from the `social` table and from behaviour, as of a cut-off.

An edge u -> v means v sees u's activity: a friendship gives both directions, a follow (a follows b) gives
b -> a, a share gives sharer -> recipient, a referral gives referrer -> referred user. Behavioural edges are
weighted per kind and decay with age; the social table has no times, so its edges do not decay.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from features.schema import EventType
from features.vocab import Vocabulary

I64 = NDArray[np.int64]


class EdgeKind(IntFlag):
    """Which sources an edge came from (bits, so one edge may carry several)."""

    FRIEND = 1
    FOLLOW = 2  # the source is followed by the target
    SHARE = 4
    REFERRAL = 8


@dataclass(frozen=True, slots=True)
class GraphWeights:
    """How much each kind of tie counts; behavioural ties halve in weight every `half_life_days`."""

    friend: float = 1.0
    follow: float = 0.5
    share: float = 1.0  # per share sent
    referral: float = 2.0  # per event that carries the referrer
    half_life_days: float = 30.0


@dataclass(frozen=True, slots=True)
class SocialGraph:
    """A directed, weighted graph in CSR form over `users` (out-edges: whom a user reaches).

    `last_seen` is the epoch second of the newest behavioural event behind an edge (0: table ties only).
    """

    users: Vocabulary
    indptr: I64  # len(users) + 1
    indices: NDArray[np.int32]  # target user idx per edge, sorted within each row
    weight: NDArray[np.float32]
    last_seen: NDArray[np.uint32]
    kinds: NDArray[np.uint8]  # EdgeKind bits

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_edges(self) -> int:
        return len(self.indices)

    def _row(self, user_idx: int) -> slice:
        return slice(int(self.indptr[user_idx]), int(self.indptr[user_idx + 1]))

    def reach(self, user_idx: int) -> tuple[NDArray[np.int32], NDArray[np.float32]]:
        """Whom this user reaches (friends, followers, people they shared with or referred) and how strongly."""
        row = self._row(user_idx)
        return self.indices[row], self.weight[row]

    def reach_of(self, user_id: str) -> list[str]:
        idx = self.users.index_of(user_id)
        return [] if idx is None else [self.users.id_of(int(v)) for v in self.reach(idx)[0]]

    def out_degree(self) -> I64:
        """Per user, how many people they reach."""
        return np.diff(self.indptr)

    def in_degree(self) -> I64:
        """Per user, how many people reach them."""
        return np.bincount(self.indices, minlength=self.n_users).astype(np.int64)

    def degree(self, kinds: EdgeKind | None = None) -> I64:
        """Per user, distinct neighbours in either direction (only edges of `kinds` when given)."""
        src = np.repeat(np.arange(self.n_users, dtype=np.int64), np.diff(self.indptr))
        dst = self.indices.astype(np.int64)
        if kinds is not None:
            keep = (self.kinds & np.uint8(kinds)) != 0
            src, dst = src[keep], dst[keep]
        lo, hi = np.minimum(src, dst), np.maximum(src, dst)
        pairs = np.unique(lo * self.n_users + hi)
        ends = np.concatenate([pairs // self.n_users, pairs % self.n_users])
        return np.bincount(ends, minlength=self.n_users).astype(np.int64)

    def save(self, directory: Path, prefix: str = "social") -> list[Path]:
        """Write the vocabulary and the CSR arrays; returns the files written."""
        vocab = Path(directory) / f"{prefix}_users.parquet"
        arrays = Path(directory) / f"{prefix}_graph.npz"
        self.users.save(vocab)
        np.savez(arrays, indptr=self.indptr, indices=self.indices, weight=self.weight,
                 last_seen=self.last_seen, kinds=self.kinds)
        return [vocab, arrays]

    @classmethod
    def load(cls, directory: Path, prefix: str = "social") -> SocialGraph:
        users = Vocabulary.load(Path(directory) / f"{prefix}_users.parquet")
        with np.load(Path(directory) / f"{prefix}_graph.npz", allow_pickle=False) as npz:
            graph = cls(users, npz["indptr"], npz["indices"], npz["weight"], npz["last_seen"], npz["kinds"])
        if len(graph.indptr) != len(users) + 1 or not (
            len(graph.indices) == len(graph.weight) == len(graph.last_seen) == len(graph.kinds)
        ):
            raise ValueError("social graph arrays do not match its vocabulary")
        return graph


def _table_edges(social: pd.DataFrame | None) -> tuple[pd.Series, pd.Series, NDArray[np.uint8]]:
    """Social-table ties in reach orientation: friends both ways, a follow from the followed to the fan."""
    if social is None or social.empty:
        empty = pd.Series([], dtype="str")
        return empty, empty, np.zeros(0, np.uint8)
    kind = social["kind"].fillna("friend") if "kind" in social.columns else pd.Series("friend", index=social.index)
    follow = (kind == "follow").to_numpy()
    a, b = social["user_id"].astype("str"), social["friend_id"].astype("str")
    friends_a, friends_b = a[~follow], b[~follow]
    src = pd.concat([friends_a, friends_b, b[follow]], ignore_index=True)
    dst = pd.concat([friends_b, friends_a, a[follow]], ignore_index=True)
    kinds = np.concatenate([np.full(2 * int((~follow).sum()), EdgeKind.FRIEND, np.uint8),
                            np.full(int(follow.sum()), EdgeKind.FOLLOW, np.uint8)])
    return src, dst, kinds


def behaviour_edges(events: pd.DataFrame, cut: pd.Timestamp | None) -> pd.DataFrame:
    """Shares (sharer -> recipient) and referrals (referrer -> user) before `cut`: src, dst, kind, ts."""
    frame = events if cut is None else events.loc[events["ts"] < cut]
    parts = []
    if "target_user_id" in frame.columns:
        shares = frame.loc[(frame["event_type"] == EventType.SHARE) & frame["target_user_id"].notna()]
        parts.append(pd.DataFrame({"src": shares["user_id"], "dst": shares["target_user_id"],
                                   "kind": np.uint8(EdgeKind.SHARE), "ts": shares["ts"]}))
    if "referrer_id" in frame.columns:
        referred = frame.loc[frame["referrer_id"].notna()]
        parts.append(pd.DataFrame({"src": referred["referrer_id"], "dst": referred["user_id"],
                                   "kind": np.uint8(EdgeKind.REFERRAL), "ts": referred["ts"]}))
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame({"src": pd.Series([], dtype="str"), "dst": pd.Series([], dtype="str"),
                             "kind": np.zeros(0, np.uint8), "ts": pd.Series([], dtype="datetime64[ns, UTC]")})
    edges = pd.concat(parts, ignore_index=True)
    return edges.loc[edges["src"] != edges["dst"]].reset_index(drop=True)


def build_social_graph(
    social: pd.DataFrame | None,
    events: pd.DataFrame,
    cut: pd.Timestamp,
    *,
    users: Vocabulary | None = None,
    weights: GraphWeights | None = None,
) -> SocialGraph:
    """The graph as of `cut`: table ties plus behavioural ties from events strictly before `cut`.

    The vocabulary starts with `users` in their order (so a bundle's user idx is the graph's idx) and
    appends anyone else the ties mention.
    """
    weights = weights or GraphWeights()
    t_src, t_dst, t_kind = _table_edges(social)
    behaviour = behaviour_edges(events, cut)
    base = [] if users is None else list(users.ids)
    vocab = Vocabulary.from_ids(
        pd.concat([pd.Series(base, dtype="str"), t_src, t_dst, behaviour["src"], behaviour["dst"]], ignore_index=True)
    )
    n = len(vocab)
    age_days = np.clip((cut - behaviour["ts"]).dt.total_seconds().to_numpy() / 86_400.0, 0.0, None)
    kind_weight = np.where(behaviour["kind"].to_numpy() == EdgeKind.SHARE, weights.share, weights.referral)
    table_weight = np.where(t_kind == EdgeKind.FRIEND, weights.friend, weights.follow)
    src = np.concatenate([vocab.indexes(t_src), vocab.indexes(behaviour["src"])])
    dst = np.concatenate([vocab.indexes(t_dst), vocab.indexes(behaviour["dst"])])
    weight = np.concatenate([table_weight, kind_weight * np.power(0.5, age_days / weights.half_life_days)])
    seconds = np.concatenate([np.zeros(len(t_kind)), behaviour["ts"].astype("int64").to_numpy() // 10**9])
    kinds = np.concatenate([t_kind, behaviour["kind"].to_numpy(np.uint8)])
    keep = src != dst
    key = src[keep] * n + dst[keep]
    order = np.argsort(key, kind="stable")
    key, weight, seconds, kinds = key[order], weight[keep][order], seconds[keep][order], kinds[keep][order]
    first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if len(key) else np.zeros(0, np.int64)
    edge_key = key[first]
    # A repeated table tie (the same friendship listed both ways) counts once; behaviour adds up.
    is_table = (kinds & np.uint8(EdgeKind.FRIEND | EdgeKind.FOLLOW)) != 0
    behaviour_weight = np.where(is_table, 0.0, weight)
    table_best = np.where(is_table, weight, 0.0)
    merged_weight = (np.add.reduceat(behaviour_weight, first) + np.maximum.reduceat(table_best, first)
                     if len(first) else np.zeros(0))
    merged_seconds = np.maximum.reduceat(seconds, first) if len(first) else np.zeros(0)
    merged_kinds = np.bitwise_or.reduceat(kinds, first) if len(first) else np.zeros(0, np.uint8)
    rows = edge_key // n
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return SocialGraph(
        users=vocab,
        indptr=indptr,
        indices=(edge_key % n).astype(np.int32),
        weight=merged_weight.astype(np.float32),
        last_seen=merged_seconds.astype(np.uint32),
        kinds=merged_kinds.astype(np.uint8),
    )
