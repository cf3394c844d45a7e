"""Contract tests for reading and validating a data directory (DESIGN: "Input data contract").

Each test writes a tiny data directory under tmp_path in the format it exercises, loads it through
`load_dataset` and checks the accepted rows, the rejects (file, row, reason) and the counts.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.dataset import Dataset, RejectLimitError, load_dataset
from features.tables import DataDirectoryError
from features.weights import DEFAULT_EVENT_WEIGHTS

EVENT_TYPES = tuple(DEFAULT_EVENT_WEIGHTS)
FORMATS = ("csv", "csv.gz", "parquet", "jsonl")

Row = dict[str, object]


def _utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text).tz_convert("UTC")


def write_table(directory: Path, name: str, rows: list[Row], fmt: str) -> Path:
    """Write `rows` as `name.<fmt>`; CSV and Parquet hold every value as text, JSON Lines keeps JSON types."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
        return path
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = {c: [None if row.get(c) is None else str(row[c]) for row in rows] for c in columns}
    frame = pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in text.items()})
    if fmt == "parquet":
        table = pa.table({c: pa.array(v, type=pa.string()) for c, v in text.items()})
        pq.write_table(table, path)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "csv.gz":
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False)
        path.write_bytes(gzip.compress(buffer.getvalue().encode()))
    else:
        raise AssertionError(f"unknown format {fmt}")
    return path


def load(directory: Path) -> Dataset:
    return load_dataset(directory, EVENT_TYPES)


def check_of(dataset: Dataset, table: str):
    (check,) = [c for c in dataset.checks if c.table == table]
    return check


def reasons_by_row(dataset: Dataset, table: str = "events") -> dict[int, str]:
    rejects = dataset.rejects
    rejects = rejects.loc[rejects["table"] == table]
    return {int(r): str(reason) for r, reason in zip(rejects["row"], rejects["reason"], strict=True)}


def event(user: str, item: str, kind: str, timestamp: object, **extra: object) -> Row:
    return {"user_id": user, "item_id": item, "event_type": kind, "timestamp": timestamp, **extra}


# --- the same events from every format -------------------------------------------------------------------

MIXED_ROWS: list[Row] = [
    event("007", "0042", "view", "2024-03-01T10:00:00Z", session_id="000"),
    event("u1", "i1", "purchase", "1709287200", price="9.50", quantity="2"),
    event("u1", "i1", "purchase", "1709287200.5"),
    event("u2", "i2", "share", "2024-03-01T18:00:00+08:00", target_user_id="0u3"),
    event("u3", "i2", "view", "2024-03-01T05:30:00-05:00", referrer_id="u2"),
]

EXPECTED_MIXED = [
    ("007", "0042", "view", _utc("2024-03-01T10:00:00Z")),
    ("u1", "i1", "purchase", _utc("2024-03-01T10:00:00Z")),
    ("u2", "i2", "share", _utc("2024-03-01T10:00:00Z")),
    ("u3", "i2", "view", _utc("2024-03-01T10:30:00Z")),
    ("u1", "i1", "purchase", _utc("2024-03-01T10:00:00.5Z")),
]


