"""Property tests with hostile input on the event schema: POST /v1/events and the file loaders.

Odd Unicode ids (right-to-left, zero-width, combining, emoji sequences, 256 characters), extreme numbers
(1e308, 5e-324, integers past 64 bits), times at both ends of the accepted range, and rows broken in one
known way each. Whatever the mix: never a 5xx or an exception; every broken row is rejected with its index
and a reason that names the broken field; every good row in the same batch is kept; and what was accepted
comes back equal from the event log through the loader. Empty and header-only files are empty tables.
"""

from __future__ import annotations

import csv
import gzip
import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from features.dataset import load_dataset
from features.schema import MAX_EPOCH_SECONDS
from features.weights import DEFAULT_EVENT_WEIGHTS
from serving.app import create_app
from serving.settings import ServingSettings
from tests.test_contract_properties import timestamps
from training.bundle import load_bundle
from training.pipeline import TrainResult

EVENT_TYPES = tuple(DEFAULT_EVENT_WEIGHTS)
# Each example posts a batch and reads the whole log back (or writes and reads a data directory): a few
# dozen examples keep the file near 10 s; failures are reported as generated, without a long shrink.
PROPERTY = settings(max_examples=25, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- strategies ---------------------------------------------------------------------------------------------

ODD = ["\u05e9\u05dc\u05d5\u05dd", "\u202eevil\u202c", "\u0645\u0631\u062d\u0628\u0627", "a\u200bb", "\u200d",
       "\ufeff", "e\u0301", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001f642" * 64, "x" * 256, "007",
       "nan", "null", "None", "1e3", "-0", "true", "a,b", '"', "\u00a0x\u00a0"]
ids = st.one_of(
    st.sampled_from(ODD),
    # any text of any script or symbol; no control characters (refused by contract) and no lone surrogates
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=40),
).filter(lambda s: s.strip() != "" and len(s) <= 256)
prices = st.sampled_from([0, 0.01, 9.99, 1e308, 5e-324, 1.7976931348623157e308, 2**64, 10**20, "1e308", "12.5"])
quantities = st.sampled_from([1, 3, 0.5, 2**64, 2**63 - 1, 1e308, "2"])


@st.composite
def good_rows(draw: st.DrawFn) -> tuple[dict[str, Any], pd.Timestamp, bool]:
    """A row the contract accepts, the UTC time it means, and whether that time is a float epoch."""
    user = draw(ids)
    kind = draw(st.sampled_from(EVENT_TYPES))
    written, utc, is_float = draw(timestamps())
    row: dict[str, Any] = {"user_id": user, "item_id": draw(ids), "timestamp": written,
                           "event_type": draw(st.sampled_from([kind, kind.upper(), f" {kind} "]))}
    if draw(st.booleans()):
        row["price"] = draw(prices)
    if draw(st.booleans()):
        row["quantity"] = draw(quantities)
    if draw(st.booleans()):
        row["target_user_id" if kind == "share" else "referrer_id"] = draw(ids.filter(lambda other: other != user))
    return row, utc, is_float


# (field the reason must name, how the good row is broken); None removes the field
BREAKS: list[tuple[str, str, Any]] = [
    ("user_id", "user_id", None),
    ("user_id", "user_id", ""),
    ("user_id", "user_id", " \u3000 "),
    ("user_id", "user_id", "x" * 257),
    ("item_id", "item_id", "a\x07b"),
    ("item_id", "item_id", "tab\there"),
    ("event_type", "event_type", "teleport"),
    ("event_type", "event_type", None),
    ("timestamp", "timestamp", "2026-03-01T10:00:00"),
    ("timestamp", "timestamp", MAX_EPOCH_SECONDS * 1000),
    ("timestamp", "timestamp", "9999-12-31T23:59:59Z"),
    ("timestamp", "timestamp", "0001-01-01T00:00:00Z"),
    ("timestamp", "timestamp", "1969-12-31T23:59:59Z"),
    ("timestamp", "timestamp", -1),
    ("timestamp", "timestamp", "NaN"),
    ("timestamp", "timestamp", "Infinity"),
    ("timestamp", "timestamp", "1e400"),
    ("timestamp", "timestamp", None),
    ("price", "price", "NaN"),
    ("price", "price", "-Infinity"),
    ("price", "price", "1e309"),
    ("price", "price", -0.01),
    ("price", "price", "ten"),
    ("quantity", "quantity", 0),
    ("quantity", "quantity", "inf"),
    ("quantity", "quantity", -(2**64)),
    ("target_user_id", "target_user_id", "SELF"),
]
JSON_ONLY_BREAKS: list[tuple[str, str, Any]] = [
    ("user_id", "user_id", {"id": "u1"}),
    ("item_id", "item_id", ["p1", "p2"]),
    ("price", "price", {"amount": 3}),
]


