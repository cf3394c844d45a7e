"""Property tests for the input data contract: what goes in valid comes out equal, nothing crashes the loader.

Each example writes its own data directory under a fresh temporary folder, so examples do not see each other.
"""

from __future__ import annotations

import csv
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pandas as pd
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from features.dataset import Dataset, load_dataset
from features.schema import MAX_EPOCH_SECONDS
from features.validation import derive_event_ids
from features.weights import DEFAULT_EVENT_WEIGHTS

EVENT_TYPES = tuple(DEFAULT_EVENT_WEIGHTS)
EVENT_COLUMNS = ("user_id", "item_id", "event_type", "timestamp", "session_id")
# Each example reads a data directory (tens of milliseconds), so shrinking a failure could take minutes:
# failures are reported as generated, and the file stays fast.
PROPERTY = settings(
    max_examples=30,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LOADING = settings(PROPERTY, max_examples=20)

# --- strategies ---------------------------------------------------------------------------------------------

_ID_CHARS = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))
ids = st.one_of(
    st.text(_ID_CHARS, min_size=1, max_size=12).filter(lambda s: s.strip() != ""),
    st.from_regex(r"0[0-9]{0,6}", fullmatch=True),  # digit-only with leading zeros
    st.sampled_from(["nan", "NaN", "None", "null", "NA", "1e3", "-0", "0", "007", "true"]),
)

_FIRST = datetime(1970, 1, 1, tzinfo=UTC)
_LAST = datetime.fromtimestamp(MAX_EPOCH_SECONDS - 1, tz=UTC)
utc_times = st.datetimes(
    min_value=_FIRST.replace(tzinfo=None), max_value=_LAST.replace(tzinfo=None), timezones=st.just(UTC)
)
offsets = st.integers(min_value=-14 * 4, max_value=14 * 4).map(lambda q: timezone(timedelta(minutes=15 * q)))


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[object, pd.Timestamp, bool]:
    """A contract-valid timestamp as written, the UTC time it means, and whether it is a float epoch."""
    form = draw(st.sampled_from(["iso", "iso_z", "epoch_int", "epoch_float"]))
    moment = draw(utc_times)
    if form == "iso":
        return moment.astimezone(draw(offsets)).isoformat(), pd.Timestamp(moment), False
    if form == "iso_z":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), pd.Timestamp(moment), False
    seconds = int(moment.timestamp())
    if form == "epoch_int":
        return seconds, pd.Timestamp(seconds, unit="s", tz="UTC"), False
    millis = draw(st.integers(min_value=0, max_value=999))
    value = seconds + millis / 1000
    return value, pd.Timestamp(seconds * 1_000 + millis, unit="ms", tz="UTC"), True


@st.composite
def valid_events(draw: st.DrawFn) -> list[tuple[dict[str, object], pd.Timestamp, bool]]:
    """Events in the contract; `session_id` numbers each row so it can be found again after loading."""
    count = draw(st.integers(min_value=1, max_value=12))
    rows = []
    for number in range(count):
        written, utc, is_float = draw(timestamps())
        row = {
            "user_id": draw(ids),
            "item_id": draw(ids),
            "event_type": draw(st.sampled_from(EVENT_TYPES)),
            "timestamp": written,
            "session_id": f"s{number}",
        }
        rows.append((row, utc, is_float))
    return rows


_NASTY = st.sampled_from(
    [
        "",
        " ",
        "nan",
        "NaN",
        "None",
        "null",
        "inf",
        "-inf",
        "1e400",
        "-1",
        "-0",
        "0",
        "1.5",
        "9" * 40,
        "1709287200000",
        "4102444800",
        "4102444799.9",
        "2024-03-01",
        "2024-03-01T10:00:00",
        "2024-03-01T10:00:00Z",
        "2024-03-01T10:00:00+08:00",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "1600-01-01T00:00:00Z",
        "2100-01-01T00:00:00Z",
        "2024-13-45T99:00:00Z",
        "+08:00",
        "Z",
        "view",
        "purchase",
        "PURCHASE ",
        "share",
        "true",
        "\x00",
        "\n",
        "a\tb",
        "\u2028",
        "x" * 300,
        '"',
        ",",
        "🙂",
    ]
)
any_text = st.one_of(_NASTY, st.none(), st.text(max_size=20))
# ISO-shaped times with any year 0000-9999 and any zone: most fall outside what the loader can represent
iso_shaped = st.from_regex(
    r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])[T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?"
    r"(Z|[+-](0[0-9]|1[0-4]):?[0-5][0-9])?",
    fullmatch=True,
)
CHAOS_COLUMNS = (
    "user_id",
    "item_id",
    "event_type",
    "timestamp",
    "event_id",
    "target_user_id",
    "referrer_id",
    "session_id",
    "request_id",
    "quantity",
    "price",
)
chaos_rows = st.lists(
    st.fixed_dictionaries(
        {c: st.one_of(any_text, iso_shaped) if c == "timestamp" else any_text for c in CHAOS_COLUMNS}
    ),
    min_size=1,
    max_size=12,
)


# --- writing ------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict[str, object]], columns: tuple[str, ...]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else str(row[c]) for c in columns])


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))


def load_rows(rows: list[dict[str, object]], fmt: str, columns: tuple[str, ...]) -> Dataset:
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        if fmt == "csv":
            write_csv(directory / "events.csv", rows, columns)
        else:
            write_jsonl(directory / "events.jsonl", rows)
        return load_dataset(directory, EVENT_TYPES)


