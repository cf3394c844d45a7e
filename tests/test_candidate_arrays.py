"""The request path's array forms agree with the plain definitions they replace, on any input.

`merge_candidates` (reciprocal rank fusion of the sources' lists), `cell_values` (a request's cells of a
user's row) and `friend_activity` (friends' recent activity per candidate) run per request in serving
and per user in training; each is checked here against a per-item loop that states the definition.
"""

from __future__ import annotations

from functools import partial
from itertools import pairwise

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.candidates import RRF_K, SOURCE_ORDER, merge_candidates, top_scores
from features.feed import Candidates
from features.ranking import SOURCE_FEATURES
from features.social_state import (
    COMMUNITY_CAP,
    OnlineCells,
    community_of,
    friend_activity,
    merged_cells,
    row_cells,
    sorted_unique,
)
from features.state import cell_values
from serving.social_proof import _bought

PROPERTY = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _merge_by_loop(lists: list[Candidates], union_size: int) -> tuple[np.ndarray, dict[str, np.ndarray],
                                                                      dict[str, np.ndarray], np.ndarray, np.ndarray]:
    fused: dict[int, float] = {}
    first: dict[int, tuple[float, int]] = {}
    for candidates in lists:
        source = SOURCE_ORDER.index(candidates.source)
        for rank, item in enumerate(candidates.items.tolist()):
            fused[item] = fused.get(item, 0.0) + 1.0 / (RRF_K + rank + 1)
            if item not in first or rank < first[item][0]:
                first[item] = (rank, source)
    order = sorted(fused, key=lambda i: (-fused[i], i))[:union_size]
    items = np.asarray(order, dtype=np.int64)
    position = {item: p for p, item in enumerate(order)}
    scores = {s: np.full(len(items), np.nan, dtype=np.float32) for s in SOURCE_FEATURES}
    ranks = {s: np.full(len(items), np.nan, dtype=np.float32) for s in SOURCE_FEATURES}
    for candidates in lists:
        name = candidates.source.value
        for rank, (item, score) in enumerate(zip(candidates.items.tolist(), candidates.scores.tolist(), strict=True)):
            p = position.get(item)
            if p is not None:
                scores[name][p] = score
                ranks[name][p] = rank + 1
    return (items, scores, ranks, np.asarray([first[i][1] for i in order], dtype=np.int64),
            np.asarray([fused[i] for i in order], dtype=np.float32))


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[Candidates]:
    sources = draw(st.lists(st.sampled_from(SOURCE_ORDER), unique=True, max_size=len(SOURCE_ORDER)))
    out = []
    for source in sources:
        items = draw(st.lists(st.integers(0, 40), unique=True, max_size=25))
        scores = draw(st.lists(st.floats(-5, 5, width=32), min_size=len(items), max_size=len(items)))
        out.append(Candidates(source, np.asarray(items, dtype=np.int64), np.asarray(scores, dtype=np.float32)))
    return out


@PROPERTY
@given(candidate_lists(), st.integers(0, 60))
def test_merge_is_the_per_item_fusion(lists: list[Candidates], union_size: int) -> None:
    got, want = merge_candidates(lists, union_size), _merge_by_loop(lists, union_size)
    np.testing.assert_array_equal(got[0], want[0])
    for name in SOURCE_FEATURES:
        np.testing.assert_array_equal(got[1][name], want[1][name])
        np.testing.assert_array_equal(got[2][name], want[2][name])
    np.testing.assert_array_equal(got[3], want[3])
    np.testing.assert_array_equal(got[4], want[4])


