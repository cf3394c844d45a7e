"""The propensity model of segments: fitted from data (a known answer both ways round), carried by the bundle,
computed alike by training and serving, and optional: a bundle written before it answers with the fixed
formula."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features import propensity
from features.dataset import load_dataset
from features.ledger import ControlLedger
from features.propensity import DUE_BINS, FEATURE_NAMES, PROPENSITY_VERSION, PropensityContext, PropensityModel
from serving.privacy import Privacy
from serving.segment_schemas import PropensityQuery
from serving.segments import SegmentEngine, best_unique
from training.bundle import ITEM_META_COLUMNS, MANIFEST, Bundle, load_bundle
from training.params import ALSParams, BPRParams, PropensityParams, TrainParams
from training.pipeline import TrainResult
from training.propensity import fit_logistic, fit_propensity
from training.window import Window, fit_window

DAY0 = pd.Timestamp("2026-01-01", tz="UTC")
CUT = DAY0 + pd.Timedelta(days=30)
END = DAY0 + pd.Timedelta(days=41)
PARAMS = TrainParams(als=ALSParams(factors=8, iterations=4), bpr=BPRParams(factors=8, iterations=5),
                     propensity=PropensityParams(min_positives=3, kinds=("category",)))
USERS = [f"u{k:02d}" for k in range(80)]
TEA_HISTORY = set(USERS[:40])  # bought tea before the cut; the others bought soap


def _shop(rebuy: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """80 users, 40 with a tea history and 40 with a soap history (and views of both). In the label window
    25 users of one group and 2 of the other buy each category: with `rebuy` the group with its history,
    else the other one."""
    rng = np.random.default_rng(5)
    catalog = pd.DataFrame({"item_id": [f"t{k}" for k in range(8)] + [f"s{k}" for k in range(8)],
                            "category": ["tea"] * 8 + ["soap"] * 8})
    rows: list[tuple[str, str, str, pd.Timestamp]] = []

    def add(user: str, kind: str, event: str, start: float, end: float) -> None:
        day = DAY0 + pd.Timedelta(days=float(rng.uniform(start, end)))
        rows.append((user, f"{kind}{rng.integers(8)}", event, day))

    for k, user in enumerate(USERS):
        own, other = ("t", "s") if user in TEA_HISTORY else ("s", "t")
        for _ in range(1 + k % 3):
            add(user, own, "purchase", 0, 29)
        add(user, own, "view", 0, 29)
        add(user, other, "view", 0, 29)
    for kind, own_group, other_group in (("t", USERS[:40], USERS[40:]), ("s", USERS[40:], USERS[:40])):
        buyers = (own_group[:25] + other_group[-2:]) if rebuy else (other_group[:25] + own_group[-2:])
        for user in buyers:
            add(user, kind, "purchase", 30, 40)
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "ts"])
    events["ts"] = events["ts"].astype("datetime64[ns, UTC]")
    return events.sort_values("ts", kind="stable").reset_index(drop=True), catalog


def _fit(rebuy: bool) -> tuple[Window, PropensityModel]:
    events, catalog = _shop(rebuy)
    window = fit_window(events, catalog, PARAMS, CUT, ITEM_META_COLUMNS)
    models = fit_propensity(window, events, CUT, END, PARAMS.propensity, say=lambda _: None)
    return window, models["category"]


def _tea_scores(window: Window, model: PropensityModel) -> pd.Series:
    context = PropensityContext(window.state, window.models.als_users, window.models.als_items)
    tea = np.flatnonzero(np.asarray(window.state.item_category) == window.categories.index("tea"))
    everyone = np.arange(len(window.users))
    return pd.Series(model.probability(context.features(context.target(tea), everyone)), index=window.users.ids)


@pytest.mark.parametrize("rebuy", [True, False])
def test_the_weights_are_learnt_from_the_validation_window(rebuy: bool) -> None:
    window, model = _fit(rebuy)
    assert model.usable()
    assert model.targets == 2
    assert model.positives == 2 * 27
    scores = _tea_scores(window, model)
    # tea drinkers who buy tea again: they come first; soap buyers who switch to tea: then they do (fixed
    # weights could pass one of the two cases, not both)
    expected_group = TEA_HISTORY if rebuy else set(USERS) - TEA_HISTORY
    assert set(scores.nlargest(25).index) <= expected_group
    inside = scores.index.isin(sorted(expected_group))
    assert scores[inside].mean() > 3 * scores[~inside].mean()


def test_negative_sampling_is_corrected_in_the_intercept() -> None:
    """Keeping a tenth of the negatives multiplies the odds by ten; the stored model undoes it."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200_000, len(FEATURE_NAMES)))
    y = rng.random(len(x)) < 1.0 / (1.0 + np.exp(-(-4.0 + x[:, 0])))
    kept = y | (rng.random(len(x)) < 0.1)
    model = fit_logistic(x[kept], y[kept], 0.1, 1.0, "category", 7.0, 1)
    weights = np.asarray(model.coef) / np.asarray(model.scale)
    intercept = model.intercept - float(np.asarray(model.mean) @ weights)  # on the raw features
    assert intercept == pytest.approx(-4.0, abs=0.15)
    assert weights[0] == pytest.approx(1.0, abs=0.1)
    assert model.probability(np.zeros((1, len(FEATURE_NAMES))))[0] == pytest.approx(1 / (1 + np.exp(4.0)), rel=0.15)


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