def _accepted_tuples(events: pd.DataFrame) -> list[tuple[str, str, str, pd.Timestamp]]:
    return sorted(
        zip(events["user_id"], events["item_id"], events["event_type"], events["ts"], strict=True),
        key=lambda t: (t[3], t[0], t[1], t[2]),
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_accepted_events(tmp_path: Path, fmt: str) -> None:
    write_table(tmp_path, "events", MIXED_ROWS, fmt)

    dataset = load(tmp_path)

    assert dataset.rejects.empty, dataset.rejects.to_dict("records")
    assert _accepted_tuples(dataset.events) == sorted(EXPECTED_MIXED, key=lambda t: (t[3], t[0], t[1], t[2]))
    assert str(dataset.events["ts"].dtype) == "datetime64[ns, UTC]"
    by_session = dataset.events.set_index("session_id", drop=False)
    assert by_session.loc["000", "user_id"] == "007"
    share = dataset.events.loc[dataset.events["event_type"] == "share"].iloc[0]
    assert share["target_user_id"] == "0u3"
    purchase = dataset.events.loc[dataset.events["price"].notna()].iloc[0]
    assert (purchase["price"], purchase["quantity"]) == (9.5, 2.0)


def test_formats_agree_on_derived_event_ids(tmp_path: Path) -> None:
    ids = {}
    for fmt in FORMATS:
        write_table(tmp_path / fmt.replace(".", "_"), "events", MIXED_ROWS, fmt)
        events = load(tmp_path / fmt.replace(".", "_")).events
        ids[fmt] = sorted(events["event_id"])
    assert len(set(ids["csv"])) == len(MIXED_ROWS)
    assert all(i.startswith("d-") for i in ids["csv"])
    assert ids["csv.gz"] == ids["csv"]
    assert ids["parquet"] == ids["csv"]
    assert ids["jsonl"] == ids["csv"]


# --- ids are strings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_digit_ids_with_leading_zeros_stay_strings(tmp_path: Path, fmt: str) -> None:
    rows = [
        event("007", "0042", "share", "2024-03-01T10:00:00Z", target_user_id="0008", event_id="00001"),
        event("7", "42", "view", "2024-03-01T11:00:00Z", referrer_id="007", session_id="0"),
    ]
    write_table(tmp_path, "events", rows, fmt)

    events = load(tmp_path).events

    assert events["user_id"].tolist() == ["007", "7"]
    assert events["item_id"].tolist() == ["0042", "42"]
    assert events.loc[0, "target_user_id"] == "0008"
    assert events.loc[0, "event_id"] == "00001"
    assert events.loc[1, "referrer_id"] == "007"
    assert events.loc[1, "session_id"] == "0"
    assert all(isinstance(v, str) for v in events["user_id"])


def test_json_string_ids_stay_strings_even_when_they_look_like_numbers(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text(
        '{"user_id": "007", "item_id": "1e3", "event_type": "view", "timestamp": "2024-03-01T10:00:00Z"}\n'
        '{"user_id": "0x10", "item_id": "-0", "event_type": "view", "timestamp": 1709287200}\n'
    )

    events = load(tmp_path).events

    assert events["user_id"].tolist() == ["007", "0x10"]
    assert events["item_id"].tolist() == ["1e3", "-0"]


def test_json_number_id_is_not_turned_into_a_float_when_another_row_lacks_it(tmp_path: Path) -> None:
    # A JSON number id is text "42" in the file; a missing id in another row must not make it "42.0".
    write_table(
        tmp_path,
        "events",
        [
            {"user_id": "u1", "item_id": 42, "event_type": "view", "timestamp": 1709287200},
            {"user_id": "u2", "item_id": None, "event_type": "view", "timestamp": 1709287200},
        ],
        "jsonl",
    )

    dataset = load(tmp_path)

    assert reasons_by_row(dataset) == {2: "missing item_id"}
    assert dataset.events["item_id"].tolist() == ["42"]


# --- timestamps ----------------------------------------------------------------------------------------------


def test_epoch_seconds_int_and_float_are_read_as_utc(tmp_path: Path) -> None:
    write_table(
        tmp_path,
        "events",
        [
            event("a", "x", "view", 1709287200),
            event("b", "x", "view", 1709287200.5),
            event("c", "x", "view", "0"),
            event("d", "x", "view", " 1709287260 "),
        ],
        "jsonl",
    )

    events = load(tmp_path).events.set_index("user_id")

    assert events.loc["a", "ts"] == _utc("2024-03-01T10:00:00Z")
    assert events.loc["b", "ts"] == _utc("2024-03-01T10:00:00.5Z")
    assert events.loc["c", "ts"] == _utc("1970-01-01T00:00:00Z")
    assert events.loc["d", "ts"] == _utc("2024-03-01T10:01:00Z")
    assert str(events["ts"].dtype) == "datetime64[ns, UTC]"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_float_epoch_seconds_keep_their_exact_fraction(tmp_path: Path, fmt: str) -> None:
    # 1709287200.25 is exact in binary and in decimal; nothing justifies reading it as .249999872.
    write_table(tmp_path, "events", [event("a", "x", "view", 1709287200.25)], fmt)

    events = load(tmp_path).events

    assert events["ts"].tolist() == [_utc("2024-03-01T10:00:00.25Z")]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_epoch_in_milliseconds_is_rejected_as_after_2100(tmp_path: Path, fmt: str) -> None:
    write_table(
        tmp_path,
        "events",
        [event("a", "x", "view", 1709287200), event("b", "x", "view", 1709287200000)],
        fmt,
    )

    dataset = load(tmp_path)

    reasons = reasons_by_row(dataset)
    assert list(reasons) == [2]
    assert "2100" in reasons[2]
    assert "timestamp" in reasons[2]
    assert dataset.events["user_id"].tolist() == ["a"]


@pytest.mark.parametrize(
    "text",
    ["2024-03-01T10:00:00", "2024-03-01 10:00:00", "2024-03-01T10:00:00.123456", "2024-03-01T10:00"],
)
def test_iso_time_without_a_zone_is_rejected(tmp_path: Path, text: str) -> None:
    write_table(
        tmp_path, "events", [event("a", "x", "view", "2024-03-01T10:00:00Z"), event("b", "x", "view", text)], "csv"
    )

    dataset = load(tmp_path)

    assert reasons_by_row(dataset) == {2: "timestamp has no time zone"}
    assert dataset.events["user_id"].tolist() == ["a"]


def test_iso_date_without_a_zone_is_rejected(tmp_path: Path) -> None:
    # "2024-03-01" is as zone-less as "2024-03-01T00:00:00": which midnight it means depends on the zone.
    write_table(
        tmp_path,
        "events",
        [event("a", "x", "view", "2024-03-01T10:00:00Z"), event("b", "x", "view", "2024-03-01")],
        "csv",
    )

    dataset = load(tmp_path)

    assert reasons_by_row(dataset) == {2: "timestamp has no time zone"}


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2024-03-01T18:00:00+08:00", "2024-03-01T10:00:00Z"),
        ("2024-03-01T02:00:00+0800", "2024-02-29T18:00:00Z"),
        ("2024-03-01T05:00:00-05:00", "2024-03-01T10:00:00Z"),
        ("2024-03-01T10:00:00.5Z", "2024-03-01T10:00:00.5Z"),
    ],
)
def test_zoned_iso_time_is_converted_to_utc(tmp_path: Path, text: str, utc: str) -> None:
    write_table(tmp_path, "events", [event("a", "x", "view", text)], "csv")

    events = load(tmp_path).events

    assert events["ts"].tolist() == [_utc(utc)]
    assert str(events["ts"].dt.tz) == "UTC"


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00Z", "9999-12-31T00:00:00Z", "1600-01-01T00:00:00+00:00"])
def test_iso_time_outside_the_supported_range_is_a_reject_not_a_crash(tmp_path: Path, text: str) -> None:
    write_table(
        tmp_path, "events", [event("a", "x", "view", "2024-03-01T10:00:00Z"), event("b", "x", "view", text)], "csv"
    )

    dataset = load(tmp_path)

    reasons = reasons_by_row(dataset)
    assert list(reasons) == [2]
    assert "timestamp" in reasons[2]
    assert dataset.events["user_id"].tolist() == ["a"]