@st.composite
def matrices_and_cells(draw: st.DrawFn) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 30)))
    cells = draw(st.lists(st.tuples(st.integers(0, shape[0] - 1), st.integers(0, shape[1] - 1),
                                    st.floats(0.5, 9.0)), max_size=40))
    rows = np.asarray([c[0] for c in cells], dtype=np.int64)
    cols = np.asarray([c[1] for c in cells], dtype=np.int64)
    values = np.asarray([c[2] for c in cells], dtype=np.float64)
    form = draw(st.sampled_from(["canonical", "unsorted", "duplicates"]))
    if form == "canonical":
        matrix = sp.csr_matrix((values, (rows, cols)), shape=shape)
        matrix.sum_duplicates()
    else:  # built from raw arrays: columns in the given order, repeats kept (their cells sum)
        if form == "unsorted":
            keep = np.unique(rows * shape[1] + cols, return_index=True)[1]
            rows, cols, values = rows[keep][::-1], cols[keep][::-1], values[keep][::-1]
        order = np.argsort(rows, kind="stable")
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=shape[0]))])
        matrix = sp.csr_matrix((values[order], cols[order], indptr), shape=shape)
    one_user = draw(st.booleans())
    n = draw(st.integers(0, 30))
    user = draw(st.integers(-1, shape[0] - 1))
    want_rows = (np.full(n, user) if one_user else
                 np.asarray(draw(st.lists(st.integers(-1, shape[0] - 1), min_size=n, max_size=n)), dtype=np.int64))
    want_cols = np.asarray(draw(st.lists(st.integers(-1, shape[1] - 1), min_size=n, max_size=n)), dtype=np.int64)
    return matrix, want_rows.astype(np.int64), want_cols


@PROPERTY
@given(matrices_and_cells())
def test_cell_values_reads_the_cells(case: tuple[sp.csr_matrix, np.ndarray, np.ndarray]) -> None:
    matrix, rows, cols = case
    dense = matrix.toarray()  # duplicates summed
    want = np.asarray([dense[r, c] if r >= 0 and c >= 0 else 0.0 for r, c in zip(rows, cols, strict=True)])
    got = cell_values(matrix, rows, cols)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)


@st.composite
def friends_and_activity(draw: st.DrawFn) -> tuple[sp.csr_matrix, list[sp.csr_matrix], np.ndarray, np.ndarray]:
    users, items = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    ties = draw(st.lists(st.tuples(st.integers(0, users - 1), st.integers(0, users - 1)), max_size=20))
    sees = sp.csr_matrix((np.ones(len(ties)), ([a for a, _ in ties], [b for _, b in ties])), shape=(users, users))
    sees.sum_duplicates()
    matrices = []
    for _ in range(draw(st.integers(1, 3))):
        cells = draw(st.lists(st.tuples(st.integers(0, users - 1), st.integers(0, items - 1), st.integers(1, 40)),
                              max_size=30, unique_by=lambda c: (c[0], c[1])))
        matrices.append(sp.csr_matrix(([float(c[2]) for c in cells], ([c[0] for c in cells], [c[1] for c in cells])),
                                      shape=(users, items)))
    n = draw(st.integers(0, 20))
    rows = np.asarray(draw(st.lists(st.integers(-1, users - 1), min_size=n, max_size=n)), dtype=np.int64)
    wanted = np.asarray(draw(st.lists(st.integers(0, items - 1), min_size=n, max_size=n)), dtype=np.int64)
    return sees, matrices, rows, wanted


@PROPERTY
@given(friends_and_activity(), st.booleans())
def test_friend_activity_counts_weighs_and_dates_the_friends(
        case: tuple[sp.csr_matrix, list[sp.csr_matrix], np.ndarray, np.ndarray], weighted: bool) -> None:
    sees, matrices, rows, items = case
    since = (30.0, 10.0, -np.inf)
    weights = np.linspace(0.5, 2.0, sees.shape[0]) if weighted else None
    got = friend_activity(sees, [partial(row_cells, m) for m in matrices], rows, items, since,
                          [weights] * len(matrices))
    for matrix, activity in zip(matrices, got, strict=True):
        dense = matrix.toarray()
        for pair, (user, item) in enumerate(zip(rows.tolist(), items.tolist(), strict=True)):
            friends = sees.indices[sees.indptr[user] : sees.indptr[user + 1]] if user >= 0 else []
            cells = [(f, dense[f, item]) for f in friends if dense[f, item]]
            weight = {f: (1.0 if weights is None else weights[f]) for f, _ in cells}
            np.testing.assert_array_equal(activity.counts[pair], [sum(1 for _, v in cells if v >= t) for t in since])
            np.testing.assert_allclose(activity.weighted[pair],
                                       [sum(weight[f] for f, v in cells if v >= t) for t in since])
            assert activity.latest[pair] == max((v for _, v in cells), default=0.0)


