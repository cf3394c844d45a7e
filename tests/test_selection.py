"""Choosing the served pipeline: a ranker without validation evidence is not served, and what evaluation
scores for a user is what batch `recommend` and the feed endpoint answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import TINY_ALS
from fastapi.testclient import TestClient

from features.popularity import ItemPopularity
from features.served import Pipeline
from features.vocab import Vocabulary
from serving.app import create_app
from serving.settings import ServingSettings
from sharefeed.cli import main
from training.als import Factors
from training.bundle import Bundle, load_bundle
from training.evaluate import Targets
from training.params import SplitParams, TrainParams
from training.pipeline import train
from training.selection import (
    Candidate,
    PartFn,
    ValidationSet,
    als_part,
    fused_personal,
    lists_for,
    part_personal,
    relevant_targets,
    scored_part,
    select_pipeline,
)
from training.settings import TrainingSettings


def _two_clusters(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Users of two tastes (items 0-19 and 20-39): what they hold out is more of their own cluster."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for u in range(120):
        base = 0 if u % 2 == 0 else 20
        items = rng.choice(20, 8, replace=False) + base
        fit += [(f"u{u}", f"i{i:02d}") for i in items[:6]]
        held += [(f"u{u}", f"i{i:02d}") for i in items[6:]]
    ts = pd.Timestamp("2026-01-01", tz="UTC")
    make = lambda rows: pd.DataFrame(rows, columns=["user_id", "item_id"]).assign(  # noqa: E731
        event_type="purchase", ts=ts)
    return make(fit), make(held)


def _validation(fit: pd.DataFrame, held: pd.DataFrame) -> ValidationSet:
    from features.interactions import user_items_matrix
    from training.window import bought_matrix

    params = TrainParams()
    users, items = Vocabulary.from_ids(fit["user_id"]), Vocabulary.from_ids(fit["item_id"])
    repeatable = np.zeros(len(items), dtype=bool)
    history = user_items_matrix(fit, users, items, params.weights)
    popularity = ItemPopularity(popular=np.ones(len(items), np.float32),
                                trending=np.linspace(1, 0.5, len(items)).astype(np.float32))
    return ValidationSet(users, items, history, bought_matrix(fit, users, items), repeatable, popularity,
                         relevant_targets(fit, held, users, items, repeatable))


def test_a_ranker_that_does_not_beat_the_best_single_source_is_not_served() -> None:
    valid = _validation(*_two_clusters())
    rng = np.random.default_rng(1)
    noise = {row: rng.permutation(len(valid.items)) for row in range(len(valid.users))}
    selection = select_pipeline(valid, TrainParams(), lambda _: None, ranker_lists=noise)
    assert selection.chosen.pipeline is not Pipeline.RANKER
    assert float(selection.comparison["ranker_ci_low"]) <= 1.0
    assert "not served" in selection.note


def test_a_ranker_that_clearly_wins_on_validation_is_served() -> None:
    valid = _validation(*_two_clusters())
    perfect = {int(row): items for row, items in zip(valid.targets.user_idx, valid.targets.items, strict=True)}
    selection = select_pipeline(valid, TrainParams(), lambda _: None, ranker_lists=perfect)
    assert selection.chosen == Candidate("ranker", Pipeline.RANKER)
    assert float(selection.comparison["ranker_ci_low"]) > 1.0


def test_single_sources_learn_the_clusters() -> None:
    valid = _validation(*_two_clusters())
    selection = select_pipeline(valid, TrainParams(), lambda _: None)
    assert selection.chosen.pipeline in {Pipeline.EASE, Pipeline.ITEM_KNN, Pipeline.ALS}
    assert selection.scores[selection.chosen.name] > 1.5 * selection.scores["popular"]


@pytest.fixture(scope="module", params=[("time", "auto"), ("random", "fused"), ("random", "als")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def served_bundle(request: pytest.FixtureRequest, demo_dir: Path, training_settings: TrainingSettings,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    protocol, serve = request.param
    out = tmp_path_factory.mktemp("served") / "bundle"
    train(demo_dir, out, TrainParams(als=TINY_ALS, split=SplitParams(protocol=protocol), serve=serve),
          training_settings, say=lambda _: None)
    return out


def _evaluated(bundle: Bundle, users: list[str]) -> list[np.ndarray]:
    """The lists evaluation composes for `users` from the bundle's own arrays, by `training.selection`."""
    categories = bundle.item_meta["category"].fillna("").to_numpy(dtype=object)
    repeatable = bundle.manifest.repurchase.repeatable_mask(categories)
    unavailable = (bundle.item_meta["in_stock"] == False).fillna(False).to_numpy(dtype=bool)  # noqa: E712
    rows = bundle.users.indexes(users)
    targets = Targets(np.asarray(users, dtype=object), rows, [np.empty(0, np.int64)] * len(users),
                      np.ones(len(users), np.int64), "any", 0.0, 0.0)
    valid = ValidationSet(bundle.users, bundle.items, bundle.state.pair_weight, bundle.bought, repeatable,
                          bundle.popularity, targets, unavailable)
    served = bundle.manifest.served
    factors = Factors(bundle.user_factors, bundle.item_factors, 0.0, 1.0)

    def part(kind: Pipeline) -> PartFn:
        return als_part(valid, factors) if kind is Pipeline.ALS else scored_part(valid, kind, bundle.item_weights)

    pipeline = Pipeline(served.pipeline)
    personal = (fused_personal([part(Pipeline(k)) for k in served.parts], served.weights) if pipeline is Pipeline.FUSED
                else part_personal(part(pipeline)))
    return lists_for(valid, personal, pipeline, served.exclude_seen)


def test_the_evaluated_list_is_the_recommended_line_and_the_served_feed(served_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(served_bundle)
    assert bundle.manifest.served.pipeline != "ranker", "this test composes single-source and fused lists"
    users = [bundle.users.id_of(i) for i in range(0, len(bundle.users), max(1, len(bundle.users) // 40))]
    users_file = tmp_path / "users.txt"
    users_file.write_text("\n".join(users) + "\n")
    out = tmp_path / "recs.jsonl"
    result = CliRunner().invoke(main, ["recommend", "--bundle", str(served_bundle), "--users", str(users_file),
                                       "-n", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = {row["user_id"]: row["items"] for row in map(orjson.loads, out.read_bytes().splitlines())}
    with TestClient(create_app(ServingSettings(), bundle=bundle)) as client:
        feeds = {u: [i["item_id"] for i in client.get(f"/v1/users/{u}/feed", params={"n": 20}).json()["items"]]
                 for u in users}
    table = {u: [bundle.items.id_of(int(i)) for i in items]
             for u, items in zip(users, _evaluated(bundle, users), strict=True)}
    assert table == lines
    assert feeds == lines
