"""Row checks for each table of the data contract, vectorized over a whole frame.

Each check names the first thing wrong with a row; rejected rows keep their file, row number and raw
values so nothing is dropped silently. Exact duplicate rows are collapsed and counted apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import orjson
import pandas as pd

from features.schema import (
    EVENT_OPTIONAL_STR,
    ITEM_STR,
    MAX_EPOCH_SECONDS,
    SOCIAL_KINDS,
)
from features.tables import PARSE_ERROR, SOURCE_FILE, SOURCE_ROW

MAX_ID_LENGTH = 256
# A zone counts only after a time of day: "2024-03-01" ends in "-01", which is a day, not an offset.
_ZONE_SUFFIX = r"[T ]\d{2}(?::?\d{2}(?::?\d{2}(?:[.,]\d+)?)?)?\s*(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$"
_EPOCH = pd.Timestamp(0, unit="s", tz="UTC")
_YEAR_2100 = pd.Timestamp(MAX_EPOCH_SECONDS, unit="s", tz="UTC")
_CONTROL = r"[\x00-\x1f\x7f]"
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}
REJECT_COLUMNS = ("table", "file", "row", "reason", "record")


@dataclass(slots=True)
class TableCheck:
    """The accepted rows of one table plus what was refused and collapsed."""

    table: str
    rows_read: int
    accepted: pd.DataFrame
    rejects: pd.DataFrame
    duplicates: int

    @property
    def rejected(self) -> int:
        return len(self.rejects)

    @property
    def reject_share(self) -> float:
        return self.rejected / self.rows_read if self.rows_read else 0.0

    def reasons(self) -> dict[str, int]:
        if self.rejects.empty:
            return {}
        kinds = self.rejects["reason"].str.split(":", n=1).str[0]
        return {str(k): int(v) for k, v in kinds.value_counts().items()}


@dataclass(slots=True)
class _Verdict:
    """Collects the first reason each row fails for."""

    index: pd.Index
    reason: pd.Series = field(init=False)

    def __post_init__(self) -> None:
        self.reason = pd.Series(None, index=self.index, dtype=object)

    def flag(self, mask: pd.Series | np.ndarray, reason: str | pd.Series) -> None:
        mask = pd.Series(mask, index=self.index).fillna(False).astype(bool) & self.reason.isna()
        if not mask.any():
            return
        if isinstance(reason, pd.Series):
            self.reason[mask] = reason.reindex(self.index)[mask]
        else:
            self.reason[mask] = reason

    @property
    def bad(self) -> pd.Series:
        return self.reason.notna()


def _data_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in (SOURCE_FILE, SOURCE_ROW)]


def _collapse_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop rows identical in every column (DESIGN: only those are duplicates)."""
    columns = _data_columns(frame)
    if not columns or frame.empty:
        return frame, 0
    dup = frame.duplicated(subset=columns, keep="first")
    return frame.loc[~dup], int(dup.sum())


def _begin(raw: pd.DataFrame) -> tuple[pd.DataFrame, int, _Verdict]:
    """Collapse exact duplicates and open a verdict; lines a JSON reader could not parse fail first."""
    frame, duplicates = _collapse_duplicates(raw)
    verdict = _Verdict(frame.index)
    if PARSE_ERROR in frame.columns:
        verdict.flag(frame[PARSE_ERROR].notna(), frame[PARSE_ERROR].astype(object))
    return frame, duplicates, verdict


def _check_id(verdict: _Verdict, frame: pd.DataFrame, column: str, *, required: bool) -> None:
    if column not in frame.columns:
        if required:
            verdict.flag(np.ones(len(frame), dtype=bool), f"missing column: {column}")
        return
    values = frame[column]
    if required:
        verdict.flag(values.isna(), f"missing {column}")
    text = values.fillna("")
    verdict.flag(values.notna() & (text.str.strip() == ""), f"blank {column}")
    verdict.flag(text.str.len() > MAX_ID_LENGTH, f"{column} longer than {MAX_ID_LENGTH} characters")
    verdict.flag(text.str.contains(_CONTROL, regex=True), f"{column} has control characters")


