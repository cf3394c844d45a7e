"""`sharefeed train`: data directory -> validated events -> holdout evaluation -> refit -> bundle -> MLflow.

Reads top to bottom as the stages run. On a time holdout the two-stage recommender (candidates + LambdaRank)
is measured against the baselines on the same users (`training.twostage`); then every model is refit on all
the data as of "now", so the served bundle knows the latest events.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.attribution import attribute
from features.copurchase import bought_together
from features.dataset import Dataset, load_dataset
from features.popularity import item_popularity
from features.propensity import PropensityModel
from features.ranking import FEATURE_NAMES
from features.served import ItemWeights, Pipeline
from features.social import build_social_graph
from features.vocab import Vocabulary
from training import registry, tracking
from training.als import Factors
from training.bundle import (
    ITEM_META_COLUMNS,
    SCHEMA_VERSION,
    BundleContents,
    DataWindow,
    HoldoutInfo,
    Manifest,
    ModelInfo,
    ServedInfo,
    write_bundle,
)
from training.crossfit import cross_fit
from training.evaluate import (
    CURVE_K,
    EvalReport,
)
from training.index import build_item_index, index_kind
from training.params import TrainParams
from training.replay import replay_lines, run_replay, serving_ranker
from training.selection import Candidate, Selection, select_pipeline, validation_set
from training.settings import TrainingSettings
from training.sources import fit_bm25, fit_ease
from training.split import Holdout, choose_protocol, protocol_holdout
from training.twostage import UNION_SIZE, TwoStageResult, blank_social, evaluate_two_stage, ranked_rows
from training.window import (
    bought_matrix,
    candidate_rows,
    fit_window,
)

RECENT_ITEMS = 50  # per user, kept in the bundle for explanations and history-based candidates
FEATURE_SET = ("user_items:summed_weights", "popular:distinct_users", "trending:decayed_weights",
               "repurchase:category_rate", *ITEM_META_COLUMNS, *FEATURE_NAMES)


@dataclass(slots=True)
class StageClock:
    """Wall time per stage, reported as it goes (long steps show progress) and logged to MLflow."""

    say: Callable[[str], None]
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"[{name}] ...")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.say(f"[{name}] done in {self.seconds[name]:.1f}s")


@dataclass(frozen=True, slots=True)
class TrainResult:
    bundle_path: Path
    manifest: Manifest
    report: EvalReport
    summary: pd.DataFrame
    rejects_path: Path
    run_id: str
    stage_seconds: dict[str, float]
    model_version: int  # this bundle's version of the registered model (settings.registered_model)


def _recent(events: pd.DataFrame, users: Vocabulary, items: Vocabulary, weights: dict[str, float],
            cap: int) -> sp.csr_matrix:
    """Each user's latest `cap` items with a positive signal, valued by the time of the last one."""
    positive = events.loc[events["event_type"].map(weights).fillna(0.0) > 0, ["user_id", "item_id", "ts"]]
    last = positive.groupby(["user_id", "item_id"], sort=False)["ts"].max().reset_index()
    last = last.sort_values("ts", ascending=False, kind="stable")
    last = last.loc[last.groupby("user_id", sort=False).cumcount() < cap]
    rows, cols = users.indexes(last["user_id"]), items.indexes(last["item_id"])
    seconds = last["ts"].astype("int64").to_numpy() / 1e9
    keep = (rows >= 0) & (cols >= 0)
    return sp.csr_matrix((seconds[keep], (rows[keep], cols[keep])), shape=(len(users), len(items)))


