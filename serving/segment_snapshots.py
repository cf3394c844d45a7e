"""Segment snapshots and saved definitions as files in one directory that every worker process shares.

A snapshot is `<id>.parquet` (user_id, score; best first, in row groups so a page reads only what it
needs) and `<id>.json` (definition, bundle version, size, expiry), each written to a temporary name and
renamed, the metadata last: a reader sees a whole snapshot or none. Saved definitions are
`saved/<name>.json`. Expired snapshots are swept when a new one is written.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 65_536
SNAPSHOT_ID = re.compile(r"^[0-9a-f]{32}$")
SAVED_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class UnknownSegmentError(KeyError):
    """No such snapshot or saved definition (or it expired)."""


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    segment_id: str
    size: int
    bundle_version: str
    created_at: datetime
    expires_at: datetime
    definition: dict[str, object]
    saved_name: str | None

    def to_json(self) -> bytes:
        return orjson.dumps({
            "segment_id": self.segment_id, "size": self.size, "bundle_version": self.bundle_version,
            "created_at": self.created_at.isoformat(), "expires_at": self.expires_at.isoformat(),
            "definition": self.definition, "saved_name": self.saved_name,
        })

    @classmethod
    def from_json(cls, raw: bytes) -> SnapshotMeta:
        value = orjson.loads(raw)
        return cls(segment_id=value["segment_id"], size=int(value["size"]), bundle_version=value["bundle_version"],
                   created_at=datetime.fromisoformat(value["created_at"]),
                   expires_at=datetime.fromisoformat(value["expires_at"]), definition=value["definition"],
                   saved_name=value.get("saved_name"))


def _write_atomic(path: Path, write: Callable[[str], object]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SnapshotStore:
    def __init__(self, directory: Path, ttl_seconds: float) -> None:
        self.directory = Path(directory)
        self.ttl_seconds = ttl_seconds
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "saved").mkdir(exist_ok=True)

    # -- snapshots ---------------------------------------------------------------------------------
    def create(self, user_ids: np.ndarray, scores: np.ndarray, definition: dict[str, object], bundle_version: str,
               saved_name: str | None = None) -> SnapshotMeta:
        self.sweep()
        now = datetime.now(UTC)
        meta = SnapshotMeta(segment_id=uuid.uuid4().hex, size=len(user_ids), bundle_version=bundle_version,
                            created_at=now, expires_at=datetime.fromtimestamp(now.timestamp() + self.ttl_seconds, UTC),
                            definition=definition, saved_name=saved_name)
        table = pa.table({"user_id": pa.array(user_ids.tolist(), type=pa.string()),
                          "score": pa.array(np.asarray(scores, dtype=np.float32))})
        _write_atomic(self._data(meta.segment_id), lambda tmp: pq.write_table(table, tmp, row_group_size=ROW_GROUP))
        _write_atomic(self._meta(meta.segment_id), lambda tmp: Path(tmp).write_bytes(meta.to_json()))
        return meta

    def meta(self, segment_id: str) -> SnapshotMeta:
        if not SNAPSHOT_ID.match(segment_id):
            raise UnknownSegmentError(segment_id)
        try:
            meta = SnapshotMeta.from_json(self._meta(segment_id).read_bytes())
        except FileNotFoundError:
            raise UnknownSegmentError(segment_id) from None
        if meta.expires_at <= datetime.now(UTC):
            self._remove(segment_id)
            raise UnknownSegmentError(segment_id)
        return meta

    def page(self, segment_id: str, offset: int, limit: int) -> tuple[list[str], list[float]]:
        """Rows [offset, offset + limit) of the snapshot, reading only the row groups that hold them (the
        caller has checked `meta`)."""
        file = pq.ParquetFile(self._data(segment_id))
        ids: list[str] = []
        scores: list[float] = []
        start = 0
        for group in range(file.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            end = start + rows
            if end > offset and start < offset + limit:
                table = file.read_row_group(group)
                lo, hi = max(offset - start, 0), min(offset + limit - start, rows)
                ids += table.column("user_id").slice(lo, hi - lo).to_pylist()
                scores += table.column("score").slice(lo, hi - lo).to_pylist()
            start = end
            if start >= offset + limit:
                break
        return ids, scores

    def batches(self, segment_id: str, rows: int = ROW_GROUP) -> Iterator[pa.RecordBatch]:
        """The rows in order (the caller has checked `meta`)."""
        file = pq.ParquetFile(self._data(segment_id))
        yield from file.iter_batches(batch_size=rows)

    def user_ids(self, segment_id: str) -> list[str]:
        self.meta(segment_id)
        return [u for batch in self.batches(segment_id) for u in batch.column(0).to_pylist()]

    def sweep(self) -> int:
        """Delete expired snapshots; returns how many."""
        removed = 0
        now = datetime.now(UTC)
        for path in self.directory.glob("*.json"):
            try:
                meta = SnapshotMeta.from_json(path.read_bytes())
            except (OSError, ValueError, KeyError):
                continue
            if meta.expires_at <= now:
                self._remove(meta.segment_id)
                removed += 1
        return removed

    def _remove(self, segment_id: str) -> None:
        self._meta(segment_id).unlink(missing_ok=True)
        self._data(segment_id).unlink(missing_ok=True)

    def _data(self, segment_id: str) -> Path:
        return self.directory / f"{segment_id}.parquet"

    def _meta(self, segment_id: str) -> Path:
        return self.directory / f"{segment_id}.json"

    # -- saved definitions ---------------------------------------------------------------------------
    def save_definition(self, name: str, definition: dict[str, object]) -> datetime:
        if not SAVED_NAME.match(name):
            raise UnknownSegmentError(name)
        updated = datetime.now(UTC)
        raw = orjson.dumps({"name": name, "definition": definition, "updated_at": updated.isoformat()})
        _write_atomic(self.directory / "saved" / f"{name}.json", lambda tmp: Path(tmp).write_bytes(raw))
        return updated

    def saved(self, name: str) -> tuple[dict[str, object], datetime]:
        if not SAVED_NAME.match(name):
            raise UnknownSegmentError(name)
        try:
            value = orjson.loads((self.directory / "saved" / f"{name}.json").read_bytes())
        except FileNotFoundError:
            raise UnknownSegmentError(name) from None
        return value["definition"], datetime.fromisoformat(value["updated_at"])

    def saved_names(self) -> list[str]:
        return sorted(p.stem for p in (self.directory / "saved").glob("*.json"))