def parse_timestamps(values: pd.Series, column: str) -> tuple[pd.Series, pd.Series]:
    """UTC timestamps from ISO 8601 text with a zone or epoch seconds; and a reason where that fails.

    A number past 2100 is refused as probably milliseconds; a time without a zone is refused rather
    than guessed.
    """
    reason = pd.Series(None, index=values.index, dtype=object)
    parsed = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        if getattr(values.dt, "tz", None) is None:
            reason[values.notna()] = f"{column} has no time zone"
            return parsed, reason
        _store_in_range(values.dt.tz_convert("UTC").dropna(), parsed, reason, column)
        return parsed, reason

    text = values.astype("str").str.strip()
    numbers = pd.to_numeric(text, errors="coerce")
    is_number = numbers.notna()
    finite = is_number & np.isfinite(numbers.where(is_number, 0.0))
    reason[is_number & ~finite] = f"{column} is not a finite number"
    too_late = finite & (numbers >= MAX_EPOCH_SECONDS)
    reason[too_late] = text[too_late].map(
        lambda v: f"{column} {v} is after 2100: epoch seconds expected (milliseconds?)"
    )
    too_early = finite & (numbers < 0)
    reason[too_early] = f"{column} is before 1970"
    ok_number = finite & ~too_late & ~too_early
    if ok_number.any():
        seconds = numbers[ok_number].astype("float64")
        # Whole seconds and the fraction apart: float seconds * 1e9 would lose the fraction's last digits.
        whole = np.floor(seconds)
        nanos = whole.astype("int64") * 1_000_000_000 + np.round((seconds - whole) * 1e9).astype("int64")
        parsed[ok_number] = pd.to_datetime(nanos, unit="ns", utc=True)

    is_text = values.notna() & ~is_number
    has_zone = text.str.contains(_ZONE_SUFFIX, regex=True)
    reason[is_text & ~has_zone] = f"{column} has no time zone"
    zoned = is_text & has_zone
    if zoned.any():
        upper_z = text[zoned].str.replace(r"z$", "Z", regex=True)  # RFC 3339 allows a lowercase z
        iso = pd.to_datetime(upper_z, format="ISO8601", utc=True, errors="coerce")
        bad = iso.isna()
        reason[bad[bad].index] = text[bad[bad].index].map(lambda v: f"{column} is not ISO 8601: {v[:40]!r}")
        _store_in_range(iso[~bad], parsed, reason, column)
    parsed[reason.notna()] = pd.NaT
    return parsed, reason


def _store_in_range(times: pd.Series, parsed: pd.Series, reason: pd.Series, column: str) -> None:
    """Copy UTC times between 1970 and 2100 into `parsed`; give the others a reason."""
    late = times >= _YEAR_2100
    early = times < _EPOCH
    reason[late[late].index] = f"{column} is after 2100"
    reason[early[early].index] = f"{column} is before 1970"
    fine = times[~late & ~early]
    parsed[fine.index] = fine.astype("datetime64[ns, UTC]")


def _parse_number(verdict: _Verdict, frame: pd.DataFrame, column: str, *, allow_zero: bool = True) -> pd.Series:
    if column not in frame.columns:
        return pd.Series(np.nan, index=frame.index, dtype="float64")
    raw = frame[column]
    numbers = pd.to_numeric(raw, errors="coerce").astype("float64")
    verdict.flag(raw.notna() & numbers.isna(), f"{column} is not a number")
    verdict.flag(numbers.notna() & ~np.isfinite(numbers.fillna(0.0)), f"{column} is not finite")
    verdict.flag(numbers < 0, f"negative {column}")
    if not allow_zero:
        verdict.flag(numbers == 0, f"{column} must be positive")
    return numbers


def _first_row_of(frame: pd.DataFrame, key: str) -> pd.Series:
    """For rows whose `key` repeats an earlier row's, where that earlier row is ("file row N")."""
    where = frame[SOURCE_FILE].astype(str).map(lambda f: f.rsplit("/", 1)[-1]) + " row " + frame[SOURCE_ROW].astype(str)
    return where.groupby(frame[key], sort=False).transform("first")


def _rejects(table: str, frame: pd.DataFrame, verdict: _Verdict) -> pd.DataFrame:
    bad = frame.loc[verdict.bad]
    if bad.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in REJECT_COLUMNS})
    columns = _data_columns(bad)
    records = [
        orjson.dumps({c: (None if pd.isna(v) else str(v)) for c, v in zip(columns, row, strict=True)}).decode()
        for row in bad[columns].itertuples(index=False, name=None)
    ]
    return pd.DataFrame(
        {
            "table": table,
            "file": bad[SOURCE_FILE].to_numpy(),
            "row": bad[SOURCE_ROW].to_numpy(),
            "reason": verdict.reason[verdict.bad].to_numpy(),
            "record": records,
        }
    )


