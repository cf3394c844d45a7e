"""Reading the raw tables of a data directory: CSV (optionally gzipped), Parquet and JSON Lines.

Every column is read as text (ids stay strings: "007" is never 7); typing and checking the values is the
job of `features.validation`. Each row keeps its file and 1-based record number for the rejects file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.schema import EVENT_COLUMNS, ITEM_COLUMNS, SOCIAL_COLUMNS, Table

SUFFIXES = (".csv", ".csv.gz", ".parquet", ".jsonl", ".jsonl.gz", ".ndjson", ".json")
SOURCE_FILE = "_file"
SOURCE_ROW = "_row"
PARSE_ERROR = "_parse_error"  # why a record could not be read as a row; validation rejects it with that reason
CONTRACT_COLUMNS = frozenset(EVENT_COLUMNS + ITEM_COLUMNS + SOCIAL_COLUMNS)


class DataDirectoryError(ValueError):
    """The data directory cannot be read as a whole (missing table, unreadable file)."""


@dataclass(frozen=True, slots=True)
class RawTable:
    """A table as read: values text (or datetimes from typed files) or missing, plus `_file`, `_row`."""

    name: Table
    frame: pd.DataFrame
    files: tuple[Path, ...]


def _has_table_suffix(path: Path) -> bool:
    return any(path.name.endswith(suffix) for suffix in SUFFIXES)


def table_files(data_dir: Path, table: Table) -> list[Path]:
    """Files holding `table`: `events.csv`, `events-*.jsonl`, or any data file under an `events/` folder.

    The event log writes one file per process and hour into `events/`, so a data directory plus the log is
    one training set.
    """
    found = [
        p for p in sorted(data_dir.iterdir())
        if p.is_file() and _has_table_suffix(p)
        and (p.name.split(".")[0] == table.value or p.name.startswith(f"{table.value}-"))
    ]
    folder = data_dir / table.value
    if folder.is_dir():
        found += [p for p in sorted(folder.rglob("*")) if p.is_file() and _has_table_suffix(p)]
    return found


def _as_text(column: pd.Series) -> pd.Series:
    """Text form of a column that a typed format (Parquet, JSON) may have stored as numbers.

    Datetime columns stay datetimes (validation checks their zone); missing values stay missing.
    """
    if pd.api.types.is_datetime64_any_dtype(column.dtype):
        return column
    return column.astype("str")


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], compression="infer")
    except pd.errors.EmptyDataError:  # not even a header: no rows, as an empty JSON Lines file
        return pd.DataFrame()


def _read_parquet(path: Path) -> pd.DataFrame:
    frame: pd.DataFrame = pq.read_table(path).to_pandas()
    return frame


def _read_jsonl(path: Path) -> pd.DataFrame:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    records: list[dict[str, object]] = []
    line_numbers: list[int] = []
    with opener(path, "rb") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                value = {PARSE_ERROR: f"line {line_no} is not JSON: {exc}"}
            if not isinstance(value, dict):
                value = {PARSE_ERROR: f"line {line_no} is not a JSON object"}
            records.append(value)
            line_numbers.append(line_no)
    return _records_frame(records, line_numbers)


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_row(record: dict[str, object]) -> dict[str, object]:
    """The record, or what validation must reject it for (PARSE_ERROR): text that is not valid Unicode (a
    lone surrogate, which only a lenient JSON parser lets through), a contract column holding an object or
    an array."""
    for key, value in record.items():
        if not _is_unicode(key) or (isinstance(value, str) and not _is_unicode(value)):
            # such text cannot be written anywhere, not even to the rejects file: keep only the reason
            return {PARSE_ERROR: f"field {key!r:.40} is not valid Unicode text (a lone surrogate)"}
    for key in CONTRACT_COLUMNS.intersection(record):
        value = record[key]
        if isinstance(value, dict | list):
            kind = "an object" if isinstance(value, dict) else "an array"
            return {**record, PARSE_ERROR: f"{key} is {kind}, not a single value"}
    return record


def _records_frame(records: list[dict[str, object]], row_numbers: list[int]) -> pd.DataFrame:
    records = [_as_row(record) for record in records]
    # object dtype: a column of JSON integers with a gap must not turn into floats ("42" -> "42.0")
    columns = dict.fromkeys(key for record in records for key in record)
    frame = pd.DataFrame({c: pd.Series([r.get(c) for r in records], dtype=object) for c in columns})
    frame[SOURCE_ROW] = row_numbers
    return frame


def records_table(records: list[dict[str, object]], source: str) -> pd.DataFrame:
    """Records that arrived as JSON objects (an API batch) in the form `read_file` gives a file: text values,
    the source name, and the row number = the record's position in the batch."""
    frame = _records_frame(records, list(range(len(records))))
    frame = pd.DataFrame(
        {str(col): frame[col] if col == SOURCE_ROW else _as_text(frame[col]) for col in frame.columns},
        index=frame.index,
    )
    frame[SOURCE_FILE] = source
    return frame


def read_file(path: Path) -> pd.DataFrame:
    """One file as a frame of text values (None where missing), with its source columns."""
    name = path.name
    try:
        if name.endswith((".csv", ".csv.gz")):
            frame = _read_csv(path).replace({"": None})
        elif name.endswith(".parquet"):
            frame = _read_parquet(path)
        else:
            frame = _read_jsonl(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataDirectoryError(f"cannot read {path}: {exc}") from exc
    frame = pd.DataFrame(
        {str(col): frame[col] if col == SOURCE_ROW else _as_text(frame[col]) for col in frame.columns},
        index=frame.index,
    )
    frame[SOURCE_FILE] = str(path)
    if SOURCE_ROW not in frame.columns:  # JSON Lines already numbered its records by line
        frame[SOURCE_ROW] = range(1, len(frame) + 1)
    return frame.reset_index(drop=True)


def read_table(data_dir: Path, table: Table, *, required: bool = False) -> RawTable | None:
    """All files of one table, concatenated; None when the table is absent and optional."""
    files = table_files(data_dir, table)
    if not files:
        if required:
            raise DataDirectoryError(
                f"{data_dir} has no {table.value} table: expected {table.value}.csv[.gz], .parquet or .jsonl"
            )
        return None
    frames = [read_file(path) for path in files]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return RawTable(name=table, frame=frame, files=tuple(files))