# --- duplicates ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_exact_duplicates_are_collapsed_and_counted_not_rejected(tmp_path: Path, fmt: str) -> None:
    rows = [
        event("u1", "i1", "view", "2024-03-01T10:00:00Z"),
        event("u1", "i1", "view", "2024-03-01T10:00:00Z"),
        event("u1", "i1", "view", "2024-03-01T10:00:00Z"),
        event("u1", "i1", "view", "2024-03-01T11:00:00Z"),  # a real repeat at another time
    ]
    write_table(tmp_path, "events", rows, fmt)

    dataset = load(tmp_path)

    check = check_of(dataset, "events")
    assert (check.rows_read, len(check.accepted), check.rejected, check.duplicates) == (4, 2, 0, 2)
    assert dataset.events["ts"].tolist() == [_utc("2024-03-01T10:00:00Z"), _utc("2024-03-01T11:00:00Z")]
    assert dataset.events["event_id"].nunique() == 2
    summary = dataset.summary().set_index("table")
    assert summary.loc["events", "duplicates"] == 2
    assert summary.loc["events", "rejected"] == 0


def test_rows_differing_in_one_optional_column_are_not_duplicates(tmp_path: Path) -> None:
    rows = [
        event("u1", "i1", "purchase", "2024-03-01T10:00:00Z", price="5"),
        event("u1", "i1", "purchase", "2024-03-01T10:00:00Z", price="6"),
    ]
    write_table(tmp_path, "events", rows, "csv")

    check = check_of(load(tmp_path), "events")

    assert (len(check.accepted), check.duplicates, check.rejected) == (2, 0, 0)
    assert sorted(check.accepted["price"]) == [5.0, 6.0]