def derive_event_ids(frame: pd.DataFrame) -> pd.Series:
    """Content-derived ids for events that carry none, so a retried batch is recognised as the same.

    A keyed 64-bit hash over every field (time in epoch nanoseconds), computed the same way
    for a batch file and for one event arriving online.
    """
    def text(column: str) -> np.ndarray:
        if column not in frame.columns:
            return np.full(len(frame), "", dtype=object)
        values = frame[column]
        return values.astype(object).where(values.notna(), "").astype(str).to_numpy(dtype=object)

    def number(column: str) -> np.ndarray:
        if column not in frame.columns:
            return np.full(len(frame), -1.0)
        return frame[column].astype("float64").fillna(-1.0).to_numpy()

    columns: dict[str, np.ndarray] = {
        c: text(c)
        for c in ("user_id", "item_id", "event_type", "target_user_id", "referrer_id", "session_id", "request_id")
    }
    columns |= {c: number(c) for c in ("quantity", "price")}
    columns["ts"] = frame["ts"].astype("datetime64[ns, UTC]").astype("int64").to_numpy()
    hashed = pd.util.hash_pandas_object(pd.DataFrame(columns), index=False, hash_key="sharefeed-events")
    return pd.Series(
        np.char.add("d-", np.char.zfill(np.char.mod("%x", hashed.to_numpy()), 16)), index=frame.index
    ).astype("str")


def check_events(raw: pd.DataFrame, event_types: Iterable[str]) -> TableCheck:
    """Validate the events table; the accepted frame has typed columns and a `ts` in UTC."""
    frame, duplicates, verdict = _begin(raw)
    for column in ("user_id", "item_id"):
        _check_id(verdict, frame, column, required=True)
    for column in EVENT_OPTIONAL_STR:
        _check_id(verdict, frame, column, required=False)

    allowed = set(event_types)
    if "event_type" in frame.columns:
        kind = frame["event_type"].astype("str").str.strip().str.lower()
        verdict.flag(frame["event_type"].isna(), "missing event_type")
        unknown = frame["event_type"].notna() & ~kind.isin(allowed)
        verdict.flag(unknown, frame.loc[unknown, "event_type"].map(lambda v: f"unknown event_type: {v[:40]!r}"))
    else:
        kind = pd.Series("", index=frame.index)
        verdict.flag(np.ones(len(frame), dtype=bool), "missing column: event_type")

    if "timestamp" in frame.columns:
        verdict.flag(frame["timestamp"].isna(), "missing timestamp")
        ts, ts_reason = parse_timestamps(frame["timestamp"], "timestamp")
        verdict.flag(ts_reason.notna(), ts_reason)
    else:
        ts = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[ns, UTC]")
        verdict.flag(np.ones(len(frame), dtype=bool), "missing column: timestamp")

    quantity = _parse_number(verdict, frame, "quantity", allow_zero=False)
    price = _parse_number(verdict, frame, "price")

    def optional(column: str) -> pd.Series:
        if column in frame.columns:
            return frame[column].astype("str")
        return pd.Series(np.nan, index=frame.index, dtype="str")

    target = optional("target_user_id")
    referrer = optional("referrer_id")
    user = frame["user_id"].astype("str") if "user_id" in frame.columns else optional("user_id")
    verdict.flag(target.notna() & (target == user), "share to oneself: target_user_id equals user_id")
    verdict.flag(referrer.notna() & (referrer == user), "referrer_id equals user_id")

    event_id = optional("event_id")
    has_id = event_id.notna() & ~verdict.bad
    if has_id.any():
        keyed = frame.loc[has_id, [SOURCE_FILE, SOURCE_ROW]].assign(event_id=event_id[has_id])
        repeated = keyed["event_id"].duplicated(keep="first")
        first = _first_row_of(keyed, "event_id")
        verdict.flag(
            repeated.reindex(frame.index, fill_value=False),
            first[repeated].map(lambda r: f"event_id repeats {r} with other content"),
        )

    good = ~verdict.bad
    accepted = pd.DataFrame(
        {
            "user_id": user[good],
            "item_id": optional("item_id")[good],
            "event_type": kind[good].astype("str"),
            "ts": ts[good],
            "event_id": event_id[good],
            "target_user_id": target[good],
            "referrer_id": referrer[good],
            "session_id": optional("session_id")[good],
            "request_id": optional("request_id")[good],
            "quantity": quantity[good],
            "price": price[good],
        }
    )
    missing_id = accepted["event_id"].isna()
    if missing_id.any():
        accepted.loc[missing_id, "event_id"] = derive_event_ids(accepted.loc[missing_id])
    accepted = accepted.sort_values("ts", kind="stable").reset_index(drop=True)
    return TableCheck("events", len(raw), accepted, _rejects("events", frame, verdict), duplicates)


