"""The audit log of segment exports: who pulled which list of people, when, and how many rows.

One JSON line per export in `SHAREFEED_AUDIT_LOG` (default `~/.sharefeed/audit.jsonl`), flushed and
fsync'ed when the export ends — completed or cut off — so a list that left the service is always on
record. It holds when (`at`), who (the key's id and name, never the key), the segment id and definition,
the format, the rows sent and whether the export completed; never a row.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

_lock = threading.Lock()


def record(path: Path, entry: dict[str, Any]) -> None:
    """Append one audit entry (with the time) and make it durable."""
    line = orjson.dumps({"at": datetime.now(UTC).isoformat(), **entry}) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def counted(batches: Iterable[pa.RecordBatch], done: Callable[[int, bool], None]) -> Iterator[pa.RecordBatch]:
    """`batches` as they are, calling `done(rows, complete)` once the export ends, however it ends."""
    rows, complete = 0, False
    try:
        for batch in batches:
            rows += batch.num_rows
            yield batch
        complete = True
    finally:
        done(rows, complete)
