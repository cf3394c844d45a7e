"""Consent and erasure hold everywhere without the online store: the control ledger reads them from the event
log, and every path (feed, rank, social proof, segments and their pages and exports, share suggestions)
checks them through `serving.privacy` — after a rollback to a bundle that still holds the user, after a
Redis restart with no replay, and when another worker recorded them."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pandas as pd
import pytest
import redis
from fastapi.testclient import TestClient

from features.eventlog import EventLog, consent_row, erase_row
from features.ledger import ControlLedger
from features.online import MemoryStore, RedisStore
from serving.app import create_app
from serving.privacy import Privacy
from serving.settings import ServingSettings
from training.bundle import Bundle, load_bundle
from training.pipeline import TrainResult

pytest_plugins = ["tests.redis_fixture"]  # registered (and assertion-rewritten) before the helpers below use it

ALL_BUYERS = {"kind": "lifecycle", "size": 100_000}


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


# -- the ledger and the combination, without a service ---------------------------------------------------------
def test_ledger_reads_erasures_and_the_latest_consent_and_tails_what_is_appended(tmp_path: Path) -> None:
    t0 = time.time()
    with EventLog(tmp_path) as log:
        log.append([consent_row("a", {"marketing": False}, t0), erase_row("gone", t0)])
        ledger = ControlLedger(tmp_path, max_age_seconds=3600)
        assert ledger.erased(["gone", "a"]) == [True, False]
        assert {p: s.given for p, s in ledger.statements(["a"])[0].items()} == {"marketing": False}
        log.append([consent_row("a", {"marketing": True, "social_proof": False}, t0 + 2)])
        assert ledger.statements(["a"])[0]["marketing"].given is False  # not read yet
        ledger.maybe_refresh()
        assert ledger.statements(["a"])[0]["marketing"].given is False  # nor within max_age_seconds
        ledger.refresh()
        assert {p: s.given for p, s in ledger.statements(["a"])[0].items()} == {"marketing": True,
                                                                                 "social_proof": False}
    # another process's file whose statement is older does not win; a half-written line waits
    this_hour = datetime.now(UTC).strftime("%Y%m%d%H")
    other = tmp_path / "control" / f"control-otherhost-1-{this_hour}.jsonl"
    older = orjson.dumps(consent_row("a", {"marketing": False}, t0 + 1)) + b"\n"
    newest = orjson.dumps(consent_row("a", {"social_proof": True}, t0 + 3))
    other.write_bytes(older + newest[:20])
    ledger.refresh()
    assert ledger.statements(["a"])[0]["marketing"].given is True
    assert ledger.statements(["a"])[0]["social_proof"].given is False
    with other.open("ab") as fh:
        fh.write(newest[20:] + b"\n")
    ledger.refresh()
    assert ledger.statements(["a"])[0]["social_proof"].given is True
    # a file of an hour long past: read when it appears; what it gains later, on a full refresh only
    settled = tmp_path / "control" / "control-otherhost-1-2026010100.jsonl"
    settled.write_bytes(orjson.dumps(erase_row("b", t0)) + b"\n")
    ledger.refresh()
    with settled.open("ab") as fh:
        fh.write(orjson.dumps(erase_row("c", t0)) + b"\n")
    ledger.refresh()
    assert ledger.erased(["b", "c"]) == [True, False]
    ledger.refresh(full=True)
    assert ledger.erasures().keys() == {"gone", "b", "c"}


def test_privacy_combines_the_ledger_and_the_store(tmp_path: Path) -> None:
    store = MemoryStore()
    log = EventLog(tmp_path)
    ledger = ControlLedger(tmp_path, max_age_seconds=3600)
    privacy = Privacy(ledger, store)
    store.erase_user("store-only")  # e.g. replayed by another host: the store's tombstone counts too
    log.append([erase_row("log-only", time.time()), consent_row("late", {"marketing": False}, time.time())])
    ledger.refresh()
    store.set_consent("stale", {"personalization": False})
    # "stale" says yes again in another worker: the log has it, this ledger has not read it, the store missed it
    log.append([consent_row("stale", {"personalization": True}, time.time() + 1)])
    standings = privacy.standings(["store-only", "log-only", "late", "stale", "nobody"])
    assert [s.erased for s in standings] == [True, True, False, False, False]
    assert standings[0].consent == standings[1].consent == dict.fromkeys(standings[0].consent, False)
    assert standings[2].consent["marketing"] is False  # the store (empty here) forgot it; the ledger did not
    assert standings[3].consent["personalization"] is True  # they disagreed: the ledger re-read the log
    assert standings[4].allows(["personalization", "marketing", "social_proof"])
    assert privacy.allowed(["late", "nobody"], ["marketing"]) == [False, True]
    # a store that does not answer: the ledger alone
    broken = Privacy(ledger, _DownStore())
    assert broken.allowed(["log-only", "late", "nobody"], ["marketing"]) == [False, False, True]
    log.close()


@pytest.mark.parametrize("purposes", [["marketing"], ["personalization"], ["social_proof", "marketing"], []])
def test_allowed_answers_what_the_standings_allow(tmp_path: Path, purposes: list[str]) -> None:
    """`allowed` skips building standings for users without statements; its answers must not differ."""
    store = MemoryStore()
    with EventLog(tmp_path) as log:
        store.erase_user("store-only")
        store.set_consent("store-says-no", {"marketing": False})
        log.append([erase_row("log-only", time.time()), consent_row("late", {"marketing": False}, time.time()),
                    consent_row("both", {"social_proof": False}, time.time())])
        store.set_consent("both", {"social_proof": False})
        store.set_consent("stale", {"personalization": False})
        log.append([consent_row("stale", {"personalization": True}, time.time() + 1)])
        users = ["store-only", "log-only", "late", "both", "stale", "store-says-no", "nobody", "nobody-2"]
        fast = Privacy(ControlLedger(tmp_path, max_age_seconds=3600), store).allowed(users, purposes)
        slow = Privacy(ControlLedger(tmp_path, max_age_seconds=3600), store).standings(users)
    assert fast == [standing.allows(purposes) for standing in slow]
    assert fast[:2] == [False, False]
    assert fast[-2:] == [True, True]


class _DownStore(MemoryStore):
    def erased(self, user_ids: object) -> list[bool]:
        raise redis.ConnectionError("down")


# -- through the service ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Subjects:
    viewer: str  # sees two friends' purchases as social proof
    friend: str  # one of them: the one erased
    other_friend: str  # the other: withholds social_proof
    sharer: str  # is told to share with `friend`


def _feed(client: TestClient, user: str) -> dict[str, object]:
    response = client.get(f"/v1/users/{user}/feed", params={"n": 50, "explain": "true"})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def _proof_friends(feed: dict[str, object]) -> set[str]:
    return {f for item in feed["items"] for f in (item.get("social") or {}).get("friend_ids") or []}  # type: ignore[attr-defined]


def _share_friends(client: TestClient, user: str) -> set[str]:
    body = client.get(f"/v1/users/{user}/share-suggestions", params={"n": 50, "friends_per_item": 50}).json()
    return {f["user_id"] for item in body["items"] for f in item["friends"]}


def _find_subjects(client: TestClient, bundle: Bundle) -> Subjects:
    for viewer in bundle.users.ids[:300].tolist():
        friends = sorted(_proof_friends(_feed(client, viewer)))
        if len(friends) < 2:
            continue
        for friend in friends:
            reached = [u for u in bundle.social_graph.reach_of(friend) if bundle.users.index_of(u) is not None]
            sharer = next((u for u in reached[:40] if friend in _share_friends(client, u)), None)
            if sharer is not None:
                other = next(f for f in friends if f != friend)
                return Subjects(viewer, friend, other, sharer)
    pytest.fail("no viewer with two friends in social proof, one of them suggested as a share target")


def _segment_ids(client: TestClient, path: str, body: dict[str, object] | None = None) -> tuple[str, set[str]]:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    segment_id = response.json()["segment_id"]
    return segment_id, _page_ids(client, segment_id)


def _page_ids(client: TestClient, segment_id: str) -> set[str]:
    ids: set[str] = set()
    cursor: str | None = ""
    while cursor is not None:
        page = client.get(f"/v1/segments/{segment_id}", params={"cursor": cursor, "limit": 1000}).json()
        ids |= {m["user_id"] for m in page["items"]}
        cursor = page["next_cursor"]
    return ids


def _export_ids(client: TestClient, segment_id: str) -> set[str]:
    exported = client.get(f"/v1/segments/{segment_id}/export", params={"format": "csv"})
    assert exported.status_code == 200
    return set(pd.read_csv(io.BytesIO(exported.content), comment="#", dtype={"user_id": str})["user_id"])


def _older_copy(bundle: Path, out: Path) -> Path:
    """The same model under another version: a bundle trained before the erasure, still holding the user."""
    shutil.copytree(bundle, out)
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    manifest["bundle_version"] = "older-" + str(manifest["bundle_version"])
    (out / "manifest.json").write_bytes(orjson.dumps(manifest))
    return out


def test_an_erased_user_appears_nowhere_after_a_rollback_to_a_bundle_that_holds_them(
        bundle: Bundle, trained: TrainResult, tmp_path: Path) -> None:
    settings = ServingSettings(event_log=tmp_path / "log", segments_dir=tmp_path / "segments",
                               social_proof_names=True)
    with TestClient(create_app(settings, bundle=bundle)) as client:
        who = _find_subjects(client, bundle)
        gone = who.friend
        assert _feed(client, gone)["personalized"] is True
        before_id, before = _segment_ids(client, "/v1/segments/query", {"definition": ALL_BUYERS, "page_size": 0})
        assert gone in before
        assert client.put("/v1/segments/saved/buyers", json=ALL_BUYERS).status_code == 200
        assert client.delete(f"/v1/users/{gone}").status_code == 202
        older = _older_copy(trained.bundle_path, tmp_path / "older")
        reloaded = client.post("/v1/admin/reload", json={"bundle": str(older)})
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["bundle_version"].startswith("older-")
        assert client.app.state.recommender.bundle.users.index_of(gone) is not None  # type: ignore[attr-defined]
        own = _feed(client, gone)
        assert own["personalized"] is False
        assert own["bundle_version"].startswith("older-")
        assert gone not in _proof_friends(_feed(client, who.viewer))
        assert who.other_friend in _proof_friends(_feed(client, who.viewer))  # the check itself still finds some
        assert gone not in _segment_ids(client, "/v1/segments/query", {"definition": ALL_BUYERS, "page_size": 0})[1]
        assert gone not in _segment_ids(client, "/v1/segments/saved/buyers/run")[1]
        assert gone not in _page_ids(client, before_id)
        assert gone not in _export_ids(client, before_id)
        assert gone not in _share_friends(client, who.sharer)
        assert client.get(f"/v1/users/{gone}/share-suggestions").json()["items"] == []
        ranked = client.post("/v1/rank", json={"user_id": gone, "item_ids": bundle.items.ids[:5].tolist()}).json()
        assert ranked["personalized"] is False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A redis-server of this test alone (persistence off), so the test can kill and restart it."""
    from tests.redis_fixture import REDIS_SERVER, _free_port

    if not Path(REDIS_SERVER).exists() and shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary")
    port = _free_port()
    processes: list[subprocess.Popen[bytes]] = []
    yield f"redis://127.0.0.1:{port}/0", processes
    for process in processes:
        process.kill()
        process.wait()


