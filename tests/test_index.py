"""Item indexes: the `pq` kind finds nearly what exact search finds, with exact scores, and survives a bundle."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from training.index import build_item_index, index_kind, index_like
from training.params import IndexParams


def _factors(rows: int, dim: int, seed: int) -> np.ndarray:
    """Factor-like vectors: a few strong directions, norms spread like popularity."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(rows, 8)) @ rng.normal(size=(8, dim)) + 0.3 * rng.normal(size=(rows, dim))
    return (base * rng.lognormal(0.0, 0.5, size=(rows, 1))).astype(np.float32)


@pytest.mark.parametrize("dim", [64, 65])  # BPR item factors carry a bias column: an odd dimension
def test_pq_recalls_the_exact_top_k_with_exact_scores(dim: int) -> None:
    items, users = _factors(6000, dim, 1), _factors(200, dim, 2)
    exact = build_item_index(items, IndexParams(kind="flat"))
    pq = build_item_index(items, IndexParams(kind="pq"))  # the default refine factor
    k = 100
    _, truth = exact.search(users, k)
    scores, found = pq.search(users, k)
    recall = np.mean([len(np.intersect1d(f, t)) / k for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95
    np.testing.assert_allclose(scores, np.einsum("ij,ikj->ik", users, items[found]), rtol=1e-4, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_pq_keeps_its_refine_factor_through_a_file(tmp_path: Path) -> None:
    items = _factors(2000, 16, 3)
    index = build_item_index(items, IndexParams(kind="pq", refine_factor=5))
    faiss.write_index(index, str(tmp_path / "items.faiss"))
    read = faiss.read_index(str(tmp_path / "items.faiss"))  # keep the owner: a downcast view does not own
    loaded = faiss.downcast_index(read)
    assert isinstance(loaded, faiss.IndexRefine)
    assert loaded.k_factor == 5
    built = index_like(read, _factors(2000, 17, 4))
    twin = faiss.downcast_index(built)
    assert isinstance(twin, faiss.IndexRefine)
    assert twin.k_factor == 5
    assert twin.d == 17


def test_kinds() -> None:
    assert index_kind(10_000, IndexParams()) == "flat"
    assert index_kind(100_000, IndexParams()) == "pq"
    flat = build_item_index(_factors(500, 8, 5), IndexParams(kind="flat"))
    twin = index_like(flat, _factors(500, 9, 6))
    assert isinstance(faiss.downcast_index(twin), faiss.IndexFlat)