# --- rejects ---------------------------------------------------------------------------------------------


BAD_CSV_ROWS: list[Row] = [
    event("u1", "i1", "view", "2024-03-01T10:00:00Z", event_id="e1"),  # row 1: good
    event("u1", "i1", "teleport", "2024-03-01T10:00:00Z"),  # row 2: unknown type
    event(None, "i1", "view", "2024-03-01T10:00:00Z"),  # row 3: missing user
    event("u1", "i1", "purchase", "2024-03-01T10:00:00Z", price="-3"),  # row 4: negative price
    event("u1", "i1", "share", "2024-03-01T10:00:00Z", target_user_id="u1"),  # row 5: share to oneself
    event("u2", "i9", "view", "2024-03-02T10:00:00Z", event_id="e1"),  # row 6: event_id reused
    event("u2", "i2", "like", "2024-03-02T10:00:00Z"),  # row 7: good
]

EXPECTED_CSV_REASONS = {
    2: "unknown event_type: 'teleport'",
    3: "missing user_id",
    4: "negative price",
    5: "share to oneself: target_user_id equals user_id",
    6: "event_id repeats events.csv row 1 with other content",
}


def _write_bad_directory(directory: Path) -> tuple[Path, Path]:
    csv_path = write_table(directory, "events", BAD_CSV_ROWS, "csv")
    jsonl_path = directory / "events-app.jsonl"
    jsonl_path.write_text(
        '{"user_id": "u5", "item_id": "i5", "event_type": "view", "timestamp": "2024-03-03T10:00:00Z"}\n'
        "{not json\n"
        '{"user_id": "u6", "item_id": "i6", "event_type": "view", "timestamp": "2024-03-03T11:00:00Z"}\n'
    )
    return csv_path, jsonl_path


def test_each_bad_row_is_rejected_with_file_row_and_reason(tmp_path: Path) -> None:
    csv_path, jsonl_path = _write_bad_directory(tmp_path)

    dataset = load(tmp_path)

    rejects = dataset.rejects
    from_csv = rejects.loc[rejects["file"] == str(csv_path)]
    assert dict(zip(from_csv["row"].astype(int), from_csv["reason"], strict=True)) == EXPECTED_CSV_REASONS
    from_jsonl = rejects.loc[rejects["file"] == str(jsonl_path)]
    assert from_jsonl["row"].astype(int).tolist() == [2]
    (json_reason,) = from_jsonl["reason"]
    assert json_reason.startswith("line 2 is not JSON")
    assert set(rejects["table"]) == {"events"}
    assert sorted(zip(dataset.events["user_id"], dataset.events["item_id"], strict=True)) == [
        ("u1", "i1"),
        ("u2", "i2"),
        ("u5", "i5"),
        ("u6", "i6"),
    ]


