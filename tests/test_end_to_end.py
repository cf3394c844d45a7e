"""From a data directory to a served feed: train -> bundle -> MLflow -> recommend -> HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import orjson
import pandas as pd
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.settings import ServingSettings
from sharefeed.cli import main
from training.bundle import MANIFEST, BundleError, load_bundle
from training.pipeline import TrainResult
from training.settings import TrainingSettings


def test_training_reports_model_and_baselines_on_the_same_holdout(trained: TrainResult) -> None:
    table = trained.report.table()
    assert {"als", "bpr", "item_knn", "repeat", "union_rrf", "ranker"} <= set(table.index)
    popular = sorted(name for name in table.index if name.startswith("popular_"))
    assert "popular_all" in popular  # all-time popularity is always reported, beside the best window
    assert 1 <= len(popular) <= 2
    assert trained.report.users > 0
    for column in ("recall_at_20", "ndcg_at_20", "hit_rate_at_20", "map_at_20", "coverage"):
        assert table[column].between(0, 1).all()
    # The generator plants tastes: collaborative filtering and the ranker must find them.
    for baseline in popular:
        assert table.loc["als", "ndcg_at_20"] > table.loc[baseline, "ndcg_at_20"]
        assert table.loc["ranker", "ndcg_at_20"] > table.loc[baseline, "ndcg_at_20"]
    assert 0 < table.loc["ranker", "candidate_recall_at_union"] <= 1
    comparison = trained.report.comparison
    assert comparison["ci_low"] <= comparison["ratio"] <= comparison["ci_high"]
    assert set(trained.manifest.windows) == {"T0", "T1", "T2", "T3"}


def test_mlflow_run_holds_params_metrics_and_bundle(trained: TrainResult,
                                                    training_settings: TrainingSettings) -> None:
    client = mlflow.MlflowClient(tracking_uri=training_settings.tracking_uri)
    run = client.get_run(trained.run_id)
    assert run.data.params["als.factors"] == "16"
    assert run.data.metrics["als.ndcg_at_20"] == pytest.approx(trained.report.rows["als"]["ndcg_at_20"])
    bundle_files = {Path(f.path).name for f in client.list_artifacts(trained.run_id, "bundle")}
    assert {MANIFEST, "item_factors.npy", "items_ip.faiss"} <= bundle_files
    assert trained.manifest.mlflow_run_id == trained.run_id
    plots = {Path(f.path).name for f in client.list_artifacts(trained.run_id, "plots")}
    assert {"ndcg_at_k.png", "recall_at_k.png"} <= plots
    assert run.data.metrics["ranker.ndcg_at_20"] == pytest.approx(trained.report.rows["ranker"]["ndcg_at_20"])


def _user_sample(trained: TrainResult, n: int = 25) -> list[str]:
    bundle = load_bundle(trained.bundle_path)
    # One copy of the ALS factors in memory: the retrieval vectors are the als source's model.
    assert bundle.models.als_users is bundle.user_factors
    assert bundle.models.als_items is bundle.item_factors
    return [bundle.users.id_of(i) for i in range(n)]


def test_recommend_gives_every_user_a_line_and_serve_agrees(trained: TrainResult, tmp_path: Path) -> None:
    users = [*_user_sample(trained), "nobody-knows-me", "007"]
    users_file = tmp_path / "users.txt"
    users_file.write_text("\n".join(users) + "\n")
    out = tmp_path / "recs.jsonl"
    result = CliRunner().invoke(main, ["recommend", "--bundle", str(trained.bundle_path), "--users",
                                       str(users_file), "-n", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["user_id"] for line in lines] == users
    bundle = load_bundle(trained.bundle_path)
    for line in lines:
        assert len(line["items"]) == 10
        assert len(set(line["items"])) == 10

    app = create_app(ServingSettings(), bundle=bundle)
    with TestClient(app) as client:
        for line in lines:
            response = client.get(f"/v1/users/{line['user_id']}/feed", params={"n": 10, "explain": True})
            assert response.status_code == 200
            body = response.json()
            assert [i["item_id"] for i in body["items"]] == line["items"]
            assert body["bundle_version"] == bundle.version
            assert body["request_id"]
            assert all(i["reason"] and i["source"] for i in body["items"])
        unknown = client.get("/v1/users/nobody-knows-me/feed").json()
        assert unknown["personalized"] is False
        assert unknown["step"] in {"trending", "popular"}
        known = client.get(f"/v1/users/{users[0]}/feed").json()
        assert known["personalized"] is True
        assert known["items"][0]["source"] in {"als", "bpr", "item_knn", "ease", "repeat", "category_trending",
                                                "new_arrivals", "trending", "shared", "friends_bought",
                                                "friends_trending"}
        # the ranked union is the chain's first step whatever source leads it; a single source is its own step
        served = bundle.manifest.served.pipeline
        assert known["step"] == ("als" if served == "ranker" else served)


def test_feed_never_offers_a_bought_item_of_a_once_only_category(trained: TrainResult) -> None:
    bundle = load_bundle(trained.bundle_path)
    policy = bundle.manifest.repurchase
    app = create_app(ServingSettings(), bundle=bundle)
    checked = 0
    with TestClient(app) as client:
        for user_idx in range(len(bundle.users)):
            bought = bundle.bought.indices[bundle.bought.indptr[user_idx]:bundle.bought.indptr[user_idx + 1]]
            once_only = {bundle.items.id_of(int(i)) for i in bought
                         if not policy.is_repeatable(bundle.item_meta["category"].iloc[int(i)])}
            if not once_only:
                continue
            body = client.get(f"/v1/users/{bundle.users.id_of(user_idx)}/feed", params={"n": 50}).json()
            assert once_only.isdisjoint(i["item_id"] for i in body["items"])
            checked += 1
            if checked >= 20:
                break
    assert checked > 0


def test_feed_filters_and_bounds(trained: TrainResult) -> None:
    bundle = load_bundle(trained.bundle_path)
    user = bundle.users.id_of(0)
    category = str(bundle.item_meta["category"].iloc[0])
    with TestClient(create_app(ServingSettings(max_n=50), bundle=bundle)) as client:
        body = client.get(f"/v1/users/{user}/feed", params={"n": 5, "category": category}).json()
        cats = {bundle.item_meta["category"].iloc[bundle.items.index_of(i["item_id"])] for i in body["items"]}
        assert cats == {category}
        first = client.get(f"/v1/users/{user}/feed", params={"n": 5}).json()["items"]
        excluded = [i["item_id"] for i in first[:2]]
        again = client.get(f"/v1/users/{user}/feed", params={"n": 5, "exclude": ",".join(excluded)}).json()
        assert not set(excluded) & {i["item_id"] for i in again["items"]}
        plain = client.get(f"/v1/users/{user}/feed", params={"personalized": False}).json()
        assert plain["personalized"] is False
        assert plain["items"][0]["source"] in {"trending", "popular"}
        assert client.get(f"/v1/users/{user}/feed", params={"n": 51}).status_code == 422
        assert client.get(f"/v1/users/{user}/feed", params={"n": 0}).status_code == 422
        assert client.get("/readyz").json()["bundle_version"] == bundle.version
        assert client.get("/healthz").status_code == 200
        assert client.get("/openapi.json").status_code == 200


def test_service_without_bundle_is_not_ready() -> None:
    with TestClient(create_app(ServingSettings())) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.get("/v1/users/u1/feed").status_code == 503


def test_tampered_or_foreign_bundle_is_refused(trained: TrainResult, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(trained.bundle_path, copy)
    with (copy / "item_factors.npy").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match=r"checksum mismatch for item_factors\.npy"):
        load_bundle(copy)

    other = tmp_path / "other"
    shutil.copytree(trained.bundle_path, other)
    manifest = orjson.loads((other / MANIFEST).read_bytes())
    manifest["schema_version"] = 999
    (other / MANIFEST).write_bytes(orjson.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 999"):
        load_bundle(other)
    (other / "users.parquet").unlink()
    with pytest.raises(BundleError):
        load_bundle(other)
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_bundle(tmp_path)

    # a bundle of an earlier feature list (here: before the sway columns) is refused before its arrays are read
    older = tmp_path / "older"
    shutil.copytree(trained.bundle_path, older)
    manifest = orjson.loads((older / MANIFEST).read_bytes())
    manifest["feature_names"] = [n for n in manifest["feature_names"] if "sway" not in n and n != "friends_bought_days"]
    (older / MANIFEST).write_bytes(orjson.dumps(manifest))
    expected = r"another feature list .*missing: friends_bought_days, friends_bought_sway_7d"
    with pytest.raises(BundleError, match=expected):
        load_bundle(older)


def _with_bad_rows(demo_dir: Path, target: Path, bad: int) -> Path:
    """A copy of the demo data in CSV with `bad` broken rows appended to the events."""
    target.mkdir()
    events = pd.read_parquet(demo_dir / "events.parquet").astype(object)
    events["timestamp"] = events["timestamp"].map(lambda t: t.isoformat())
    broken = events.head(bad).copy()
    kinds = ["timestamp", "event_type", "user_id", "price"]
    for i, idx in enumerate(broken.index):
        field = kinds[i % len(kinds)]
        broken.loc[idx, field] = {"timestamp": "2026-10-01 10:00:00", "event_type": "teleport",
                                  "user_id": None, "price": "-3"}[field]
        broken.loc[idx, "session_id"] = f"broken-{i}"
    pd.concat([events, broken]).to_csv(target / "events.csv", index=False)
    shutil.copy(demo_dir / "items.parquet", target / "items.parquet")
    return target


def test_bad_rows_are_rejected_with_reasons_and_good_rows_train(
    demo_dir: Path, tmp_path: Path, training_settings: TrainingSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHAREFEED_HOME", str(training_settings.home))
    data = _with_bad_rows(demo_dir, tmp_path / "data", bad=8)
    params = tmp_path / "params.yaml"
    params.write_text("als:\n  factors: 8\n  iterations: 3\nmax_reject_share: 0.01\n")
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--data", str(data), "--out", str(tmp_path / "b"),
                                  "--params", str(params)])
    assert result.exit_code == 0, result.output
    rejects = pd.read_csv(tmp_path / "b.rejects.csv")
    assert len(rejects) == 8
    reasons = " ".join(rejects["reason"])
    for expected in ("no time zone", "unknown event_type", "missing user_id", "negative price"):
        assert expected in reasons
    assert rejects["row"].min() > 1  # row numbers point into the file, not at its start

    flooded = _with_bad_rows(demo_dir, tmp_path / "flooded", bad=len(pd.read_parquet(demo_dir / "events.parquet"))
                             // 20)
    result = runner.invoke(main, ["train", "--data", str(flooded), "--out", str(tmp_path / "f"),
                                  "--params", str(params)])
    assert result.exit_code != 0
    assert "too many rejected rows" in result.output
    assert str(tmp_path / "f.rejects.csv") in result.output
    assert not (tmp_path / "f").exists()


def test_validate_prints_counts_and_writes_rejects(demo_dir: Path, tmp_path: Path) -> None:
    data = _with_bad_rows(demo_dir, tmp_path / "data", bad=4)
    rejects = tmp_path / "rejects.csv"
    result = CliRunner().invoke(main, ["validate", "--data", str(data), "--rejects", str(rejects)])
    assert result.exit_code == 0, result.output
    assert "events" in result.output
    assert "unknown event_type" in result.output
    assert len(pd.read_csv(rejects)) == 4


def test_personal_picks_are_explained_by_the_users_own_history(trained: TrainResult) -> None:
    bundle = load_bundle(trained.bundle_path)
    titles = bundle.item_meta["title"]
    explained = 0
    with TestClient(create_app(ServingSettings(), bundle=bundle)) as client:
        for user_idx in range(30):
            history = bundle.recent.indices[bundle.recent.indptr[user_idx]:bundle.recent.indptr[user_idx + 1]]
            labels = {str(titles.iloc[i]) for i in history}
            body = client.get(f"/v1/users/{bundle.users.id_of(user_idx)}/feed",
                              params={"n": 10, "explain": True}).json()
            for item in body["items"]:
                if item["reason"].startswith("similar to "):
                    anchor = item["reason"].removeprefix("similar to ").removesuffix(" you looked at")
                    assert anchor in labels
                    explained += 1
    assert explained > 0


def test_evaluate_command_prints_the_table_and_tracks_a_run(
    demo_dir: Path, tmp_path: Path, training_settings: TrainingSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHAREFEED_HOME", str(training_settings.home))
    params = tmp_path / "params.yaml"
    params.write_text("als:\n  factors: 8\n  iterations: 3\nbpr:\n  factors: 8\n  iterations: 5\n")
    result = CliRunner().invoke(main, ["evaluate", "--data", str(demo_dir), "--params", str(params),
                                       "--protocol", "time", "--rejects", str(tmp_path / "rejects.csv")])
    assert result.exit_code == 0, result.output
    assert "protocol: time (--protocol time)" in result.output
    assert "ranker / best baseline" in result.output
    assert "served pipeline: " in result.output
    run_id = result.output.strip().splitlines()[-1].removeprefix("MLflow run ")
    run = mlflow.MlflowClient(tracking_uri=training_settings.tracking_uri).get_run(run_id)
    assert run.data.tags["kind"] == "evaluation"
    assert "ranker.ndcg_at_20" in run.data.metrics
    assert not list(tmp_path.glob("*bundle*"))
