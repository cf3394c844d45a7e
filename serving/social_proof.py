"""Social proof for feed items: which of the people a shopper follows or is friends with bought an item.

Read from the bundle: the social graph (an edge u -> v means v sees u's activity) and the purchases of
the feature state. Only real contributions count: a friend appears for an item only if the bundle holds
that friend's purchase of it, and only if the friend has not withheld the `social_proof` consent nor been
erased (the caller passes that check, which reads the online store). Names are given out only when the
caller may see them; counts otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from features.social_state import row_cells
from training.bundle import Bundle

MAX_FRIENDS_CHECKED = 500  # the strongest ties looked at per request
MAX_NAMED = 3  # friends named per item at most
MAX_FRIENDS_NAMED_CHECK = 50  # friends whose consent is checked per request (strongest ties first)


@dataclass(frozen=True, slots=True)
class Proof:
    friends_bought: int
    friend_ids: tuple[str, ...]  # at most MAX_NAMED, strongest ties first


class SocialProof:
    """Built once per bundle: the graph turned around (whose activity each user sees)."""

    def __init__(self, bundle: Bundle) -> None:
        graph = bundle.social_graph
        n = graph.n_users
        edges = sp.csr_matrix((graph.weight.astype(np.float32), graph.indices, graph.indptr), shape=(n, n))
        self._sees = sp.csr_matrix(edges.T)  # row v: the users whose activity v sees, with the tie's weight
        self._users = graph.users
        self._bundle_users = len(bundle.users)
        self._purchases = bundle.state.pair_purchases
        self._items = bundle.items

    def _ties(self, user_id: str, since_bundle: Sequence[str] = ()) -> np.ndarray:
        """The bundle users whose activity `user_id` sees, strongest ties first (at most MAX_FRIENDS_CHECKED),
        then those of `since_bundle` (ties the bundle's graph does not hold yet) it lacks."""
        viewer = self._users.index_of(user_id)
        friends = np.empty(0, dtype=np.int64)
        if viewer is not None:
            start, end = self._sees.indptr[viewer], self._sees.indptr[viewer + 1]
            order = np.argsort(-self._sees.data[start:end], kind="stable")[:MAX_FRIENDS_CHECKED]
            friends = np.asarray(self._sees.indices[start:end][order], dtype=np.int64)
        if since_bundle:
            extra = self._users.indexes(list(since_bundle))
            friends = np.concatenate([friends, extra[(extra >= 0) & ~np.isin(extra, friends)]])
        return np.asarray(friends[friends < self._bundle_users], dtype=np.int64)  # the bundle's users only

    def strongest_ties(self, user_id: str, n: int) -> list[str]:
        return [self._users.id_of(int(f)) for f in self._ties(user_id)[:n]]

    def for_items(self, user_id: str, items: Sequence[int], allowed: Callable[[list[str]], list[bool]],
                  recent: Mapping[str, Mapping[str, float]] | None = None,
                  since_bundle: Sequence[str] = ()) -> dict[int, Proof]:
        """Per item idx with at least one friend's purchase: how many friends bought it and who. `recent`:
        friends' purchases since the bundle (friend id -> item id -> time), from the online store;
        `since_bundle`: people the user sees since the bundle (who shared with them or referred them)."""
        friends = self._ties(user_id, since_bundle) if len(items) else np.empty(0, dtype=np.int64)
        if not len(friends):
            return {}
        columns = np.asarray(items, dtype=np.int64)
        bought = _bought(self._purchases, friends, columns)  # friends x items
        if recent:
            self._add_recent(bought, friends, columns, recent)
        hit = np.flatnonzero(bought.any(axis=0))
        if not len(hit):
            return {}
        involved = np.flatnonzero(bought[:, hit].any(axis=1))[:MAX_FRIENDS_NAMED_CHECK]
        names = [self._users.id_of(int(f)) for f in friends[involved]]
        visible = np.asarray(allowed(names), dtype=bool)
        out: dict[int, Proof] = {}
        for j in hit.tolist():
            who = [names[k] for k in np.flatnonzero(bought[involved, j] & visible).tolist()]
            if who:
                out[int(columns[j])] = Proof(len(who), tuple(who[:MAX_NAMED]))
        return out

    def _add_recent(self, bought: np.ndarray, friends: np.ndarray, columns: np.ndarray,
                    recent: Mapping[str, Mapping[str, float]]) -> None:
        row_of = {int(f): k for k, f in enumerate(friends.tolist())}
        asked: dict[int, list[int]] = {}
        for k, item in enumerate(columns.tolist()):
            asked.setdefault(int(item), []).append(k)
        for friend_id, purchases in recent.items():
            friend = self._users.index_of(friend_id)
            row = row_of.get(friend) if friend is not None else None
            if row is None:
                continue
            for item in self._items.indexes(list(purchases)).tolist():
                for k in asked.get(int(item), ()):
                    bought[row, k] = True


def _bought(purchases: sp.csr_matrix, friends: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """friends x columns: whether the friend's purchase count of the item is positive (`purchases[friends][:,
    columns] > 0`, read from the friends' rows without building sub-matrices)."""
    owner, cols, counts = row_cells(purchases, friends)
    order = np.argsort(columns, kind="stable")
    ordered = columns[order]
    out = np.zeros((len(friends), len(columns)), dtype=bool)
    if not len(cols) or not len(columns):
        return out
    at = np.minimum(np.searchsorted(ordered, cols), len(ordered) - 1)
    hit = (ordered[at] == cols) & (counts > 0)
    out[owner[hit], order[at[hit]]] = True
    return out[:, order[np.searchsorted(ordered, columns)]]  # an item asked twice: the same column twice


def reason(proof: Proof, named: bool) -> str:
    """The shopper-readable line: names only when the caller may see them."""
    if named and proof.friend_ids:
        first = proof.friend_ids[0]
        others = proof.friends_bought - 1
        return f"{first} bought this" if not others else f"{first} and {others} more friends bought this"
    return "a friend bought this" if proof.friends_bought == 1 else f"{proof.friends_bought} friends bought this"