def _top_category(bundle: Bundle) -> tuple[str, np.ndarray]:
    codes = np.asarray(bundle.state.item_category)
    buyers = pd.Series(np.asarray(bundle.state.item_buyers)).groupby(codes).sum().drop(-1, errors="ignore")
    code = int(buyers.idxmax())
    return bundle.manifest.categories[code], np.flatnonzero(codes == code)


def test_the_bundle_carries_the_model(trained: TrainResult, bundle: Bundle) -> None:
    written = trained.manifest.propensity
    assert "category" in written
    assert written["category"].usable()
    assert bundle.manifest.propensity == written
    on_disk = json.loads((trained.bundle_path / MANIFEST).read_text())["propensity"]["category"]
    assert on_disk["features"] == list(FEATURE_NAMES)
    assert on_disk["coef"] == written["category"].coef


def test_serving_scores_with_the_features_training_computes(demo_dir: Path, bundle: Bundle, tmp_path: Path) -> None:
    """The engine (bundle loaded from disk, its own caches) and a training window built from the same events
    as of the same cut-off compute the same features, and the served score is the model's probability."""
    data = load_dataset(demo_dir, PARAMS.weights.keys())
    window = fit_window(data.events, data.items, PARAMS, bundle.state.cutoff, ITEM_META_COLUMNS, data.social)
    assert np.array_equal(window.users.ids, bundle.users.ids)
    assert np.array_equal(window.items.ids, bundle.items.ids)
    training = PropensityContext(window.state, bundle.user_factors, bundle.item_factors)  # the bundle's ALS
    engine = SegmentEngine(bundle)
    category, items = _top_category(bundle)
    members = engine.evaluate(PropensityQuery(kind="propensity", category=category, size=60),
                              Privacy(ControlLedger(tmp_path / "log"), None))
    assert len(members.user_idx) == 60

    served = engine.propensity_context()
    features = training.features(training.target(items), members.user_idx)
    np.testing.assert_allclose(served.features(served.target(items), members.user_idx), features, rtol=1e-6)
    assert np.isfinite(features).all()
    # the columns are what their names say, and take real values
    bought = np.asarray(bundle.state.pair_purchases.tocsc()[:, items].sum(axis=1)).ravel()[members.user_idx]
    np.testing.assert_allclose(features[:, FEATURE_NAMES.index("user_target_purchases_log")], np.log1p(bought))
    assert bought.max() > 0
    events = np.asarray(bundle.state.user_type_counts).sum(axis=1)[members.user_idx]
    np.testing.assert_allclose(features[:, FEATURE_NAMES.index("user_events_log")], np.log1p(events))
    # people the user sees who bought the category in the week before the newest event
    last = bundle.state.pair_last_purchase.tocsc()[:, items].max(axis=1).toarray().ravel()
    recent = (last > 0) & (last >= served.reference - 7 * 86_400)
    friends = np.asarray(bundle.state.user_sees @ recent.astype(float)).ravel()
    assert friends.max() > 0
    everyone = np.arange(len(bundle.users))
    column = FEATURE_NAMES.index("user_target_friends_bought_7d")
    np.testing.assert_allclose(served.features(served.target(items), everyone)[:, column], np.log1p(friends))
    # reorder timing: some category of the demo is bought again, so has an interval and due users
    codes = np.asarray(bundle.state.item_category)
    assert any(served.target(np.flatnonzero(codes == code)).due.any() for code in np.unique(codes[codes >= 0]))
    model = bundle.manifest.propensity["category"]
    np.testing.assert_allclose(members.scores, model.probability(features), rtol=1e-5)
    # and the segment is the model's best 60 of all users (retrieval reaches them)
    best = model.probability(training.features(training.target(items), everyone))
    assert len(set(np.argsort(-best)[:60].tolist()) & set(members.user_idx.tolist())) >= 57