def _select_on_holdout(data: Dataset, holdout: Holdout, params: TrainParams, clock: StageClock,
                       say: Callable[[str], None], two_stage: TwoStageResult | None = None
                       ) -> tuple[Selection, str | None]:
    """Score every pipeline on the holdout's users and choose. Under `time` the ranker is the two-stage one
    (`two_stage`); otherwise a ranker is cross-fitted on the holdout's own pairs (`training.crossfit`).
    Returns the selection and, without a time window, the cross-fitted ranker for the bundle."""
    train = holdout.train
    if two_stage is not None:  # the window the ranker was measured on: its vocabularies and fitted ALS
        window = two_stage.test_window
    else:
        with clock.stage("fit on the holdout training part"):
            window = fit_window(train, data.items, params, train["ts"].max() + pd.Timedelta(1, "ns"),
                                ITEM_META_COLUMNS, data.social)
    valid = validation_set(train, holdout.test, window.users, window.items, window.item_meta, window.policy, params)
    say(f"selection: {len(valid.targets.user_ids):,} users, targets {valid.targets.target_kind}")
    als_fits = {"als": Factors(window.models.als_users, window.models.als_items, params.als.regularization,
                               params.als.alpha)}
    ranker_text: str | None = None
    if two_stage is not None:
        known = [str(u) for u, row in zip(valid.targets.user_ids, valid.targets.user_idx, strict=True) if row >= 0]
        rows = candidate_rows(window, known, params, UNION_SIZE)
        if not params.ranker.social:
            blank_social(rows)
        ranked = ranked_rows(rows, two_stage.rankers["ranker"].predict(rows.features))
        ranker_lists: dict[int, np.ndarray] | None = {
            int(r): items_ for r, items_ in zip(rows.user_idx.tolist(), ranked, strict=True)}
    else:
        with clock.stage("cross-fitted ranker"):
            crossed = cross_fit(window, holdout.test, valid.targets, params, say)
        ranker_lists = crossed.lists if crossed is not None else None
        ranker_text = crossed.ranker.to_string() if crossed is not None else None
    with clock.stage("pipeline selection"):
        return select_pipeline(valid, params, say, ranker_lists, als_fits), ranker_text


def _served_item_weights(chosen: Candidate, history: sp.csr_matrix) -> ItemWeights | None:
    """The item-to-item weights of a served neighbour or EASE pipeline (or fused part), refit on all the data."""
    kinds = set(chosen.parts) | {chosen.pipeline}
    ease_lambda = chosen.ease_lambda
    if Pipeline.ITEM_KNN in kinds:
        return fit_bm25(history)
    if Pipeline.EASE in kinds:
        assert ease_lambda is not None
        return fit_ease(history, ease_lambda, chosen.ease_dropout)
    return None