def _start_redis(url: str, processes: list[subprocess.Popen[bytes]], workdir: Path) -> None:
    from tests.redis_fixture import REDIS_SERVER, _wait_until_up

    binary = REDIS_SERVER if Path(REDIS_SERVER).exists() else str(shutil.which("redis-server"))
    port = url.rsplit(":", 1)[1].split("/")[0]
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    process = subprocess.Popen([binary, "--port", port, "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
                                "--appendonly", "no", "--logfile", str(log)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(process)
    _wait_until_up(url, process, log)


def test_consent_and_erasure_still_in_force_after_a_redis_restart(
        bundle: Bundle, tmp_path: Path, private_redis: tuple[str, list[subprocess.Popen[bytes]]]) -> None:
    url, processes = private_redis
    _start_redis(url, processes, tmp_path / "redis-1")
    settings = ServingSettings(redis_url=url, event_log=tmp_path / "log", segments_dir=tmp_path / "segments",
                               social_proof_names=True)
    store = RedisStore(url, settings.redis_prefix)
    with TestClient(create_app(settings, bundle=bundle, store=store)) as client:
        who = _find_subjects(client, bundle)
        snapshot_id, members = _segment_ids(client, "/v1/segments/query", {"definition": ALL_BUYERS, "page_size": 0})
        involved = {who.friend, who.other_friend, who.viewer, who.sharer}
        marketing_out, personal_out = [u for u in sorted(members) if u not in involved][:2]
        assert who.friend in members
        assert _feed(client, personal_out)["personalized"] is True
        assert client.delete(f"/v1/users/{who.friend}").status_code == 202
        assert client.put(f"/v1/users/{who.other_friend}/consent", json={"social_proof": False}).status_code == 200
        assert client.put(f"/v1/users/{marketing_out}/consent", json={"marketing": False}).status_code == 200
        assert client.put(f"/v1/users/{personal_out}/consent", json={"personalization": False}).status_code == 200
        assert store.erased([who.friend]) == [True]

        processes[0].kill()  # Redis keeps nothing on disk: a restart forgets every tombstone and consent
        processes[0].wait()
        _start_redis(url, processes, tmp_path / "redis-2")
        assert store.client.dbsize() == 0
        assert store.erased([who.friend]) == [False]
        assert store.consent(marketing_out)["marketing"] is True

        def check(client: TestClient) -> None:
            assert _feed(client, who.friend)["personalized"] is False
            assert _feed(client, personal_out)["personalized"] is False
            assert not {who.friend, who.other_friend} & _proof_friends(_feed(client, who.viewer))
            _, again = _segment_ids(client, "/v1/segments/query", {"definition": ALL_BUYERS, "page_size": 0})
            assert not {who.friend, marketing_out} & again
            assert personal_out in again  # withholding personalization is not withholding marketing
            assert not {who.friend, marketing_out} & _page_ids(client, snapshot_id)
            assert not {who.friend, marketing_out} & _export_ids(client, snapshot_id)
            assert who.friend not in _share_friends(client, who.sharer)

        check(client)  # the worker that recorded them
        # a later statement counts over the one the ledger holds
        again = client.put(f"/v1/users/{personal_out}/consent", json={"personalization": True})
        assert again.json()["personalization"] is True
        assert _feed(client, personal_out)["personalized"] is True
        client.put(f"/v1/users/{personal_out}/consent", json={"personalization": False})
    store.client.flushdb()  # a worker started after the restart, its store empty too: the ledger loads the log
    with TestClient(create_app(settings, bundle=bundle, store=RedisStore(url, settings.redis_prefix))) as fresh:
        check(fresh)


def test_another_workers_erasure_and_consent_arrive_within_the_refresh(bundle: Bundle, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    user, other = bundle.users.ids[3], bundle.users.ids[4]
    worker_b = ServingSettings(event_log=log_dir, control_refresh_seconds=0.1)
    # two workers with stores of their own, so only the shared event log can carry the news
    with TestClient(create_app(worker_b, bundle=bundle, store=MemoryStore())) as b:
        assert _feed(b, user)["personalized"] is True
        with EventLog(log_dir) as worker_a:
            worker_a.append([erase_row(user, time.time()), consent_row(other, {"personalization": False},
                                                                       time.time())])
            deadline = time.monotonic() + 5
            while _feed(b, user)["personalized"] and time.monotonic() < deadline:
                time.sleep(0.05)
        assert _feed(b, user)["personalized"] is False
        assert _feed(b, other)["personalized"] is False


def test_batch_feeds_honour_the_event_logs_erasures_and_consent(bundle: Bundle, trained: TrainResult, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from serving.recommender import Recommender
    from sharefeed.cli import main

    log_dir = tmp_path / "log"
    monkeypatch.setenv("SHAREFEED_EVENT_LOG", str(log_dir))
    monkeypatch.delenv("SHAREFEED_REDIS_URL", raising=False)
    erased, opted_out, kept = bundle.users.ids[:3].tolist()
    with EventLog(log_dir) as log:
        log.append([erase_row(erased, time.time()), consent_row(opted_out, {"personalization": False}, time.time())])
    (tmp_path / "users.txt").write_text(f"{erased}\n{opted_out}\n{kept}\n")
    result = CliRunner().invoke(main, ["recommend", "--bundle", str(trained.bundle_path), "--users",
                                       str(tmp_path / "users.txt"), "-n", "10", "--out", str(tmp_path / "recs.jsonl")])
    assert result.exit_code == 0, result.output
    rows = [orjson.loads(line) for line in (tmp_path / "recs.jsonl").read_bytes().splitlines()]
    lines = {row["user_id"]: row["items"] for row in rows}
    recommender = Recommender(bundle)
    anonymous = [i.item_id for i in recommender.feed(erased, 10, personalized=False).items]
    assert lines[erased] == lines[opted_out] == anonymous
    assert lines[kept] == [i.item_id for i in recommender.feed(kept, 10).items]
    assert lines[kept] != anonymous
