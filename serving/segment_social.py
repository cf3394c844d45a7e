"""The social graph as segments read it: who reaches whom (friends, follows, shares, referrals, weighted
as `features.social` builds it), over the bundle's user idx, with friends-of and communities on top."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from features.social import SocialGraph

COMMUNITY_ROUNDS = 10


@dataclass(frozen=True, slots=True)
class ReachGraph:
    """users x users (bundle idx), weight of the tie from row (who reaches) to column (who is reached)."""

    reach: sp.csr_matrix

    def friends_of(self, users: np.ndarray) -> np.ndarray:
        """Per user, the summed weight of the ties that reach them from `users` (bool or idx array)."""
        source = np.zeros(self.reach.shape[0], dtype=np.float64)
        source[users] = 1.0
        reached: np.ndarray = np.asarray(self.reach.T @ source).ravel()
        return reached

    def communities(self, rounds: int = COMMUNITY_ROUNDS) -> np.ndarray:
        """A community label per user by weighted label propagation over the undirected ties (synchronous,
        ties broken by the smaller label, so the result is deterministic)."""
        both = (self.reach + self.reach.T).tocoo()
        n = both.shape[0]
        labels = np.arange(n, dtype=np.int64)
        if both.nnz == 0:
            return labels
        rows, cols, weight = both.row.astype(np.int64), both.col.astype(np.int64), both.data
        for _ in range(rounds):
            neighbour = labels[cols]
            key = rows * n + neighbour
            order = np.argsort(key, kind="stable")
            key_sorted = key[order]
            starts = np.flatnonzero(np.concatenate([[True], key_sorted[1:] != key_sorted[:-1]]))
            totals = np.add.reduceat(weight[order], starts)
            node, label = key_sorted[starts] // n, key_sorted[starts] % n
            # the heaviest label per node; among equals the smallest (lexsort: last key is primary)
            pick = np.lexsort((label, -totals, node))
            first = np.concatenate([[True], node[pick][1:] != node[pick][:-1]])
            new = labels.copy()
            new[node[pick][first]] = label[pick][first]
            if np.array_equal(new, labels):
                break
            labels = new
        return labels


def reach_graph(graph: SocialGraph, n_users: int) -> ReachGraph:
    """The bundle's social graph over bundle user idx (its first `n_users` ids are the bundle's users; ties
    to anyone else, known only from the social table or shares, are left out)."""
    src = np.repeat(np.arange(graph.n_users, dtype=np.int64), np.diff(graph.indptr))
    dst = graph.indices.astype(np.int64)
    keep = (src < n_users) & (dst < n_users)
    reach = sp.csr_matrix((graph.weight[keep].astype(np.float64), (src[keep], dst[keep])), shape=(n_users, n_users))
    reach.sum_duplicates()
    return ReachGraph(reach)