def _feature_set_digest(params: TrainParams) -> str:
    parts = [*FEATURE_SET, str(sorted(params.weights.items())), params.als.confidence_scale,
             str(params.popularity.trending_half_life_days)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _load(data_dir: Path, params: TrainParams, rejects_path: Path, clock: StageClock,
          say: Callable[[str], None]) -> Dataset:
    with clock.stage("load and validate"):
        data = load_dataset(data_dir, params.weights.keys())
        data.write_rejects(rejects_path)
        say(data.summary().to_string(index=False))
        data.enforce_reject_limit(params.max_reject_share, rejects_path)
    if data.events.empty:
        raise ValueError(f"{data_dir}: no valid events to train on")
    return data


@dataclass(frozen=True, slots=True)
class Evaluation:
    holdout: Holdout
    report: EvalReport
    ranker_text: str | None  # the ranker refit for serving; None without time order
    ranker_training: str  # how that ranker was trained: static, replay or stacked (training.replay)
    windows: dict[str, str]
    propensity: dict[str, PropensityModel]  # segments' model per target kind; empty without time order
    selection: Selection  # the served pipeline and the validation evidence it was chosen on
    protocol: str


def _evaluate(data: Dataset, params: TrainParams, clock: StageClock, say: Callable[[str], None], *,
              for_serving: bool = False) -> Evaluation:
    """The holdout table: the two-stage ranker and every baseline on the same users; `for_serving` also
    refits the ranker for the bundle the request-time way when replay kept a request-time trained one."""
    events = data.events
    protocol, why = choose_protocol(events, params.split, params.split.protocol)
    say(f"protocol: {protocol} ({why})")
    holdout = protocol_holdout(events, params.split, protocol)
    say(f"holdout: {holdout.note}; train {len(holdout.train):,} / test {len(holdout.test):,} events")
    two_stage: TwoStageResult | None = None
    ranker_text: str | None = None
    ranker_training = "static"
    windows: dict[str, str] = {}
    propensity: dict[str, PropensityModel] = {}
    report = EvalReport(k=params.evaluation.k)
    if protocol == "time" and holdout.cut is not None:
        with clock.stage("two-stage evaluation"):
            two_stage = evaluate_two_stage(events, data.items, holdout, params, ITEM_META_COLUMNS, say,
                                           social=data.social)
        report, ranker_text, windows = two_stage.report, two_stage.ranker.to_string(), two_stage.windows
        propensity = two_stage.propensity
        if params.evaluation.replay_hours > 0:
            with clock.stage("request-time replay"):
                replay = run_replay(two_stage, events, params, data.social, say, keep_groups=for_serving)
            if replay is not None:
                report.replay_rows, report.replay = replay.rows, replay.summary
            if for_serving and replay is not None:
                with clock.stage("request-time ranker for serving"):
                    served, ranker_training = serving_ranker(two_stage, replay, events, params, data.social)
                ranker_text = served.to_string()
                say(f"the bundle's ranker is trained {ranker_training} ({served.rounds} rounds), the way kept on "
                    "the request-time validation groups")
    else:
        say(f"protocol {protocol}: the ranker learns from the held-out pairs, cross-fitted over users")
    selection, crossed_ranker = _select_on_holdout(data, holdout, params, clock, say, two_stage)
    if two_stage is None:
        ranker_text = crossed_ranker
    if report.rows:
        say(f"evaluated {report.users:,} users on {report.target_kind}; unseen-item share "
            f"{report.unseen_item_share:.1%}, cold-user share {report.cold_user_share:.1%}")
        say(report.table().round(4).to_string())
    if not report.rows:  # no two-stage table under this protocol: the selection's is the run's table
        report.rows = dict(selection.rows)
        report.users, report.target_kind = selection.users, "new pairs and repeat buys"
    say("selection table (targets: " + "new pairs and repeat buys" + "):")
    say(pd.DataFrame.from_dict(selection.rows, orient="index").round(4).to_string())
    if report.comparison:
        c = report.comparison
        say(f"ranker / best baseline ({c['best_baseline']}) NDCG@{c['k']}: {float(c['ratio']):.3f} "
            f"(95% interval {float(c['ci_low']):.3f} - {float(c['ci_high']):.3f})")
    if report.ablation:
        a = report.ablation
        say(f"ranker / ranker_no_social NDCG@{a['k']}: {float(a['ratio']):.3f} "
            f"(95% interval {float(a['ci_low']):.3f} - {float(a['ci_high']):.3f})")
    if report.replay:
        for line in replay_lines(report.replay_rows, report.replay):
            say(line)
    if selection.chosen.pipeline is not Pipeline.RANKER:
        ranker_text = None  # a ranker without validation evidence over the best single source is not served
    return Evaluation(holdout, report, ranker_text, ranker_training, windows, propensity, selection, protocol)


def evaluate(data_dir: Path, params: TrainParams, settings: TrainingSettings, *, rejects_path: Path,
             say: Callable[[str], None] = print) -> tuple[EvalReport, str]:
    """`sharefeed evaluate`: the holdout table alone, tracked as an MLflow run (no bundle written)."""
    clock = StageClock(say)
    data = _load(data_dir, params, rejects_path, clock, say)
    with tracking.tracked_run(settings, run_name=f"evaluate {Path(data_dir).name}") as run_id:
        tracking.log_params(params.flat() | {"data_dir": str(data_dir)})
        evaluation = _evaluate(data, params, clock, say)
        tracking.log_metrics(evaluation.report.flat_metrics() | evaluation.selection.evidence()
                             | {f"time.{k}_s": v for k, v in clock.seconds.items()})
        tracking.log_metric_curves(evaluation.report.curves, CURVE_K)
        tracking.set_tags({"holdout": evaluation.holdout.kind, "kind": "evaluation"})
    return evaluation.report, run_id


def train(
    data_dir: Path,
    out: Path,
    params: TrainParams,
    settings: TrainingSettings,
    *,
    rejects_path: Path | None = None,
    say: Callable[[str], None] = print,
) -> TrainResult:
    clock = StageClock(say)
    rejects_path = rejects_path or out.with_name(f"{out.name}.rejects.csv")
    data = _load(data_dir, params, rejects_path, clock, say)
    events = data.events
    now = pd.Timestamp(settings.now).tz_convert("UTC") if settings.now else events["ts"].max()

    with tracking.tracked_run(settings, run_name=f"train {Path(data_dir).name}") as run_id:
        tracking.log_params(params.flat() | {"data_dir": str(data_dir), "now": now.isoformat()})
        evaluation = _evaluate(data, params, clock, say, for_serving=True)
        holdout, report = evaluation.holdout, evaluation.report
        ranker_text, windows = evaluation.ranker_text, evaluation.windows

        selection = evaluation.selection
        chosen = selection.chosen
        if chosen.als is not None:  # the ALS setting that won on validation is the one served
            params = params.model_copy(update={"als": chosen.als})
        with clock.stage("refit on all data"):
            window = fit_window(events, data.items, params, now + pd.Timedelta(1, "ns"), ITEM_META_COLUMNS,
                                data.social)
            users, items = window.users, window.items
            item_weights = _served_item_weights(chosen, window.state.pair_weight)
            popularity = item_popularity(events, items, params.weights, now,
                                         params.popularity.trending_half_life_days)
        with clock.stage("social graph and attribution"):
            social_cut = now + pd.Timedelta(1, "ns")  # as of now, like the refit window
            social_graph = build_social_graph(data.social, events, social_cut, users=users)
            attribution = attribute(events, social_cut)
            say(f"social graph: {social_graph.n_users:,} users, {social_graph.n_edges:,} edges; "
                f"{len(attribution.chains):,} share chains, {len(attribution.purchases):,} attributed purchases")
        with clock.stage("index"):
            index = build_item_index(window.models.als_items, params.index)
        with clock.stage("write bundle"):
            manifest = Manifest(
                schema_version=SCHEMA_VERSION,
                bundle_version="pending",
                created_at=datetime.now(UTC),
                params_digest=params.digest(),
                feature_set_digest=_feature_set_digest(params),
                data_window=DataWindow(start=events["ts"].min(), end=events["ts"].max(), now=now),
                holdout=HoldoutInfo(kind=holdout.kind, cut=holdout.cut, note=holdout.note),
                windows=windows,
                categories=window.categories,
                brands=window.brands,
                candidates=params.candidate_counts(),
                union_size=UNION_SIZE,
                model=ModelInfo(factors=params.als.factors, regularization=params.als.regularization,
                                alpha=params.als.alpha, confidence_scale=params.als.confidence_scale,
                                index_kind=index_kind(len(items), params.index),
                                ef_search=params.index.ef_search),
                repurchase=window.policy,
                event_weights=params.weights,
                counts={"users": len(users), "items": len(items), "events": len(events)},
                metrics=report.flat_metrics() | selection.evidence(),
                mlflow_run_id=run_id,
                files={},
                social=attribution.rates,
                propensity=evaluation.propensity,
                served=ServedInfo(pipeline=chosen.pipeline.value, candidate=chosen.name,
                                  parts=[p.value for p in chosen.parts], weights=list(chosen.weights),
                                  exclude_seen=selection.exclude_seen, protocol=evaluation.protocol,
                                  note=selection.note, evidence=selection.evidence()),
            )
            als_items = window.models.als_items
            bundle = BundleContents(
                users=users, items=items, item_meta=window.item_meta, user_factors=window.models.als_users,
                item_factors=als_items, item_gram=(als_items.T @ als_items).astype(np.float32), index=index,
                bought=bought_matrix(events, users, items), popularity=popularity,
                recent=_recent(events, users, items, params.weights, RECENT_ITEMS),
                models=window.models, state=window.state, ranker_text=ranker_text,
                bought_together=bought_together(events.loc[events["ts"] <= now], items),
                social_graph=social_graph, user_influence=attribution.users, item_share_stats=attribution.items,
                item_weights=item_weights,
            )
            manifest = write_bundle(out, bundle, manifest)
        tracking.log_metrics(report.flat_metrics() | selection.evidence()
                             | {f"time.{k}_s": v for k, v in clock.seconds.items()})
        tracking.set_tags({"served_pipeline": chosen.name, "protocol": evaluation.protocol,
                           "bundle_version": manifest.bundle_version, "holdout": holdout.kind,
                           "ranker_training": evaluation.ranker_training})
        tracking.log_metric_curves(report.curves, CURVE_K)
        tracking.log_artifacts(rejects_path, "validation")
        tracking.log_artifacts(out, "bundle")
        model_version = registry.register_bundle(settings, run_id, manifest, events, params.split)
    say(f"bundle {manifest.bundle_version} written to {out} (MLflow run {run_id})")
    say(f"registered as {settings.registered_model} version {model_version}")
    return TrainResult(out, manifest, report, data.summary(), rejects_path, run_id, dict(clock.seconds),
                       model_version)
