"""A validated data directory: the four tables of the contract, the rejects and the counts.

This is the one entry point every job uses to read data (`validate`, `train`, notebooks), so each sees
the same rows and the same reasons for the ones refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from features.eventlog import erased_users
from features.schema import Table
from features.tables import read_table
from features.validation import (
    REJECT_COLUMNS,
    TableCheck,
    check_events,
    check_items,
    check_social,
    check_users,
)


class RejectLimitError(ValueError):
    """More rows were refused than the configured share allows."""


@dataclass(slots=True)
class Dataset:
    events: pd.DataFrame
    items: pd.DataFrame | None
    users: pd.DataFrame | None
    social: pd.DataFrame | None
    checks: tuple[TableCheck, ...]
    erased_events: int = 0  # events left out because their user asked to be erased

    @property
    def rejects(self) -> pd.DataFrame:
        frames = [c.rejects for c in self.checks if not c.rejects.empty]
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in REJECT_COLUMNS})
        return pd.concat(frames, ignore_index=True)

    def summary(self) -> pd.DataFrame:
        """One row per table: rows read, accepted, duplicates collapsed, rejected, reject share."""
        return pd.DataFrame(
            [
                {
                    "table": c.table,
                    "rows": c.rows_read,
                    "accepted": len(c.accepted),
                    "duplicates": c.duplicates,
                    "rejected": c.rejected,
                    "reject_share": round(c.reject_share, 6),
                }
                for c in self.checks
            ]
        )

    def write_rejects(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rejects.to_csv(path, index=False)
        return path

    def enforce_reject_limit(self, max_share: float, rejects_path: Path) -> None:
        """Fail when any table refused more than `max_share` of its rows; the message names the file."""
        over = [c for c in self.checks if c.reject_share > max_share]
        if over:
            detail = ", ".join(f"{c.table} {c.rejected}/{c.rows_read} ({_percent(c.reject_share)})" for c in over)
            raise RejectLimitError(
                f"too many rejected rows: {detail} > limit {_percent(max_share)}; see {rejects_path}"
            )


def _percent(share: float) -> str:
    return f"{share * 100:.3g}%"


def load_dataset(data_dir: Path, event_types: Iterable[str]) -> Dataset:
    """Read and validate every table of `data_dir`; `event_types` are those configured with a weight."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory not found: {data_dir}")
    raw_events = read_table(data_dir, Table.EVENTS, required=True)
    assert raw_events is not None
    checks = [check_events(raw_events.frame, event_types)]
    tables: dict[str, pd.DataFrame | None] = {"items": None, "users": None, "social": None}
    for table, check in ((Table.ITEMS, check_items), (Table.USERS, check_users), (Table.SOCIAL, check_social)):
        raw = read_table(data_dir, table)
        if raw is not None:
            result = check(raw.frame)
            checks.append(result)
            tables[table.value] = result.accepted
    events = checks[0].accepted
    erased = erased_users(data_dir)  # erasures the event log recorded in DIR/control/
    dropped = 0
    if erased:
        gone = events["user_id"].isin(erased)
        dropped = int(gone.sum())
        events = events.loc[~gone].reset_index(drop=True)
        for column in ("target_user_id", "referrer_id"):  # other users' shares to them, purchases they referred
            if column in events.columns:
                named = events[column].isin(erased)
                if named.any():
                    events[column] = events[column].where(~named, None)
        for name, columns in (("users", ("user_id",)), ("social", ("user_id", "friend_id"))):
            frame = tables[name]
            if frame is not None:
                keep = ~np.logical_or.reduce([frame[c].isin(erased).to_numpy() for c in columns])
                tables[name] = frame.loc[keep].reset_index(drop=True)
    return Dataset(
        events=events,
        items=tables["items"],
        users=tables["users"],
        social=tables["social"],
        checks=tuple(checks),
        erased_events=dropped,
    )