def test_counts_add_up(tmp_path: Path) -> None:
    _write_bad_directory(tmp_path)
    with (tmp_path / "events-app.jsonl").open("a") as fh:
        fh.write('{"user_id": "u6", "item_id": "i6", "event_type": "view", "timestamp": "2024-03-03T11:00:00Z"}\n')

    dataset = load(tmp_path)

    check = check_of(dataset, "events")
    assert (check.rows_read, len(check.accepted), check.rejected, check.duplicates) == (11, 4, 6, 1)
    assert check.rows_read == len(check.accepted) + check.rejected + check.duplicates
    row = dataset.summary().set_index("table").loc["events"]
    assert (row["rows"], row["accepted"], row["duplicates"], row["rejected"]) == (11, 4, 1, 6)
    assert row["reject_share"] == pytest.approx(6 / 11, abs=1e-6)
    assert check.reasons()["unknown event_type"] == 1


def test_write_rejects_writes_every_rejected_row(tmp_path: Path) -> None:
    csv_path, jsonl_path = _write_bad_directory(tmp_path / "data")
    dataset = load(tmp_path / "data")

    written = dataset.write_rejects(tmp_path / "out" / "rejects.csv")

    assert written == tmp_path / "out" / "rejects.csv"
    back = pd.read_csv(written, dtype=str, keep_default_na=False)
    assert list(back.columns) == ["table", "file", "row", "reason", "record"]
    got = {(f, int(r), reason) for f, r, reason in zip(back["file"], back["row"], back["reason"], strict=True)}
    expected = {(str(csv_path), r, reason) for r, reason in EXPECTED_CSV_REASONS.items()}
    assert {g for g in got if g[0] == str(csv_path)} == expected
    assert {(f, r) for f, r, _ in got if f == str(jsonl_path)} == {(str(jsonl_path), 2)}
    negative = back.loc[back["reason"] == "negative price", "record"].iloc[0]
    assert orjson.loads(negative)["price"] == "-3"
    assert orjson.loads(negative)["user_id"] == "u1"


def test_write_rejects_of_a_clean_directory_has_only_a_header(tmp_path: Path) -> None:
    write_table(tmp_path / "data", "events", [event("u", "i", "view", "2024-03-01T10:00:00Z")], "csv")

    written = load(tmp_path / "data").write_rejects(tmp_path / "rejects.csv")

    assert written.read_text().strip() == "table,file,row,reason,record"


def _one_in_ten_rejected(directory: Path) -> Dataset:
    rows = [event(f"u{i}", "i", "view", f"2024-03-01T10:{i:02d}:00Z") for i in range(9)]
    rows.append(event("u9", "i", "view", "not a time"))
    write_table(directory, "events", rows, "csv")
    dataset = load(directory)
    assert check_of(dataset, "events").reject_share == pytest.approx(0.1)
    return dataset


def test_reject_limit_raises_naming_the_rejects_file_when_passed(tmp_path: Path) -> None:
    dataset = _one_in_ten_rejected(tmp_path / "data")
    rejects_path = tmp_path / "run" / "rejects.csv"

    with pytest.raises(RejectLimitError) as info:
        dataset.enforce_reject_limit(0.05, rejects_path)

    assert str(rejects_path) in str(info.value)
    assert "events 1/10" in str(info.value)


@pytest.mark.parametrize("limit", [0.1, 0.25, 1.0])
def test_reject_limit_does_not_raise_at_or_below_the_limit(tmp_path: Path, limit: float) -> None:
    dataset = _one_in_ten_rejected(tmp_path)

    dataset.enforce_reject_limit(limit, tmp_path / "rejects.csv")


def test_reject_limit_applies_to_every_table(tmp_path: Path) -> None:
    write_table(tmp_path, "events", [event("u", "i", "view", "2024-03-01T10:00:00Z")], "csv")
    write_table(tmp_path, "items", [{"item_id": "i", "price": "1"}, {"item_id": "j", "price": "cheap"}], "csv")
    dataset = load(tmp_path)

    with pytest.raises(RejectLimitError, match="items 1/2"):
        dataset.enforce_reject_limit(0.2, tmp_path / "rejects.csv")


