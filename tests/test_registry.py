"""The model registry, against the embedded SQLite store and a real MLflow store on PostgreSQL: training
registers versions, promotion compares on the same holdout, rollback walks the alias back, and an alias
resolves to a verified bundle the service can load."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import TIME, TINY_ALS
from fastapi.testclient import TestClient

from serving.app import app_from_environment, create_app
from serving.settings import ServingSettings
from sharefeed.cli import main
from training import registry
from training.bundle import BundleError, HoldoutInfo, load_bundle
from training.params import ALSParams, SplitParams, TrainParams
from training.pipeline import TrainResult, train
from training.settings import TrainingSettings

# The PostgreSQL server the tests create their databases on (trust auth); CI on this machine kind has it.
PG_SERVER = os.environ.get("SHAREFEED_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
# Deliberately bad parameters, on the same data (so on the same holdout): the two runs score differently.
BAD_ALS = ALSParams(factors=2, iterations=1, regularization=0.1, alpha=10.0)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty database on PG_SERVER for one MLflow store; dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"sharefeed_test_{uuid.uuid4().hex[:12]}"
    admin: psycopg.Connection[Any] | None = None
    try:
        admin = psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        problem = str(exc).strip()
    if admin is None:  # failed outside the except block, so the report is this message and not a traceback
        pytest.fail(f"PostgreSQL is not reachable at {PG_SERVER} ({problem}). These tests need a real MLflow store "
                    "on PostgreSQL (user postgres, trust auth): start the server, or point SHAREFEED_TEST_POSTGRES "
                    "at one.", pytrace=False)
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield f"{PG_SERVER}/{name}"
        finally:
            # MLflow's engine keeps pooled connections open: FORCE ends them (PostgreSQL 13+).
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass(frozen=True)
class Store:
    settings: TrainingSettings
    runs: tuple[TrainResult, ...]  # in training order: TINY_ALS, BAD_ALS, TINY_ALS on another holdout
    good: TrainResult  # of the first two (same holdout), the one with the higher headline metric
    worse: TrainResult  # ... and the one with the lower
    other_holdout: TrainResult  # sound parameters, measured on an explicit cut a day earlier

    def client(self) -> mlflow.MlflowClient:
        uri = self.settings.tracking_uri
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

    def alias(self, alias: str) -> int:
        return int(self.client().get_model_version_by_alias(self.settings.registered_model, alias).version)


def _headline(result: TrainResult) -> float:
    found = registry.headline_metric(result.manifest.metrics)
    assert found is not None, f"no headline metric in {sorted(result.manifest.metrics)}"
    return found[1]


def _cli_env(settings: TrainingSettings) -> dict[str, str | None]:
    """The environment that makes the console script use `settings`' store (and no bundle from outside)."""
    return {"SHAREFEED_HOME": str(settings.home), "SHAREFEED_MLFLOW_URI": settings.tracking_uri,
            "SHAREFEED_REGISTERED_MODEL": settings.registered_model, "SHAREFEED_BUNDLE": None,
            "SHAREFEED_MODEL_ALIAS": None}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, demo_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    home = tmp_path_factory.mktemp(f"registry-{request.param}")
    with nullcontext(None) if request.param == "sqlite" else postgres_database() as uri:
        settings = TrainingSettings(home=home / "home", mlflow_uri=uri, now=None)

        def fit(name: str, params: TrainParams) -> TrainResult:
            return train(demo_dir, home / name, params, settings, say=lambda _: None)

        sound = fit("sound", TrainParams(als=TINY_ALS, split=TIME))
        bad = fit("bad", TrainParams(als=BAD_ALS, split=TIME))
        cut = sound.manifest.holdout.cut
        assert cut is not None, sound.manifest.holdout
        other = fit("other", TrainParams(als=TINY_ALS, split=SplitParams(protocol="time", cut=cut - timedelta(days=1))))
        # Which one wins depends on the whole pipeline (a ranker over several candidate sources can make up
        # for a poor ALS): the tests only need two different scores on the same holdout.
        worse, good = sorted([sound, bad], key=_headline)
        assert _headline(worse) < _headline(good), "TINY_ALS and BAD_ALS must score differently"
        yield Store(settings, (sound, bad, other), good, worse, other)


# --- what a version is measured on -------------------------------------------------------------------------