@st.composite
def batches(draw: st.DrawFn, breaks: list[tuple[str, str, Any]]) -> list[tuple[dict[str, Any], Any]]:
    """Rows in random order: (row, (utc, is_float)) for good ones, (row, field) for each broken one."""
    out: list[tuple[dict[str, Any], Any]] = []
    for _ in range(draw(st.integers(min_value=1, max_value=14))):
        row, utc, is_float = draw(good_rows())
        if draw(st.integers(min_value=0, max_value=2)) == 0:
            field, key, value = draw(st.sampled_from(breaks))
            row = dict(row)
            if value is None:
                row.pop(key, None)
            else:
                row[key] = row["user_id"] if value == "SELF" else value
            out.append((row, field))
        else:
            out.append((row, (utc, is_float)))
    return out


def _tagged(batch: list[tuple[dict[str, Any], Any]]) -> tuple[list[dict[str, Any]], str]:
    """The rows, each with a session id unique to this example (so rows are never duplicates of each other
    or of an earlier example's), and the example's tag."""
    tag = uuid.uuid4().hex
    return [row | {"session_id": f"{tag}-{i}"} for i, (row, _) in enumerate(batch)], tag


def _assert_round_trip(accepted: pd.DataFrame, batch: list[tuple[dict[str, Any], Any]],
                       rows: list[dict[str, Any]]) -> None:
    """Every good row is in `accepted` (events as the loader returns them) once, equal to what was written."""
    good = {row["session_id"]: (row, meaning) for row, (_, meaning) in zip(rows, batch, strict=True)
            if isinstance(meaning, tuple)}
    assert sorted(accepted["session_id"]) == sorted(good)
    for got in accepted.itertuples(index=False):
        row, (utc, is_float) = good[got.session_id]
        assert (got.user_id, got.item_id, got.event_type) == (row["user_id"], row["item_id"],
                                                              row["event_type"].strip().lower())
        for name in ("target_user_id", "referrer_id"):
            assert getattr(got, name) == row.get(name) or (pd.isna(getattr(got, name)) and name not in row)
        for name in ("price", "quantity"):
            assert getattr(got, name) == float(row[name]) if name in row else pd.isna(getattr(got, name))
        # the log keeps microseconds; a float epoch carries about that much at today's epoch
        assert abs(got.ts - utc) < pd.Timedelta(microseconds=1 if not is_float else 2), (row["timestamp"], got.ts)


def _assert_rejects(rejected: list[tuple[int, str]], batch: list[tuple[dict[str, Any], Any]], first: int) -> None:
    """Exactly the broken rows are rejected, each at its position (counted from `first`) and for its field."""
    expected = {first + i: meaning for i, (_, meaning) in enumerate(batch) if isinstance(meaning, str)}
    assert sorted(index for index, _ in rejected) == sorted(expected)
    for index, reason in rejected:
        assert expected[index] in reason, (index, reason, batch[index - first][0])


# --- the HTTP API --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(trained: TrainResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    """One service (in-process store) whose event log every example appends to and reads back."""
    folder = tmp_path_factory.mktemp("event-properties")
    settings_ = ServingSettings(event_log=folder / "log", segments_dir=folder / "segments",
                                keys_file=folder / "keys.json", audit_log=folder / "audit.jsonl")
    with TestClient(create_app(settings_, bundle=load_bundle(trained.bundle_path))) as client:
        yield client, folder / "log"


@PROPERTY
@given(batches(BREAKS + JSON_ONLY_BREAKS))
def test_a_posted_batch_keeps_its_good_rows_and_rejects_each_bad_one(
    service: tuple[TestClient, Path], batch: list[tuple[dict[str, Any], Any]],
) -> None:
    client, log = service
    rows, tag = _tagged(batch)
    # json, not orjson: integers past 64 bits; raw UTF-8, not \u escapes
    answer = client.post("/v1/events", content=json.dumps({"events": rows}, ensure_ascii=False).encode(),
                         headers={"content-type": "application/json"})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    _assert_rejects([(r["index"], r["reason"]) for r in body["rejected"]], batch, first=0)
    good = sum(isinstance(meaning, tuple) for _, meaning in batch)
    assert (body["accepted"], body["duplicates"]) == (good, 0)
    if good or any((log / "events").glob("*.jsonl")):  # before the first accepted row the log has no file
        events = load_dataset(log, EVENT_TYPES).events
        _assert_round_trip(events[events["session_id"].str.startswith(tag)], batch, rows)