# --- items -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_items_missing_price_stays_missing(tmp_path: Path, fmt: str) -> None:
    write_table(tmp_path, "events", [event("u", "a", "view", "2024-03-01T10:00:00Z")], "csv")
    write_table(
        tmp_path,
        "items",
        [
            {"item_id": "a", "category": "food", "price": "2.5"},
            {"item_id": "b", "category": "food", "price": None},
            {"item_id": "c", "category": None, "price": "0"},
        ],
        fmt,
    )

    items = load(tmp_path).items
    assert items is not None
    prices = dict(zip(items["item_id"], items["price"], strict=True))

    assert prices["a"] == 2.5
    assert np.isnan(prices["b"])
    assert prices["c"] == 0.0
    assert items["price"].dtype == np.float64
    assert pd.isna(items.set_index("item_id").loc["c", "category"])


def test_items_repeated_item_id_is_rejected(tmp_path: Path) -> None:
    write_table(tmp_path, "events", [event("u", "a", "view", "2024-03-01T10:00:00Z")], "csv")
    items_path = write_table(
        tmp_path,
        "items",
        [
            {"item_id": "a", "category": "food"},
            {"item_id": "b", "category": "food"},
            {"item_id": "a", "category": "phone"},
        ],
        "csv",
    )

    dataset = load(tmp_path)

    assert dataset.items is not None
    assert dataset.items["item_id"].tolist() == ["a", "b"]
    assert dataset.items.set_index("item_id").loc["a", "category"] == "food"
    rejects = dataset.rejects.loc[dataset.rejects["table"] == "items"]
    assert rejects[["file", "row", "reason"]].to_dict("records") == [
        {"file": str(items_path), "row": 3, "reason": f"item_id repeats {items_path.name} row 1"}
    ]


def test_items_in_stock_parses_true_false_one_zero(tmp_path: Path) -> None:
    write_table(tmp_path, "events", [event("u", "a", "view", "2024-03-01T10:00:00Z")], "csv")
    values = {"a": "true", "b": "false", "c": "1", "d": "0", "e": "TRUE", "f": " False ", "g": None, "h": "maybe"}
    write_table(tmp_path, "items", [{"item_id": k, "in_stock": v} for k, v in values.items()], "csv")

    dataset = load(tmp_path)

    assert dataset.items is not None
    stock = dict(zip(dataset.items["item_id"], dataset.items["in_stock"], strict=True))
    assert {k: stock[k] for k in "abcdef"} == {"a": True, "b": False, "c": True, "d": False, "e": True, "f": False}
    assert stock["g"] is pd.NA
    assert "h" not in stock
    assert reasons_by_row(dataset, "items") == {8: "in_stock is not true/false"}


def test_items_in_stock_from_json_booleans_and_numbers(tmp_path: Path) -> None:
    write_table(tmp_path, "events", [event("u", "a", "view", "2024-03-01T10:00:00Z")], "csv")
    write_table(
        tmp_path,
        "items",
        [
            {"item_id": "a", "in_stock": True},
            {"item_id": "b", "in_stock": False},
            {"item_id": "c", "in_stock": 1},
            {"item_id": "d", "in_stock": 0},
        ],
        "jsonl",
    )

    dataset = load(tmp_path)

    assert dataset.items is not None
    assert dict(zip(dataset.items["item_id"], dataset.items["in_stock"], strict=True)) == {
        "a": True,
        "b": False,
        "c": True,
        "d": False,
    }


