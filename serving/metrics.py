"""Service metrics in the Prometheus text format, correct with several worker processes.

With one process the default registry is served. With several (`serve --workers N`), the CLI points
`PROMETHEUS_MULTIPROC_DIR` at a fresh directory before the workers start; each worker writes its samples
there and `/metrics`, whichever worker answers, aggregates all of them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUEST_SECONDS = Histogram("sharefeed_request_seconds", "Request latency by endpoint", ["endpoint", "method"],
                            buckets=_BUCKETS)
RESPONSES = Counter("sharefeed_responses_total", "Responses by endpoint and status class",
                    ["endpoint", "status"])
EVENTS = Counter("sharefeed_events_total", "Ingested event rows by outcome", ["outcome"])
FEED_STEPS = Counter("sharefeed_feed_steps_total", "Feeds by the fallback step that answered first", ["step"])
DEGRADED = Counter("sharefeed_degraded_total", "Requests answered without the online store", ["endpoint"])
BUNDLE = Gauge("sharefeed_bundle_info", "The bundle a worker serves (value 1, version as a label)", ["version"],
               multiprocess_mode="liveall")
CANDIDATES = Histogram("sharefeed_candidates_ranked", "Candidates the ranker scored per personalized feed",
                       buckets=(0, 50, 100, 150, 200, 250, 300, 500, 1000))
RELOADS = Counter("sharefeed_reloads_total", "Bundle reloads by outcome", ["outcome"])
# The online store through outages (serving.recovery). With several workers the store counts as up only when
# every live worker finds it in line.
ONLINE_STORE_UP = Gauge("sharefeed_online_store_up", "1 when the online store answers and is in line with the "
                        "event log, 0 while events wait for it", multiprocess_mode="livemin")
BACKLOG = Gauge("sharefeed_online_backlog_events", "Logged events waiting for the online store",
                multiprocess_mode="livesum")
RECOVERED = Counter("sharefeed_online_recovered_events_total", "Logged events recorded into the online store "
                    "after an outage, by how (backlog, rebuild, overflow)", ["how"])
REBUILDS = Counter("sharefeed_online_rebuilds_total", "Rebuilds of an emptied online store from the event log")


def set_bundle(version: str, previous: str | None) -> None:
    if previous is not None and previous != version:
        BUNDLE.remove(previous)
    BUNDLE.labels(version=version).set(1)


def render() -> tuple[bytes, str]:
    """The exposition text of every worker's metrics and its content type."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
