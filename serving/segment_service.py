"""Segments as the API and the CLI use them: evaluate a definition into a snapshot, read it back page by
page, export it, keep named definitions.

Every read checks the members again (`serving.privacy`: the event log's ledger with the online store), so a
user erased or opted out of marketing after a snapshot was taken disappears from its pages and exports too.
Exports carry the user id, the score and the definition (a leading `#` comment line in CSV, schema metadata
in Parquet), nothing else about a person, and are produced one row group at a time: memory stays flat
whatever the size.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import TypeAdapter

from serving.audit import counted
from serving.privacy import Privacy
from serving.segment_schemas import SegmentDefinition
from serving.segment_snapshots import ROW_GROUP, SnapshotMeta, SnapshotStore
from serving.segments import SegmentEngine, allowed_users
from training.bundle import Bundle

DEFINITION = TypeAdapter(SegmentDefinition)
PARQUET_METADATA_KEY = b"sharefeed.segment"


@dataclass(frozen=True, slots=True)
class Page:
    meta: SnapshotMeta
    user_ids: list[str]
    scores: list[float]
    next_cursor: str | None


def engine_for(holder: Any, bundle: Bundle) -> SegmentEngine:
    """The engine of this bundle, kept on `holder` (app.state) so its indexes are built once per bundle."""
    engine = getattr(holder, "segment_engine", None)
    if not isinstance(engine, SegmentEngine) or engine.bundle is not bundle:
        engine = SegmentEngine(bundle)
        holder.segment_engine = engine
    return engine


def definition_json(definition: SegmentDefinition) -> dict[str, object]:
    value: dict[str, object] = DEFINITION.dump_python(definition, mode="json")
    return value


def parse_definition(raw: dict[str, object]) -> SegmentDefinition:
    return DEFINITION.validate_python(raw)


def _purposes(meta: SnapshotMeta) -> list[str]:
    filters = meta.definition.get("filters")
    extra = filters.get("consent") if isinstance(filters, dict) else None
    return ["marketing", *(extra or [])]


class Segments:
    def __init__(self, engine: SegmentEngine, snapshots: SnapshotStore, privacy: Privacy) -> None:
        self.engine = engine
        self.snapshots = snapshots
        self.privacy = privacy

    def query(self, definition: SegmentDefinition, page_size: int, saved_name: str | None = None) -> Page:
        members = self.engine.evaluate(definition, self.privacy, seeds=self.snapshots.user_ids)
        ids = self.engine.bundle.users.ids[members.user_idx]
        meta = self.snapshots.create(ids, members.scores, definition_json(definition), self.engine.bundle.version,
                                     saved_name)
        return self._page(meta, 0, page_size)

    def run_saved(self, name: str, page_size: int) -> Page:
        raw, _ = self.snapshots.saved(name)
        return self.query(parse_definition(raw), page_size, saved_name=name)

    def page(self, segment_id: str, cursor: str | None, limit: int) -> Page:
        offset = decode_cursor(cursor)
        return self._page(self.snapshots.meta(segment_id), offset, limit)

    def _page(self, meta: SnapshotMeta, offset: int, limit: int) -> Page:
        ids, scores = self.snapshots.page(meta.segment_id, offset, limit)
        keep = allowed_users(ids, self.privacy, _purposes(meta))
        end = offset + len(ids)
        return Page(meta, [u for u, k in zip(ids, keep, strict=True) if k],
                    [s for s, k in zip(scores, keep, strict=True) if k],
                    str(end) if end < meta.size and limit > 0 else None)

    def _allowed_batches(self, segment_id: str) -> tuple[SnapshotMeta, Iterator[pa.RecordBatch]]:
        meta = self.snapshots.meta(segment_id)
        purposes = _purposes(meta)

        def batches() -> Iterator[pa.RecordBatch]:
            for batch in self.snapshots.batches(segment_id):
                keep = allowed_users(batch.column(0).to_pylist(), self.privacy, purposes)
                yield batch.filter(pa.array(keep))
        return meta, batches()

    def export(self, segment_id: str, format: str, done: Callable[[SnapshotMeta, int, bool], None]
               ) -> Iterator[bytes]:
        """The segment as CSV or Parquet bytes; `done(meta, rows, complete)` when the stream ends (the audit)."""
        meta, batches = self._allowed_batches(segment_id)
        audited = counted(batches, lambda rows, complete: done(meta, rows, complete))
        return csv_stream(_info(meta), audited) if format == "csv" else parquet_stream(_info(meta), audited)


def _info(meta: SnapshotMeta) -> dict[str, object]:
    return {"segment_id": meta.segment_id, "bundle_version": meta.bundle_version,
            "created_at": meta.created_at.isoformat(), "definition": meta.definition}


def csv_stream(info: dict[str, object], batches: Iterable[pa.RecordBatch]) -> Iterator[bytes]:
    """`# {json of info}` on the first line, then `user_id,score` rows."""
    yield b"# " + orjson.dumps(info) + b"\n"
    first = True
    for batch in batches:
        sink = io.BytesIO()
        pacsv.write_csv(batch, sink, pacsv.WriteOptions(include_header=first, quoting_style="needed"))
        first = False
        yield sink.getvalue()
    if first:
        yield b'"user_id","score"\n'


def parquet_stream(info: dict[str, object], batches: Iterable[pa.RecordBatch]) -> Iterator[bytes]:
    """A Parquet file (user_id, score; info as JSON under the schema metadata key PARQUET_METADATA_KEY),
    one row group per batch, bytes handed on as each row group is written."""
    sink = _Chunks()
    schema = pa.schema([("user_id", pa.string()), ("score", pa.float32())],
                       metadata={PARQUET_METADATA_KEY: orjson.dumps(info)})
    with pq.ParquetWriter(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
            yield sink.take()
    yield sink.take()


def write_segment(engine: SegmentEngine, definition: SegmentDefinition, privacy: Privacy, out: Path) -> int:
    """Evaluate a definition and write its members to `out` (.parquet, else CSV) as the API exports them;
    returns the number of members."""
    members = engine.evaluate(definition, privacy)
    ids = engine.bundle.users.ids[members.user_idx]
    info: dict[str, object] = {"bundle_version": engine.bundle.version,
                               "created_at": datetime.now(UTC).isoformat(), "definition": definition_json(definition)}
    batches = (pa.record_batch({"user_id": pa.array(ids[k:k + ROW_GROUP].tolist(), type=pa.string()),
                                "score": pa.array(members.scores[k:k + ROW_GROUP], type=pa.float32())})
               for k in range(0, len(ids), ROW_GROUP))
    stream = parquet_stream(info, batches) if out.suffix == ".parquet" else csv_stream(info, batches)
    with out.open("wb") as fh:
        for chunk in stream:
            fh.write(chunk)
    return len(ids)


class _Chunks(io.RawIOBase):
    """A write-only file whose bytes are taken away as they are produced (for streaming a Parquet file)."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class BadCursorError(ValueError):
    pass


def decode_cursor(cursor: str | None) -> int:
    if cursor is None or cursor == "":
        return 0
    if not cursor.isdigit() or len(cursor) > 12:
        raise BadCursorError(f"not a cursor of this segment: {cursor!r}")
    return int(cursor)
