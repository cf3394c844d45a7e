"""Fitting the item-to-item single sources: BM25-weighted neighbours and EASE.

Each returns `features.served.ItemWeights`, a sparse items x items matrix that serving sums over a user's
history, so the service needs nothing of implicit or of the inversion. EASE (Steck, 2019) is the closed-form
item-item regression B = I - P / diag(P) with P = (X'X + lambda I)^-1; when the data has fewer users than
items, P comes from the users x users system instead (Woodbury), so a wide catalog costs little.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from features.served import ItemWeights

BM25_NEIGHBOURS = 200
BM25_K1 = 1.2
BM25_B = 0.75
EASE_MAX_ITEMS = 20_000  # the catalog size up to which EASE's dense item x item system is formed at all
EASE_KEEP = 1000  # weights kept per item row for serving (the largest in absolute value; as good as dense here)
EASE_LAMBDAS = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 3000.0)
EASE_DROPOUTS = (0.25, 0.5)  # tried at the best lambda: the dropout-regularized form
EASE_SECONDS_BUDGET = 60.0  # the lambda search is cut to what fits in about this much inversion time
_INVERT_SECONDS_AT_10K = 50.0  # one dense float32 inversion of 10k x 10k on this machine kind (2 cores)


def fit_bm25(user_items: sp.csr_matrix) -> ItemWeights:
    """implicit's BM25 item-item neighbours (K 200, K1 1.2, B 0.75) as a sparse weight matrix."""
    from implicit.nearest_neighbours import ItemItemRecommender, bm25_weight

    # BM25Recommender's own weighting, handed over as CSR (its fit passes COO on and implicit warns about it)
    weighted = bm25_weight(user_items.T.tocsr().astype(np.float32), K1=BM25_K1, B=BM25_B).T.tocsr()
    model = ItemItemRecommender(K=BM25_NEIGHBOURS)
    with threadpool_limits(1, "blas"):
        model.fit(weighted, show_progress=False)
    return ItemWeights(sp.csr_matrix(model.similarity, dtype=np.float32), binary=False)


def ease_lambdas(n_users: int, n_items: int) -> tuple[float, ...]:
    """The lambdas worth searching at this size: all of them while the inversions stay cheap; else the
    middle of the grid first, as many as fit in EASE_SECONDS_BUDGET; none past EASE_MAX_ITEMS."""
    if n_items > EASE_MAX_ITEMS or n_items < 2:
        return ()
    size = min(n_users, n_items)
    per_inversion = _INVERT_SECONDS_AT_10K * (size / 10_000) ** 3
    fits = int(EASE_SECONDS_BUDGET // max(per_inversion, 1e-3))
    if fits >= len(EASE_LAMBDAS):
        return EASE_LAMBDAS
    by_middle = sorted(EASE_LAMBDAS, key=lambda lam: abs(np.log(lam) - np.log(300.0)))
    return tuple(sorted(by_middle[: max(fits, 1)]))


class EaseSystem:
    """The Gram system of one binary user x item matrix, solved for any lambda."""

    def __init__(self, user_items: sp.csr_matrix) -> None:
        binary = user_items.tocsr().astype(np.float32)
        binary.data[:] = 1.0
        self.x = binary
        self.n_users, self.n_items = binary.shape
        self.wide = self.n_users < self.n_items
        with threadpool_limits(2, "blas"):
            gram = (binary @ binary.T) if self.wide else (binary.T @ binary)
        self.gram = np.asarray(gram.todense(), dtype=np.float64)

    def precision(self, lam: float, dropout: float = 0.0) -> np.ndarray:
        """P = (X'X + D)^-1, items x items (float32), with D = lam + dropout / (1 - dropout) * diag(X'X): plain
        EASE at dropout 0, and the dropout-regularized form (Steck, 2020) above it, where popular items are
        held back harder."""
        counts = np.asarray(self.x.sum(axis=0)).ravel() if self.wide else np.diag(self.gram)
        d = lam + dropout / (1.0 - dropout) * counts
        with threadpool_limits(2, "blas"):
            if not self.wide:
                return np.linalg.inv(self.gram + np.diag(d)).astype(np.float32)
            # Woodbury: (X'X + D)^-1 = D^-1 - D^-1 X' (I + X D^-1 X')^-1 X D^-1
            scaled = self.x.toarray() / d[None, :]  # X D^-1, users x items
            dense_x = self.x.toarray()
            inner = np.linalg.inv(np.eye(self.n_users) + scaled @ dense_x.T).astype(np.float32)
            out = -(scaled.T.astype(np.float32) @ (inner @ scaled.astype(np.float32)))
            out[np.diag_indices_from(out)] += (1.0 / d).astype(np.float32)
            result: np.ndarray = out
            return result

    def weights(self, lam: float, dropout: float = 0.0) -> np.ndarray:
        """Dense B: B[j, i] is how much a user's item j speaks for item i; zero diagonal."""
        p = self.precision(lam, dropout)
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        return b


def pruned(dense: np.ndarray, keep: int = EASE_KEEP) -> ItemWeights:
    """The `keep` largest weights (in absolute value) of every row, as a sparse matrix."""
    n = dense.shape[0]
    keep = min(keep, n)
    cols = np.argpartition(-np.abs(dense), keep - 1, axis=1)[:, :keep]
    rows = np.repeat(np.arange(n), keep)
    values = np.take_along_axis(dense, cols, axis=1).ravel()
    matrix = sp.csr_matrix((values, (rows, cols.ravel())), shape=dense.shape, dtype=np.float32)
    matrix.eliminate_zeros()
    return ItemWeights(matrix, binary=True)


def fit_ease(user_items: sp.csr_matrix, lam: float, dropout: float = 0.0) -> ItemWeights:
    return pruned(EaseSystem(user_items).weights(lam, dropout))