def _events() -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": ["u1", "u2", "007"], "item_id": ["p1", "p1", "p2"],
        "event_type": ["view", "purchase", "share"],
        "ts": pd.to_datetime([1_700_000_000, 1_700_000_060, 1_700_003_600], unit="s", utc=True),
    })


def test_data_digest_ignores_row_order_and_time_unit_but_not_content() -> None:
    events = _events()
    digest = registry.data_digest(events)
    assert registry.data_digest(events.iloc[::-1]) == digest
    assert registry.data_digest(events.assign(ts=events["ts"].dt.as_unit("s"))) == digest
    assert registry.data_digest(events.assign(quantity=2)) == digest  # only the four identity columns count
    assert registry.data_digest(events.assign(item_id=["p1", "p1", "p3"])) != digest
    assert registry.data_digest(events.assign(ts=events["ts"] + pd.Timedelta(seconds=1))) != digest


def test_holdout_signature_names_kind_cut_and_data() -> None:
    cut = pd.Timestamp("2026-11-20", tz="UTC").to_pydatetime()
    day = HoldoutInfo(kind="day", cut=cut, note="")
    split = SplitParams()
    signature = registry.holdout_signature(day, "d1", split)
    assert registry.holdout_signature(day, "d1", SplitParams(test_fraction=0.2)) == signature  # same cut
    assert registry.holdout_signature(day, "d2", split) != signature
    assert registry.holdout_signature(HoldoutInfo(kind="explicit", cut=cut, note=""), "d1", split) != signature
    later = HoldoutInfo(kind="day", cut=cut + timedelta(days=1), note="")
    assert registry.holdout_signature(later, "d1", split) != signature
    random = HoldoutInfo(kind="random-per-user", cut=None, note="")
    assert (registry.holdout_signature(random, "d1", split)
            != registry.holdout_signature(random, "d1", SplitParams(random_seed=12)))


def test_headline_metric_prefers_the_ranker() -> None:
    assert registry.headline_metric({"als.ndcg_at_20": 0.2}) == ("als.ndcg_at_20", 0.2)
    assert registry.headline_metric({"als.ndcg_at_20": 0.2, "ranker.ndcg_at_20": 0.3}) == ("ranker.ndcg_at_20", 0.3)
    assert registry.headline_metric({"popular.ndcg_at_20": 0.1}) is None


# --- registration ---------------------------------------------------------------------------------------------

def test_each_train_run_registers_a_version_of_its_bundle(store: Store) -> None:
    client, name = store.client(), store.settings.registered_model
    results = list(store.runs)
    assert [r.model_version for r in results] == [1, 2, 3]
    for result in results:
        version = client.get_model_version(name, str(result.model_version))
        assert version.run_id == result.run_id
        assert version.source == client.get_run(result.run_id).info.artifact_uri.rstrip("/") + "/bundle"
        assert version.tags[registry.TAG_BUNDLE_VERSION] == result.manifest.bundle_version
        assert version.tags[registry.TAG_PARAMS_DIGEST] == result.manifest.params_digest
        key, value = registry.headline_metric(result.manifest.metrics) or ("", 0.0)
        assert version.tags[registry.TAG_METRIC] == key
        assert float(version.tags[registry.TAG_METRIC_VALUE]) == value
    if store.settings.tracking_uri.startswith("postgresql"):  # the versions really are rows in PostgreSQL
        import psycopg

        with psycopg.connect(store.settings.tracking_uri) as db:
            rows = db.execute("SELECT version FROM model_versions WHERE name = %s ORDER BY version", (name,))
            assert [v for (v,) in rows.fetchall()] == [1, 2, 3]
    tags = [client.get_model_version(name, str(r.model_version)).tags for r in results]
    assert tags[0][registry.TAG_DATA_DIGEST] == tags[1][registry.TAG_DATA_DIGEST] == tags[2][registry.TAG_DATA_DIGEST]
    assert tags[0][registry.TAG_HOLDOUT_SIGNATURE] == tags[1][registry.TAG_HOLDOUT_SIGNATURE]
    assert tags[0][registry.TAG_HOLDOUT_SIGNATURE] != tags[2][registry.TAG_HOLDOUT_SIGNATURE]
    assert tags[0][registry.TAG_PARAMS_DIGEST] != tags[1][registry.TAG_PARAMS_DIGEST]