def test_items_json_in_stock_number_survives_a_row_without_it(tmp_path: Path) -> None:
    # JSON `1` with the key absent in another row: the loader must not turn it into "1.0" and reject it.
    write_table(tmp_path, "events", [event("u", "a", "view", "2024-03-01T10:00:00Z")], "csv")
    write_table(tmp_path, "items", [{"item_id": "a", "in_stock": 1}, {"item_id": "b"}], "jsonl")

    dataset = load(tmp_path)

    assert reasons_by_row(dataset, "items") == {}
    assert dataset.items is not None
    assert dataset.items.set_index("item_id").loc["a", "in_stock"] is np.True_


# --- social ---------------------------------------------------------------------------------------------


def test_social_kind_defaults_to_friend_and_self_loops_are_rejected(tmp_path: Path) -> None:
    write_table(tmp_path, "events", [event("u", "a", "view", "2024-03-01T10:00:00Z")], "csv")
    write_table(
        tmp_path,
        "social",
        [
            {"user_id": "u1", "friend_id": "u2", "kind": None},
            {"user_id": "u1", "friend_id": "u3", "kind": "Follow"},
            {"user_id": "u4", "friend_id": "u4", "kind": "friend"},
            {"user_id": "u5", "friend_id": "u6", "kind": "enemy"},
        ],
        "csv",
    )

    dataset = load(tmp_path)

    assert dataset.social is not None
    assert dataset.social.to_dict("records") == [
        {"user_id": "u1", "friend_id": "u2", "kind": "friend"},
        {"user_id": "u1", "friend_id": "u3", "kind": "follow"},
    ]
    assert reasons_by_row(dataset, "social") == {
        3: "self loop: friend_id equals user_id",
        4: "unknown kind: 'enemy'",
    }


def test_social_without_a_kind_column_is_all_friendships(tmp_path: Path) -> None:
    write_table(tmp_path, "events", [event("u", "a", "view", "2024-03-01T10:00:00Z")], "csv")
    write_table(
        tmp_path, "social", [{"user_id": "007", "friend_id": "08"}, {"user_id": "x", "friend_id": "x"}], "jsonl"
    )

    dataset = load(tmp_path)

    assert dataset.social is not None
    assert dataset.social.to_dict("records") == [{"user_id": "007", "friend_id": "08", "kind": "friend"}]
    assert reasons_by_row(dataset, "social") == {2: "self loop: friend_id equals user_id"}


# --- the directory as a whole ------------------------------------------------------------------------------


def test_event_log_folder_is_read_together_with_events_csv(tmp_path: Path) -> None:
    write_table(tmp_path, "events", [event("u0", "i0", "view", "2024-03-01T09:00:00Z")], "csv")
    log = tmp_path / "events"
    write_table(
        log / "2024-03-01",
        "proc-1-10",
        [event("u1", "i1", "view", "2024-03-01T10:00:00Z"), event("u1", "i2", "view", "2024-03-01T10:05:00Z")],
        "jsonl",
    )
    second = write_table(
        log / "2024-03-01",
        "proc-2-10",
        [event("u2", "i1", "purchase", 1709290800), event("u2", "i1", "oops", 1709290801)],
        "jsonl",
    )
    write_table(log / "2024-03-01", "proc-1-11", [event("u1", "i1", "view", "2024-03-01T10:00:00Z")], "jsonl")
    (log / "README.txt").write_text("not a table")

    dataset = load(tmp_path)

    check = check_of(dataset, "events")
    assert (check.rows_read, len(check.accepted), check.rejected, check.duplicates) == (6, 4, 1, 1)
    assert dataset.events["user_id"].tolist() == ["u0", "u1", "u1", "u2"]
    assert dataset.events["ts"].iloc[-1] == _utc("2024-03-01T11:00:00Z")
    assert dataset.rejects[["file", "row"]].to_dict("records") == [{"file": str(second), "row": 2}]


def test_data_directory_without_events_raises(tmp_path: Path) -> None:
    write_table(tmp_path, "items", [{"item_id": "a"}], "csv")
    write_table(tmp_path, "social", [{"user_id": "a", "friend_id": "b"}], "csv")

    with pytest.raises(DataDirectoryError, match="no events table"):
        load(tmp_path)


def test_missing_data_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        load(tmp_path / "absent")
