"""Early stopping must not be credited with the order candidates were merged in."""

from __future__ import annotations

import numpy as np

from training.ranker import RankerData, shuffled_within_groups


def test_rows_are_permuted_within_their_own_group_only() -> None:
    sizes = np.asarray([5, 1, 7, 3], dtype=np.int64)
    group = np.repeat(np.arange(len(sizes)), sizes)
    features = np.column_stack([group, np.arange(len(group))]).astype(np.float32)
    data = RankerData(features, np.arange(len(group), dtype=np.int32), sizes)

    shuffled = shuffled_within_groups(data, seed=3)

    assert shuffled.group_sizes.tolist() == sizes.tolist()
    assert shuffled.features[:, 0].tolist() == group.tolist()  # every row stays in its group
    assert sorted(shuffled.features[:, 1].tolist()) == features[:, 1].tolist()
    assert (shuffled.labels == shuffled.features[:, 1]).all()  # labels travel with their rows
    assert shuffled.features[:, 1].tolist() != features[:, 1].tolist()  # the merge order is gone
    again = shuffled_within_groups(data, seed=3)
    assert np.array_equal(again.features, shuffled.features)  # deterministic per seed


def test_no_groups() -> None:
    empty = RankerData(np.empty((0, 2), np.float32), np.empty(0, np.int32), np.empty(0, np.int64))
    assert len(shuffled_within_groups(empty, seed=1).labels) == 0
