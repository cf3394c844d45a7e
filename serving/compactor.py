"""The service's background compaction of the event log (features.compaction), so an erased user's events
leave the log within `ERASURE_RETENTION_HOURS`.

Every worker runs one small thread. Each minute it closes its own log files of past hours (a file is
compacted only once no writer holds it); every `COMPACTION_INTERVAL_SECONDS` it tries to compact, and the
lock file lets one worker at a time do it. Only counts are logged, never an id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from features.compaction import CompactionReport, compact
from features.eventlog import EventLog
from features.ledger import ControlLedger

log = logging.getLogger(__name__)

TICK_SECONDS = 60.0


class Compactor:
    def __init__(self, event_log: EventLog, ledger: ControlLedger, *, retention_seconds: float,
                 interval_seconds: float, tick_seconds: float = TICK_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.event_log = event_log
        self.ledger = ledger
        self.retention_seconds = retention_seconds
        self.interval_seconds = interval_seconds
        self.tick_seconds = min(tick_seconds, interval_seconds) if interval_seconds > 0 else tick_seconds
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> CompactionReport:
        """Close idle files of past hours, then compact with every erasure the log holds now."""
        self.event_log.release_idle()
        self.ledger.refresh()
        report = compact(self.event_log.directory, self.ledger.erasures(), now=self._clock(),
                         retention_seconds=self.retention_seconds)
        if report.skipped:
            log.debug("event log compaction: another process is at it")
            return report
        log.info("event log compaction: %d files checked, %d rewritten, %d events of erased users removed, "
                 "%d events redacted, %d files in use left for later", report.files_checked, report.files_rewritten,
                 report.rows_removed, report.rows_redacted, report.files_busy)
        if report.files_overdue:
            log.warning("event log compaction: %d files in use still hold erased users' events past the retention "
                        "period", report.files_overdue)
        return report

    def start(self) -> None:
        if self.interval_seconds <= 0:
            return  # compaction is run from cron (`sharefeed compact`)
        self._thread = threading.Thread(target=self._run, name="eventlog-compaction", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        last = -float("inf")
        while not self._stop.wait(self.tick_seconds):
            try:
                if time.monotonic() - last >= self.interval_seconds:
                    last = time.monotonic()
                    self.run_once()
                else:
                    self.event_log.release_idle()
            except Exception:  # a full disk or a bad file must not end compaction for the life of the worker
                log.exception("event log compaction failed")