def test_list_shows_versions_newest_first_with_their_aliases(store: Store) -> None:
    registry.promote(store.settings, store.good.model_version, "listed")
    frame = registry.list_versions(store.settings)
    assert frame["version"].tolist() == [3, 2, 1]
    row = frame.set_index("version").loc[store.good.model_version]
    assert "listed" in row["aliases"].split(",")
    assert row["bundle_version"] == store.good.manifest.bundle_version
    assert row["value"] == pytest.approx(_headline(store.good))
    assert row["created"]
    assert store.good.manifest.bundle_version in registry.versions_table(store.settings)


# --- promotion and rollback -----------------------------------------------------------------------------------

def test_first_promotion_needs_no_holder(store: Store) -> None:
    change = registry.promote(store.settings, store.worse.model_version, "first")
    assert (change.version, change.previous) == (store.worse.model_version, None)
    assert store.alias("first") == store.worse.model_version


def test_worse_candidate_is_refused_and_the_alias_stays(store: Store) -> None:
    registry.promote(store.settings, store.good.model_version, "refuse")
    with pytest.raises(registry.PromotionRefusedError,
                       match=f"worse than version {store.good.model_version} on the same holdout"):
        registry.promote(store.settings, store.worse.model_version, "refuse")
    assert store.alias("refuse") == store.good.model_version


def test_a_better_or_equal_candidate_is_promoted(store: Store) -> None:
    registry.promote(store.settings, store.worse.model_version, "better")
    change = registry.promote(store.settings, store.good.model_version, "better")
    assert (change.version, change.previous) == (store.good.model_version, store.worse.model_version)
    assert store.alias("better") == store.good.model_version


def test_force_moves_the_alias_to_a_worse_candidate(store: Store) -> None:
    registry.promote(store.settings, store.good.model_version, "force")
    change = registry.promote(store.settings, store.worse.model_version, "force", force=True)
    assert "forced" in change.message
    assert store.alias("force") == store.worse.model_version


def test_rollback_restores_the_previous_holder(store: Store) -> None:
    registry.promote(store.settings, store.good.model_version, "rollback")
    registry.promote(store.settings, store.worse.model_version, "rollback", force=True)
    registry.promote(store.settings, store.other_holdout.model_version, "rollback", force=True)
    assert registry.rollback(store.settings, "rollback").version == store.worse.model_version
    assert store.alias("rollback") == store.worse.model_version
    assert registry.rollback(store.settings, "rollback").version == store.good.model_version
    assert store.alias("rollback") == store.good.model_version
    with pytest.raises(registry.RegistryError, match="no earlier version"):
        registry.rollback(store.settings, "rollback")
    assert store.alias("rollback") == store.good.model_version


def test_a_candidate_measured_on_another_holdout_is_refused(store: Store) -> None:
    registry.promote(store.settings, store.good.model_version, "holdout")
    with pytest.raises(registry.PromotionRefusedError, match="different holdouts") as refused:
        registry.promote(store.settings, store.other_holdout.model_version, "holdout")
    assert "compared on the same data" in str(refused.value)
    assert store.alias("holdout") == store.good.model_version
    registry.promote(store.settings, store.other_holdout.model_version, "holdout", force=True)
    assert store.alias("holdout") == store.other_holdout.model_version


def test_unknown_versions_and_aliases_are_clear_errors(store: Store, tmp_path: Path) -> None:
    with pytest.raises(registry.RegistryError, match="has no version 99"):
        registry.promote(store.settings, 99, "unknown")
    with pytest.raises(registry.RegistryError, match="no earlier version"):
        registry.rollback(store.settings, "never-promoted")
    with pytest.raises(registry.RegistryError, match="never-promoted"):
        registry.fetch_bundle(store.settings, "never-promoted")
    elsewhere = store.settings.model_copy(update={"registered_model": "not-trained-yet"})
    with pytest.raises(registry.RegistryError, match="train a bundle first"):
        registry.promote(elsewhere, 1)