@PROPERTY
@given(matrices_and_cells(), st.lists(st.integers(0, 5), max_size=8), st.lists(st.integers(0, 29), max_size=12))
def test_social_proof_reads_the_friends_purchases(case: tuple[sp.csr_matrix, np.ndarray, np.ndarray],
                                                  friends: list[int], items: list[int]) -> None:
    matrix = case[0]
    friends_idx = np.asarray([f for f in friends if f < matrix.shape[0]], dtype=np.int64)
    columns = np.asarray([i for i in items if i < matrix.shape[1]], dtype=np.int64)
    want = matrix[friends_idx][:, columns].toarray() > 0
    np.testing.assert_array_equal(_bought(matrix, friends_idx, columns), want)


@PROPERTY
@given(st.lists(st.integers(-3, 50), max_size=60), st.lists(st.integers(0, 50), unique=True, max_size=10))
def test_sorted_unique_and_the_community(values: list[int], first: list[int]) -> None:
    array = np.asarray(values, dtype=np.int32)
    got = sorted_unique(array)
    np.testing.assert_array_equal(got, np.unique(array))
    assert got.dtype == array.dtype
    users = 51
    cells = [(a % users, v % users) for a, v in pairwise(values)]
    sees = sp.csr_matrix((np.ones(len(cells)), ([a for a, _ in cells], [b for _, b in cells])), shape=(users, users))
    sees.sum_duplicates()
    friends = np.asarray(first, dtype=np.int32)
    people, weight = community_of(friends, sees)
    _, second, _ = row_cells(sees, friends)
    second = np.setdiff1d(np.unique(second), friends)[: max(COMMUNITY_CAP - len(friends), 0)]
    np.testing.assert_array_equal(people, np.concatenate([friends, second]))
    np.testing.assert_array_equal(weight, np.concatenate([np.ones(len(friends)), np.full(len(second), 0.5)]))


@PROPERTY
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]), min_size=1, max_size=40), st.integers(1, 10),
       st.integers(0, 2**40))
def test_top_k_is_the_same_over_the_positive_entries_alone(values: list[float], k: int, seed: int) -> None:
    scores = np.asarray(values, dtype=np.float32)  # few distinct values: many ties at the k-th
    blocked = np.random.default_rng(seed).random(len(scores)) < 0.2
    full = top_scores(scores, k, blocked | (scores <= 0))
    positive = np.flatnonzero(scores > 0)
    part = top_scores(scores[positive], k, blocked, positive)
    np.testing.assert_array_equal(full[0], part[0])
    np.testing.assert_array_equal(full[1], part[1])
    order = sorted((-float(scores[i]), i) for i in range(len(scores)) if scores[i] > 0 and not blocked[i])[:k]
    assert full[0].tolist() == [i for _, i in order]


@PROPERTY
@given(matrices_and_cells(), st.lists(st.tuples(st.integers(0, 7), st.integers(0, 29), st.integers(1, 90)),
                                      max_size=15), st.lists(st.integers(0, 7), unique=True, max_size=6))
def test_merged_cells_lay_the_online_cells_over_the_rows(case: tuple[sp.csr_matrix, np.ndarray, np.ndarray],
                                                         extra: list[tuple[int, int, int]], people: list[int]) -> None:
    matrix = case[0].copy()
    matrix.sum_duplicates()  # one stored cell per (row, column), as every state matrix holds them
    extra = [(p, c, v) for p, c, v in extra if p < matrix.shape[0] and c < matrix.shape[1]]
    cells = OnlineCells(np.asarray([p for p, _, _ in extra], dtype=np.int64),
                        np.asarray([c for _, c, _ in extra], dtype=np.int64),
                        np.asarray([float(v) for _, _, v in extra]))
    who = np.asarray([p for p in people if p < matrix.shape[0]], dtype=np.int64)
    want = {}
    dense = matrix.toarray()
    for k, person in enumerate(who.tolist()):
        for col in np.flatnonzero(dense[person]).tolist():
            want[(k, col)] = dense[person, col]
        for p, c, v in extra:
            if p == person:
                want[(k, c)] = max(want.get((k, c), -np.inf), v)
    owner, cols, values = merged_cells(matrix, cells, who)
    got = {(int(o), int(c)): float(v) for o, c, v in zip(owner, cols, values, strict=True)}
    assert len(got) == len(owner)  # one cell per (person, item)
    assert got == pytest.approx(want)