@pytest.mark.parametrize("body", [
    b'{"events": []}', b"{}", b"[]", b"", b"null", b'{"events": null}', b'{"events": [{}]}', b'{"events": [5]}',
    b'{"events": "x"}', b'{"events": [{"user_id": "u"}], "extra": 1}', b"\xff\xfe", b'{"events": [' * 2000,
])
def test_empty_or_malformed_batches_are_answered_without_a_5xx(service: tuple[TestClient, Path],
                                                               body: bytes) -> None:
    client, _ = service
    answer = client.post("/v1/events", content=body, headers={"content-type": "application/json"})
    assert 400 <= answer.status_code < 500 or (answer.status_code == 200 and answer.json()["accepted"] == 0)
    assert answer.json()["detail" if answer.status_code != 200 else "rejected"]


# --- the loaders ---------------------------------------------------------------------------------------------

COLUMNS = ("user_id", "item_id", "event_type", "timestamp", "price", "quantity", "target_user_id", "referrer_id",
           "session_id")


def _write(directory: Path, fmt: str, rows: list[dict[str, Any]]) -> None:
    if fmt == "jsonl":
        (directory / "events.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                                encoding="utf-8")
        return
    with (directory / "events.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else str(row[c]) for c in COLUMNS])


@PROPERTY
@given(st.sampled_from(["jsonl", "csv"]), batches(BREAKS))
def test_a_data_file_keeps_its_good_rows_and_rejects_each_bad_one(fmt: str,
                                                                  batch: list[tuple[dict[str, Any], Any]]) -> None:
    rows, _ = _tagged(batch)
    with tempfile.TemporaryDirectory() as folder:
        _write(Path(folder), fmt, rows)
        data = load_dataset(Path(folder), EVENT_TYPES)
    (check,) = data.checks
    assert (check.rows_read, check.duplicates) == (len(rows), 0)
    # rows are numbered from 1 (the line of a JSON Lines file, the record of a CSV file)
    _assert_rejects(list(zip(check.rejects["row"].tolist(), check.rejects["reason"].tolist(), strict=True)),
                    batch, first=1)
    _assert_round_trip(data.events, batch, rows)


GOOD_EVENTS = "user_id,item_id,event_type,timestamp\nu1,p1,view,2026-01-01T00:00:00Z\n"
HEADERS = {"events": "user_id,item_id,event_type,timestamp", "items": "item_id,category,price",
           "users": "user_id,region", "social": "user_id,friend_id"}
EMPTY_FILES = {  # name -> content ({header}: the table's header line); .gz files are compressed after
    "empty.csv": "",
    "blank-lines.csv": "\n\n",
    "header.csv": "{header}\n",
    "header-no-newline.csv": "{header}",
    "empty.csv.gz": "",
    "header.csv.gz": "{header}\n",
    "empty.jsonl": "",
    "blank-lines.jsonl": "\n \n",
}


@pytest.mark.parametrize("table", list(HEADERS))
@pytest.mark.parametrize("form", [*EMPTY_FILES, "no-rows.parquet"])
def test_an_empty_or_header_only_file_is_an_empty_table(tmp_path: Path, table: str, form: str) -> None:
    name = f"{table}{form[form.index('.'):]}"
    if form == "no-rows.parquet":
        pd.DataFrame({c: pd.Series([], dtype="str") for c in HEADERS[table].split(",")}).to_parquet(tmp_path / name)
    else:
        content = EMPTY_FILES[form].replace("{header}", HEADERS[table]).encode()
        (tmp_path / name).write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    if table != "events":
        (tmp_path / "events.csv").write_text(GOOD_EVENTS)

    data = load_dataset(tmp_path, EVENT_TYPES)

    check = next(c for c in data.checks if c.table == table)
    assert (check.rows_read, len(check.accepted), check.rejected, check.duplicates) == (0, 0, 0, 0)
    assert len(data.events) == (0 if table == "events" else 1)


@pytest.mark.parametrize(("table", "line", "reason"), [
    ("items", '{"category": "toys"}', "missing column: item_id"),
    ("users", '{"region": "north"}', "missing column: user_id"),
    ("social", '{"friend_id": "u2"}', "missing column: user_id"),
    ("events", '{"item_id": "p1"}', "missing column: user_id"),
])
def test_a_table_without_its_key_column_rejects_its_rows(tmp_path: Path, table: str, line: str, reason: str) -> None:
    # items and users without their id column raised KeyError
    (tmp_path / f"{table}.jsonl").write_text(line + "\n")
    if table != "events":
        (tmp_path / "events.csv").write_text(GOOD_EVENTS)
    check = next(c for c in load_dataset(tmp_path, EVENT_TYPES).checks if c.table == table)
    assert check.rejects["reason"].tolist() == [reason]