def test_models_commands(store: Store) -> None:
    env = _cli_env(store.settings)

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, ["models", *args], env=env)

    promoted = run("promote", str(store.good.model_version), "--alias", "cli")
    assert promoted.exit_code == 0, promoted.output
    refused = run("promote", str(store.worse.model_version), "--alias", "cli")
    assert refused.exit_code == 1
    assert "promotion refused" in refused.output
    assert f"cli stays on version {store.good.model_version}" in refused.output
    forced = run("promote", str(store.worse.model_version), "--alias", "cli", "--force")
    assert forced.exit_code == 0, forced.output
    listed = run("list")
    assert listed.exit_code == 0, listed.output
    line = next(x for x in listed.output.splitlines() if store.worse.manifest.bundle_version in x)
    assert "cli" in line
    rolled = run("rollback", "--alias", "cli")
    assert rolled.exit_code == 0, rolled.output
    assert store.alias("cli") == store.good.model_version
    nothing = run("rollback", "--alias", "cli")
    assert nothing.exit_code == 1
    assert "no earlier version" in nothing.output


# --- serving from an alias ---------------------------------------------------------------------------------------

def test_serving_from_an_alias_loads_the_promoted_bundle(store: Store) -> None:
    registry.promote(store.settings, store.good.model_version, "champion")
    fetched = registry.fetch_bundle(store.settings, "champion")
    expected = store.good.manifest.bundle_version
    assert fetched.path == store.settings.home / "bundles" / expected
    assert (fetched.version, fetched.bundle_version) == (store.good.model_version, expected)
    assert load_bundle(fetched.path).version == expected
    app = create_app(ServingSettings(bundle=fetched.path))
    with TestClient(app) as http:
        ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["bundle_version"] == expected
    assert registry.fetch_bundle(store.settings, "champion").path == fetched.path  # the cache is reused


def test_serve_command_resolves_model_alias(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    served: dict[str, Any] = {}
    # `serve` hands its settings to the worker processes through the environment: keep what they would see
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, env=dict(os.environ), **kwargs))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    registry.promote(store.settings, store.worse.model_version, "serve_cli")
    result = CliRunner().invoke(main, ["serve", "--model", "serve_cli", "--port", "8123"],
                                env=_cli_env(store.settings))
    assert result.exit_code == 0, result.output
    assert served["port"] == 8123
    assert served["factory"] is True
    assert served["app"] == "serving.app:app_from_environment"
    for key, value in served["env"].items():
        if key.startswith("SHAREFEED_"):
            monkeypatch.setenv(key, value)
    with TestClient(app_from_environment()) as http:
        assert http.get("/readyz").json()["bundle_version"] == store.worse.manifest.bundle_version
    both = CliRunner().invoke(main, ["serve", "--model", "serve_cli", "--bundle", str(store.good.bundle_path)])
    assert both.exit_code == 2
    assert "alternatives" in both.output


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_downloaded_bundle_is_refused(store: Store, tmp_path: Path) -> None:
    # Another registered model in the same store, whose version points at a tampered copy of a real bundle.
    settings = store.settings.model_copy(update={
        "home": tmp_path / "home", "mlflow_uri": store.settings.tracking_uri, "registered_model": "corrupt"})
    tampered = tmp_path / "tampered"
    shutil.copytree(store.good.bundle_path, tampered)
    _corrupt(tampered / "item_factors.npy")
    client = store.client()
    client.create_registered_model("corrupt")
    version = client.create_model_version("corrupt", source=tampered.as_uri(), run_id=store.good.run_id,
                                          tags={registry.TAG_BUNDLE_VERSION: store.good.manifest.bundle_version})
    client.set_registered_model_alias("corrupt", "champion", version.version)
    with pytest.raises(BundleError, match=r"corrupt and will not be served.*checksum mismatch for item_factors"):
        registry.fetch_bundle(settings, "champion")
    cache = settings.home / "bundles"
    assert [p.name for p in cache.iterdir()] == []  # nothing half-verified is left in the cache
    result = CliRunner().invoke(main, ["serve", "--model", "champion"], env=_cli_env(settings))
    assert result.exit_code == 1
    assert "will not be served" in result.output


def test_a_tampered_cache_is_replaced_by_a_fresh_download(store: Store, tmp_path: Path) -> None:
    settings = store.settings.model_copy(update={"home": tmp_path / "home", "mlflow_uri": store.settings.tracking_uri})
    registry.promote(settings, store.good.model_version, "cached")
    fetched = registry.fetch_bundle(settings, "cached")
    factors = fetched.path / "item_factors.npy"
    original = factors.read_bytes()
    _corrupt(factors)
    again = registry.fetch_bundle(settings, "cached")
    assert again.path == fetched.path
    assert factors.read_bytes() == original
    assert np.array_equal(load_bundle(again.path).item_factors, np.load(store.good.bundle_path / "item_factors.npy"))