# --- (a) valid events come back equal ------------------------------------------------------------------------


def _assert_round_trip(dataset: Dataset, written: list[tuple[dict[str, object], pd.Timestamp, bool]]) -> None:
    assert dataset.rejects.empty, dataset.rejects[["row", "reason"]].to_dict("records")
    (check,) = dataset.checks
    assert (check.rows_read, check.duplicates, len(dataset.events)) == (len(written), 0, len(written))
    events = dataset.events.set_index("session_id")
    for row, utc, is_float in written:
        got = events.loc[str(row["session_id"])]
        assert got["user_id"] == row["user_id"]
        assert got["item_id"] == row["item_id"]
        assert isinstance(got["user_id"], str)
        assert isinstance(got["item_id"], str)
        assert got["event_type"] == row["event_type"]
        if is_float:
            # float seconds carry about 0.2 us of resolution at today's epoch; more is not promised
            assert abs(got["ts"] - utc) <= pd.Timedelta(microseconds=1), (row["timestamp"], got["ts"], utc)
        else:
            assert got["ts"] == utc, (row["timestamp"], got["ts"], utc)
    assert str(dataset.events["ts"].dtype) == "datetime64[ns, UTC]"
    assert dataset.events["ts"].is_monotonic_increasing


@LOADING
@given(valid_events())
def test_valid_events_round_trip_through_csv_and_jsonl(
    written: list[tuple[dict[str, object], pd.Timestamp, bool]],
) -> None:
    rows = [row for row, _, _ in written]

    from_csv = load_rows(rows, "csv", EVENT_COLUMNS)
    from_jsonl = load_rows(rows[::-1], "jsonl", EVENT_COLUMNS)

    _assert_round_trip(from_csv, written)
    _assert_round_trip(from_jsonl, written)
    # the content-derived event ids do not depend on the file format or the order of the rows
    csv_ids = from_csv.events.set_index("session_id")["event_id"].sort_index()
    jsonl_ids = from_jsonl.events.set_index("session_id")["event_id"].sort_index()
    assert csv_ids.to_dict() == jsonl_ids.to_dict()


# --- (b) arbitrary text never raises --------------------------------------------------------------------------


def _assert_every_row_accounted(dataset: Dataset, rows: list[dict[str, object]]) -> None:
    (check,) = dataset.checks
    assert check.rows_read == len(rows)
    assert check.rows_read == len(check.accepted) + check.rejected + check.duplicates
    assert check.rejects["reason"].map(lambda r: isinstance(r, str) and r != "").all()
    assert check.rejects["row"].between(1, len(rows)).all()
    assert check.accepted["ts"].notna().all()
    assert check.accepted["user_id"].notna().all()
    assert set(check.accepted["event_type"]) <= set(EVENT_TYPES)


@LOADING
@given(chaos_rows)
def test_arbitrary_text_is_accepted_rejected_or_a_duplicate(rows: list[dict[str, object]]) -> None:
    for fmt in ("csv", "jsonl"):
        _assert_every_row_accounted(load_rows(rows, fmt, CHAOS_COLUMNS), rows)


# --- (c) derived event ids ----------------------------------------------------------------------------------


optional_ids = st.one_of(st.none(), ids)
typed_rows = st.lists(
    st.tuples(ids, ids, st.sampled_from(EVENT_TYPES), utc_times, optional_ids, optional_ids, optional_ids),
    min_size=1,
    max_size=10,
)


def typed_frame(rows: list[tuple]) -> pd.DataFrame:
    """Accepted-event columns as `check_events` produces them (text ids, UTC `ts`)."""
    users, items, kinds, times, targets, referrers, sessions = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype="str"),
            "item_id": pd.Series(items, dtype="str"),
            "event_type": pd.Series(kinds, dtype="str"),
            "ts": pd.Series(pd.to_datetime(list(times), utc=True), dtype="datetime64[ns, UTC]"),
            "target_user_id": pd.Series(targets, dtype="str"),
            "referrer_id": pd.Series(referrers, dtype="str"),
            "session_id": pd.Series(sessions, dtype="str"),
        }
    )


@PROPERTY
@given(typed_rows)
def test_derived_event_ids_are_deterministic_and_equal_for_equal_content(rows: list[tuple]) -> None:
    events = typed_frame(rows)
    first = derive_event_ids(events)
    again = derive_event_ids(events.copy())
    doubled = derive_event_ids(pd.concat([events, events], ignore_index=True))
    reversed_ = derive_event_ids(events.iloc[::-1].reset_index(drop=True))

    assert first.tolist() == again.tolist()
    assert first.str.fullmatch(r"d-[0-9a-f]{16}").all()
    assert doubled.tolist() == first.tolist() * 2
    assert reversed_.tolist() == first.tolist()[::-1]
    assert first.index.equals(events.index)


@PROPERTY
@given(typed_rows, st.integers(min_value=1, max_value=10**12))
def test_derived_event_ids_differ_when_the_timestamp_differs(rows: list[tuple], shift_ns: int) -> None:
    events = typed_frame(rows)
    later = events.assign(ts=events["ts"] + pd.Timedelta(shift_ns, unit="ns"))

    before, after = derive_event_ids(events), derive_event_ids(later)

    assert all(a != b for a, b in zip(before, after, strict=True))
