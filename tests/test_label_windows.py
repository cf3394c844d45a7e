"""Ranker training groups stacked from several label windows, each with candidates as of its own cut-off."""

from __future__ import annotations

from pathlib import Path

from features.dataset import load_dataset
from training.bundle import ITEM_META_COLUMNS
from training.params import ALSParams, BPRParams, RankerParams, TrainParams
from training.split import time_holdout
from training.twostage import evaluate_two_stage

FAST = TrainParams(als=ALSParams(factors=8, iterations=3), bpr=BPRParams(factors=8, iterations=5))


def _said(demo_dir: Path, windows: int) -> str:
    params = FAST.model_copy(update={"ranker": RankerParams(label_windows=windows)})
    data = load_dataset(demo_dir, params.weights.keys())
    holdout = time_holdout(data.events, params.split)
    said: list[str] = []
    evaluate_two_stage(data.events, data.items, holdout, params, ITEM_META_COLUMNS, said.append)
    return said[0]


def test_more_label_windows_give_more_training_groups(demo_dir: Path) -> None:
    one, three = _said(demo_dir, 1), _said(demo_dir, 3)
    assert "(1 label window(s))" in one
    assert "(3 label window(s))" in three
    groups = [int(text.split(": ")[1].split(" training")[0].replace(",", "")) for text in (one, three)]
    assert groups[1] > groups[0]