def test_features_and_scores_do_not_depend_on_the_block_size(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Features are computed FEATURE_ROWS users at a time, and serving scores block by block: any block size
    gives the same columns (the ALS pair up to float32 rounding) and the same probabilities."""
    context = PropensityContext(bundle.state, bundle.user_factors, bundle.item_factors)
    target = context.target(_top_category(bundle)[1])
    rows = np.arange(len(bundle.users))[::-1].copy()  # any order of any users
    model = bundle.manifest.propensity["category"]
    monkeypatch.setattr(propensity, "FEATURE_ROWS", len(rows) + 1)  # one block
    whole = context.features(target, rows)
    monkeypatch.setattr(propensity, "FEATURE_ROWS", 7)  # many blocks, the last one short
    assert len(rows) % 7
    np.testing.assert_allclose(context.features(target, rows), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(context.probability(model, target, rows), model.probability(whole), rtol=1e-5)


@pytest.mark.parametrize("als_max_weight", [0.9, -0.9, 3.0])
def test_skipping_rows_that_cannot_reach_the_top_changes_no_answer(bundle: Bundle, als_max_weight: float) -> None:
    """`best_probability` computes the ALS max column only for rows whose logit bounds reach the top n: the
    n best (ids and probabilities) are those of scoring every row, with the ALS max column weighing either
    way (the same ids, the probabilities up to float32 rounding); and rows are skipped, so the check can fail."""
    context = PropensityContext(bundle.state, bundle.user_factors, bundle.item_factors)
    target = context.target(_top_category(bundle)[1])
    rows = np.arange(len(bundle.users))
    fitted = bundle.manifest.propensity["category"]
    coef = list(fitted.coef)
    coef[propensity.ALS_MAX] = als_max_weight
    model = fitted.model_copy(update={"coef": coef})
    skipped = 0
    for n in (1, 5, 40, len(rows) // 3):
        kept, scores = context.best_probability(model, target, rows, n)
        skipped += len(rows) - len(kept)
        np.testing.assert_allclose(scores, context.probability(model, target, kept), rtol=1e-5)
        every = best_unique(rows, context.probability(model, target, rows), n, None)
        found = best_unique(kept, scores, n, None)
        np.testing.assert_array_equal(found[0], every[0])
        np.testing.assert_allclose(found[1], every[1], rtol=1e-5)  # the ALS pair up to float32 rounding
    assert skipped > 0


def test_a_bundle_without_the_model_answers_with_the_fixed_formula(bundle: Bundle, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(bundle.path, old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["propensity"]  # written before the model existed
    (old / MANIFEST).write_text(json.dumps(manifest))
    loaded = load_bundle(old)
    assert loaded.manifest.propensity == {}
    category, items = _top_category(loaded)
    members = SegmentEngine(loaded).evaluate(PropensityQuery(kind="propensity", category=category, size=50),
                                             Privacy(ControlLedger(tmp_path / "log"), None))
    assert len(members.user_idx) == 50
    # standardised ALS (buyer-weighted mean of the category's top 50 items) + 2 log(1 + purchases) + 2 x a
    # 30-day half-life on the last one, the best 50 of all users
    w = np.asarray(loaded.state.item_buyers)[items].astype(np.float64) + 1.0
    order = np.argsort(-w, kind="stable")[:50]
    query = (w[order, None] / w[order].sum() * loaded.item_factors[items[order]]).sum(axis=0)
    als = loaded.user_factors.astype(np.float64) @ query
    past = np.asarray(loaded.state.pair_purchases.tocsc()[:, items].sum(axis=1)).ravel()
    last = loaded.state.pair_last_purchase.tocsc()[:, items].max(axis=1).toarray().ravel()
    days = np.where(past > 0, (loaded.state.cutoff_seconds - last) / 86_400, np.inf)
    recency = np.where(np.isfinite(days), 0.5 ** (np.clip(days, 0, None) / 30), 0.0)
    full = (als - als.mean()) / als.std() + 2 * np.log1p(past) + 2 * recency
    assert members.scores[0] == pytest.approx(float(full.max()), rel=1e-3)
    assert set(np.argsort(-full)[:45].tolist()) <= set(members.user_idx.tolist())


def test_a_model_fitted_on_other_features_is_not_used(bundle: Bundle) -> None:
    model = bundle.manifest.propensity["category"]
    stale = model.model_copy(update={"version": model.version + 1})
    other = model.model_copy(update={"features": [*model.features[:-1], "something_else"]})
    assert not stale.usable()
    assert not other.usable()
    manifest = bundle.manifest.model_copy(update={"propensity": {"category": stale}})
    engine = SegmentEngine(Bundle(**{**{f: getattr(bundle, f) for f in Bundle.__slots__}, "manifest": manifest}))
    assert engine.propensity_model("category") is None
    assert SegmentEngine(bundle).propensity_model("category") is not None


def test_probability_of_an_extreme_logit_neither_overflows_nor_loses_the_order() -> None:
    # a model fitted on very little data can have huge weights: the logistic must stay finite and ordered
    n = len(FEATURE_NAMES)
    model = PropensityModel(version=PROPENSITY_VERSION, kind="category", features=list(FEATURE_NAMES),
                            mean=[0.0] * n, scale=[1.0] * n, coef=[400.0] + [0.0] * (n - 1), intercept=0.0,
                            label_days=30.0, rows=10, positives=2, targets=1)
    x = np.zeros((3, n), dtype=np.float32)
    x[:, 0] = [-5.0, -2.0, 3.0]  # logits -2000, -800, 1200
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = model.probability(x)
    assert np.all(np.isfinite(p))
    assert p[2] == 1.0
    assert p[0] <= p[1] < p[2]


def _reorder_shop() -> tuple[pd.DataFrame, pd.DataFrame, dict[str, list[str]]]:
    """60 users who reorder tea every 10 days, in three groups of 20 by when they last bought it (as of day
    30): 11.4 days before (`due`), 2.4 (`early`) and 19.4 (`late`); 20 more only looked at tea. In the label
    window (days 30-35) the due group buys tea again."""
    groups = {"due": (8.5, 18.5), "early": (17.5, 27.5), "late": (0.5, 10.5)}
    users = {name: [f"{name}{k:02d}" for k in range(20)] for name in [*groups, "viewer"]}
    catalog = pd.DataFrame({"item_id": ["tea", "soap"], "category": ["tea", "soap"]})
    rows = [(user, "tea", "purchase", day) for name, days in groups.items() for user in users[name] for day in days]
    rows += [(user, "tea", "view", 3.0) for user in users["viewer"]]
    rows += [(user, "soap", "purchase", 5.0 + k % 7) for k, user in enumerate(itertools.chain(*users.values()))]
    rows += [(users["viewer"][0], "soap", "view", 29.9)]  # the newest event: recency is measured from it
    rows += [(user, "tea", "purchase", 31.0) for user in users["due"]]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "day"])
    events["ts"] = (DAY0 + pd.to_timedelta(events.pop("day"), unit="D")).astype("datetime64[ns, UTC]")
    return events.sort_values("ts", kind="stable").reset_index(drop=True), catalog, users


def test_due_columns_count_reorders_by_the_targets_interval() -> None:
    events, catalog, users = _reorder_shop()
    window = fit_window(events, catalog, PARAMS, CUT, ITEM_META_COLUMNS)
    context = PropensityContext(window.state, window.models.als_users, window.models.als_items)
    tea = context.target(np.flatnonzero(np.asarray(window.state.item_category) == window.categories.index("tea")))
    assert tea.interval_days == pytest.approx(10.0)
    # every tea buyer bought it on two occasions: a repeat share of 1, so each column counts items
    # recent intent: the last touch of tea on a 3-day half-life (the early group bought it 2.4 days ago)
    early = context.features(tea, window.users.indexes(users["early"]))
    np.testing.assert_allclose(early[:, FEATURE_NAMES.index("user_target_touch_recency_3d")], 0.5 ** (2.4 / 3))
    expected = {"due": "now", "early": "early", "late": "late", "viewer": None}
    for group, due_bin in expected.items():
        rows = window.users.indexes(users[group])
        features = context.features(tea, rows)
        for name in DUE_BINS:
            column = features[:, FEATURE_NAMES.index(f"user_target_due_{name}")]
            np.testing.assert_array_equal(column, 1.0 if name == due_bin else 0.0, err_msg=f"{group} {name}")
    # soap was bought on one occasion by everyone: no interval, no due counts
    soap = context.target(np.flatnonzero(np.asarray(window.state.item_category) == window.categories.index("soap")))
    assert np.isnan(soap.interval_days)
    assert not soap.due.any()


def test_the_model_ranks_the_users_who_are_due_first() -> None:
    events, catalog, users = _reorder_shop()
    window = fit_window(events, catalog, PARAMS, CUT, ITEM_META_COLUMNS)
    model = fit_propensity(window, events, CUT, END, PARAMS.propensity, say=lambda _: None)["category"]
    assert model.coef[FEATURE_NAMES.index("user_target_due_now")] > 0
    scores = _tea_scores(window, model)
    assert set(scores.nlargest(20).index) == set(users["due"])


def test_a_model_of_the_first_feature_set_falls_back_to_the_fixed_formula(bundle: Bundle) -> None:
    """Bundles written before the reorder timing columns carry version 1 and its 15 features."""
    first = [f for f in FEATURE_NAMES if not f.startswith("user_target_due_")]
    n = len(first)
    old = PropensityModel(version=1, kind="category", features=first, mean=[0.0] * n, scale=[1.0] * n,
                          coef=[0.1] * n, intercept=-3.0, label_days=6.0, rows=100, positives=10, targets=2)
    assert not old.usable()
    manifest = bundle.manifest.model_copy(update={"propensity": {"category": old}})
    engine = SegmentEngine(Bundle(**{**{f: getattr(bundle, f) for f in Bundle.__slots__}, "manifest": manifest}))
    assert engine.propensity_model("category") is None