def _parse_bool(verdict: _Verdict, frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame.columns:
        return pd.Series(pd.NA, index=frame.index, dtype="boolean")
    text = frame[column].astype("str").str.strip().str.lower()
    out = pd.Series(pd.NA, index=frame.index, dtype="boolean")
    out[text.isin(_TRUE)] = True
    out[text.isin(_FALSE)] = False
    verdict.flag(frame[column].notna() & out.isna(), f"{column} is not true/false")
    return out


def _check_unique(verdict: _Verdict, frame: pd.DataFrame, key: str) -> None:
    if key not in frame.columns:  # every row is already refused for the missing column
        return
    repeated = frame[key].notna() & frame[key].duplicated(keep="first")
    if repeated.any():
        first = _first_row_of(frame, key)
        verdict.flag(repeated, first.map(lambda r: f"{key} repeats {r}"))


def check_items(raw: pd.DataFrame) -> TableCheck:
    """Validate the catalog; missing optional fields stay missing (features declare their defaults)."""
    frame, duplicates, verdict = _begin(raw)
    _check_id(verdict, frame, "item_id", required=True)
    _check_unique(verdict, frame, "item_id")
    price = _parse_number(verdict, frame, "price")
    in_stock = _parse_bool(verdict, frame, "in_stock")
    if "created_at" in frame.columns:
        created, created_reason = parse_timestamps(frame["created_at"], "created_at")
        verdict.flag(frame["created_at"].notna() & created_reason.notna(), created_reason)
    else:
        created = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[ns, UTC]")
    good = ~verdict.bad
    columns: dict[str, pd.Series] = {}
    for column in ITEM_STR:
        columns[column] = (
            frame.loc[good, column].astype("str") if column in frame.columns
            else pd.Series(np.nan, index=frame.index[good], dtype="str")
        )
    columns["price"] = price[good]
    columns["in_stock"] = in_stock[good]
    columns["created_at"] = created[good]
    accepted = pd.DataFrame(columns).reset_index(drop=True)
    return TableCheck("items", len(raw), accepted, _rejects("items", frame, verdict), duplicates)


def check_users(raw: pd.DataFrame) -> TableCheck:
    """Validate user attributes: a unique id per row; other columns are kept as text."""
    frame, duplicates, verdict = _begin(raw)
    _check_id(verdict, frame, "user_id", required=True)
    _check_unique(verdict, frame, "user_id")
    columns = [c for c in _data_columns(frame) if c != PARSE_ERROR]
    accepted = frame.loc[~verdict.bad, columns].reset_index(drop=True)
    return TableCheck("users", len(raw), accepted, _rejects("users", frame, verdict), duplicates)


def check_social(raw: pd.DataFrame) -> TableCheck:
    """Validate the social graph: friendships (undirected) and follows (directed)."""
    frame, duplicates, verdict = _begin(raw)
    _check_id(verdict, frame, "user_id", required=True)
    _check_id(verdict, frame, "friend_id", required=True)
    if "friend_id" in frame.columns and "user_id" in frame.columns:
        verdict.flag(frame["user_id"] == frame["friend_id"], "self loop: friend_id equals user_id")
    if "kind" in frame.columns:
        kind = frame["kind"].astype("str").str.strip().str.lower().fillna("friend")
    else:
        kind = pd.Series("friend", index=frame.index, dtype="str")
    unknown = ~kind.isin(SOCIAL_KINDS)
    verdict.flag(unknown, kind[unknown].map(lambda v: f"unknown kind: {v[:40]!r}"))
    good = ~verdict.bad
    accepted = pd.DataFrame(
        {
            "user_id": frame.loc[good, "user_id"].astype("str") if good.any() else pd.Series(dtype="str"),
            "friend_id": frame.loc[good, "friend_id"].astype("str") if good.any() else pd.Series(dtype="str"),
            "kind": kind[good],
        }
    ).reset_index(drop=True)
    return TableCheck("social", len(raw), accepted, _rejects("social", frame, verdict), duplicates)
