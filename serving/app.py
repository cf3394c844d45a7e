"""The FastAPI application: a factory whose lifespan loads the bundle, opens the online store and the
event log, and follows reloads.

Handlers parse, call one domain function and map the result; the model logic lives in
`serving.recommender`, ingestion in `serving.ingest`.
"""


import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import faiss
import orjson
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from threadpoolctl import threadpool_limits

from features.eventlog import EventLog, EventLogError, consent_row, erase_row
from features.online import STORE_ERRORS, STORE_UNAVAILABLE, open_store
from features.store import CONSENT_PURPOSES, OnlineStore
from features.weights import DEFAULT_EVENT_WEIGHTS
from serving import metrics
from serving.auth import KeyRing, Keys, required_scope
from serving.auth import Scope as KeyScope
from serving.bodies import StrictJSONRoute
from serving.compactor import Compactor
from serving.deps import RequestId
from serving.ingest import EventsInFlightError, ingest
from serving.items import items_router
from serving.recommender import FeedResult, Recommender, UserContext, new_ties
from serving.runtime import Service
from serving.schemas import (
    ConsentIn,
    ConsentOut,
    ErasedOut,
    EventsIn,
    EventsOut,
    FeedItemOut,
    FeedOut,
    HealthOut,
    RankIn,
    RankOut,
    ReloadIn,
    ReloadOut,
    RowRejected,
    SocialOut,
)
from serving.segment_routes import segments_router
from serving.settings import ServingSettings
from serving.share_suggestions import share_router
from serving.social_proof import Proof
from serving.social_proof import reason as social_reason
from training.bundle import Bundle, BundleError

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 5  # what a 503 asks a client to wait: the event log refused a write, or the store is away
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class _Timing:
    """Pure ASGI middleware: latency per route template and status class, without a per-request task."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            metrics.REQUEST_SECONDS.labels(endpoint=endpoint, method=scope["method"]).observe(
                time.perf_counter() - started)
            metrics.RESPONSES.labels(endpoint=endpoint, status=f"{status[0] // 100}xx").inc()


class _BodyLimit:
    """413 for request bodies over `limit` bytes, whether announced (Content-Length) or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(send, self.limit)
            return
        seen = 0
        refused = False

        # A streamed body over the limit is answered here, and the app is told the client left: an exception
        # raised into the app's body reading would come back as its own 400.
        async def counting() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    await _too_large(send, self.limit)
                    return {"type": "http.disconnect"}
            return message

        async def sending(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting, sending)


async def _too_large(send: Callable[[Message], Awaitable[None]], limit: int) -> None:
    body = orjson.dumps({"detail": f"request body over {limit} bytes"})
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _authorize(request: Request) -> None:
    """Every route's gate: the scope it needs (serving.auth.ROUTE_SCOPES) against the caller's key."""
    keyring: KeyRing = request.app.state.keys.current()
    if not keyring.configured:
        return  # open mode: no key configured (said at start)
    route = request.scope.get("route")
    needed = required_scope(request.method, getattr(route, "path", request.url.path))
    if needed is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    entry = keyring.check(presented.strip()) if scheme.lower() == "bearer" else None
    if entry is None:
        raise HTTPException(status_code=401, detail="a valid API key is needed: Authorization: Bearer <key>",
                            headers={"WWW-Authenticate": "Bearer"})
    if needed not in entry.scopes and KeyScope.ADMIN not in entry.scopes:
        raise HTTPException(status_code=403, detail=f"this key lacks the {needed.value} scope")
    request.state.key_id = entry.id  # who, for the audit log
    request.state.key_name = entry.name
    limit = request.app.state.rate_limit
    if limit and request.app.state.service.recovery.ready:  # the limiter's store is away: let requests through
        try:
            count = request.app.state.store.hit(f"key:{entry.id}", 1)
        except STORE_ERRORS:  # the limiter's store is down: let the request through rather than fail it
            log.warning("rate limiter unavailable", exc_info=True)
            return
        if count > limit:
            raise HTTPException(status_code=429, detail=f"over {limit} requests per second for this key",
                                headers={"Retry-After": "1"})


async def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def _recommender(request: Request) -> Recommender:
    recommender = (await _service(request)).recommender
    if recommender is None:
        raise HTTPException(status_code=503, detail="no model bundle is loaded")
    return recommender


ServiceDep = Annotated[Service, Depends(_service)]
RecommenderDep = Annotated[Recommender, Depends(_recommender)]


def _feed_out(result: FeedResult, request_id: str, version: str, explain: bool, degraded: bool,
              proof: dict[str, Proof], named: bool) -> FeedOut:
    items = []
    for i in result.items:
        evidence = proof.get(i.item_id)
        social = (SocialOut(friends_bought=evidence.friends_bought,
                            friend_ids=list(evidence.friend_ids) if named else None) if evidence else None)
        reason = (social_reason(evidence, named) if evidence else i.reason) if explain else None
        items.append(FeedItemOut(item_id=i.item_id, score=i.score, source=i.source.value, reason=reason,
                                 social=social))
    return FeedOut(request_id=request_id, bundle_version=version, user_id=result.user_id,
                   personalized=result.personalized, step=result.step.value if result.step else None,
                   degraded=degraded, items=items)


def _social_proof(service: Service, recommender: Recommender, result: FeedResult,
                  context: UserContext | None) -> dict[str, Proof]:
    """Friends' purchases behind the feed's items (only for a personalized feed: it reads the user's ties),
    the bundle's and those the online store holds since."""
    if not result.personalized or not result.items:
        return {}
    codes = recommender.bundle.items.indexes([i.item_id for i in result.items])
    known = codes[codes >= 0].tolist()
    found = recommender.social.for_items(result.user_id, known, service.visible_in_social_proof,
                                         context.friends_purchased if context else None,
                                         new_ties(context.shared_to, context.referred_by,
                                                  recommender.bundle.state.cutoff_seconds) if context else ())
    return {recommender.bundle.items.id_of(idx): proof for idx, proof in found.items()}


def create_app(settings: ServingSettings, bundle: Bundle | None = None, store: OnlineStore | None = None) -> FastAPI:
    """The service; `bundle` is loaded from `settings.bundle` and the store opened from `settings.redis_url`
    at start-up when not given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One thread per request for BLAS and FAISS: requests run side by side, and a worker that spreads one
        # request over every core only makes the others wait (the ranker predicts on one thread too).
        threadpool_limits(1)
        faiss.omp_set_num_threads(1)
        online = store if store is not None else open_store(settings.redis_url, settings.redis_prefix)
        service = Service(settings, online, EventLog(settings.event_log), app.state)
        app.state.service = service
        compactor = Compactor(service.event_log, service.privacy.ledger,
                              retention_seconds=settings.erasure_retention_hours * 3600,
                              interval_seconds=settings.compaction_interval_seconds)
        app.state.compactor = compactor
        if bundle is not None:
            service.install(Recommender(bundle), bundle.path)
        elif settings.bundle is not None and settings.workers > 1:
            try:
                service.follow_pointer()  # `serve` named the bundle; a sibling may have reloaded another since
            except STORE_ERRORS:
                log.warning("online store unavailable at start: serving the bundle given", exc_info=True)
        if service.recommender is None and settings.bundle is not None:
            service.reload(settings.bundle)
        service.start()
        compactor.start()
        yield
        compactor.stop()
        service.stop()

    app = FastAPI(title="sharefeed", version="1", lifespan=lifespan, dependencies=[Depends(_authorize)],
                  description="Recommendations and audience segments for social e-commerce.")
    app.router.route_class = StrictJSONRoute  # bodies are strict JSON (serving.bodies), on the routers too
    app.state.keys = Keys(settings.keys_file, settings.api_keys)
    app.state.rate_limit = settings.rate_limit_per_second
    if not app.state.keys.ring.configured:
        log.warning("no API key configured (%s): the service answers anyone; create one with "
                    "`sharefeed keys create`", settings.keys_file)
    for error in STORE_UNAVAILABLE:
        app.add_exception_handler(error, _store_unavailable)
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(_Timing)
    _routes(app, settings)
    app.include_router(items_router(settings))
    app.include_router(share_router(settings))
    app.include_router(segments_router(settings))
    return app


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    """What an endpoint that cannot answer without the online store (catalog and rule writes, segments, which
    must leave out erased and opted-out users) says while it is away: a 503 with the reason, never a 500."""
    service: Service | None = getattr(request.app.state, "service", None)
    if service is not None:
        service.recovery.note_failure()
    log.warning("online store unavailable for %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": f"the online store is unavailable, retry later: {exc}"}, status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def app_from_environment() -> FastAPI:
    """The factory `serve` hands to uvicorn: each worker process builds its app from SHAREFEED_* settings."""
    return create_app(ServingSettings())


def _log_unavailable(what: str, exc: EventLogError) -> HTTPException:
    """The event log refused a write (a full disk, say): nothing was acknowledged nor left in the log."""
    return HTTPException(status_code=503, detail=f"{what} not stored, retry later: {exc}",
                         headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def _routes(app: FastAPI, settings: ServingSettings) -> None:
    # The feed runs on the event loop, not in the thread pool: it is CPU work under the GIL, and threads
    # taking turns at it only add switching (a worker process answers one feed at a time either way).
    @app.get("/v1/users/{user_id}/feed", response_model=FeedOut, response_model_exclude_none=True)
    async def feed(
        user_id: str,
        service: ServiceDep,
        recommender: RecommenderDep,
        request_id: RequestId,
        n: Annotated[int, Query(ge=1, le=settings.max_n)] = 20,
        category: Annotated[str | None, Query(max_length=256)] = None,
        exclude: Annotated[list[str] | None, Query(max_length=1000)] = None,
        min_price: Annotated[float | None, Query(ge=0)] = None,
        max_price: Annotated[float | None, Query(ge=0)] = None,
        personalized: bool = True,
        explain: bool = False,
    ) -> FeedOut:
        excluded = [part for value in exclude or [] for part in value.split(",") if part]
        view = service.user_view(user_id) if personalized else None
        allowed = personalized and (view is None or view.consent.get("personalization", True))
        rules = service.merchandising(recommender)
        diversity = ((settings.max_per_category, settings.diversity_window)
                     if settings.max_per_category is not None else None)
        result = recommender.feed(user_id, n, category=category, exclude=excluded, personalized=allowed,
                                  context=view.context if view else None, price_range=(min_price, max_price),
                                  rules=rules, diversity=diversity)
        metrics.FEED_STEPS.labels(step=result.step.value if result.step else "empty").inc()
        if result.ranked:
            metrics.CANDIDATES.observe(result.ranked)
        degraded = bool(view and view.degraded)
        if degraded:
            metrics.DEGRADED.labels(endpoint="feed").inc()
        proof = _social_proof(service, recommender, result, view.context if view and allowed else None)
        return _feed_out(result, request_id, recommender.version, explain, degraded, proof,
                         settings.social_proof_names)

    @app.post("/v1/rank", response_model=RankOut, response_model_exclude_none=True)
    def rank(body: RankIn, service: ServiceDep, recommender: RecommenderDep, request_id: RequestId) -> RankOut:
        view = service.user_view(body.user_id)
        allowed = view.consent.get("personalization", True)
        result = recommender.rank(body.user_id, body.item_ids, context=view.context, personalized=allowed)
        return RankOut(
            request_id=request_id, bundle_version=recommender.version, user_id=body.user_id,
            personalized=result.personalized,
            items=[FeedItemOut(item_id=i.item_id, score=i.score, source=i.source.value,
                               reason=i.reason if body.explain else None) for i in result.items],
        )

    @app.post("/v1/events", response_model=EventsOut)
    def events(body: EventsIn, service: ServiceDep, request_id: RequestId) -> EventsOut:
        if len(body.events) > settings.max_batch:
            raise HTTPException(status_code=413, detail=f"a batch holds at most {settings.max_batch} events, "
                                                        f"this one has {len(body.events)}")
        recommender = service.recommender
        weights = recommender.bundle.manifest.event_weights if recommender else None
        types = sorted(weights or DEFAULT_EVENT_WEIGHTS)
        try:
            result = ingest(body.events, event_types=types, online=service.recovery, event_log=service.event_log,
                            category_of=recommender.category_of if recommender else (lambda _: None))
        except EventLogError as exc:
            metrics.EVENTS.labels(outcome="unavailable").inc(len(body.events))
            raise _log_unavailable("events", exc) from exc
        except EventsInFlightError as exc:
            metrics.EVENTS.labels(outcome="unavailable").inc(len(body.events))
            raise HTTPException(status_code=503, detail=f"not stored: {exc}",
                                headers={"Retry-After": "1"}) from exc  # an append takes milliseconds
        metrics.EVENTS.labels(outcome="accepted").inc(result.accepted)
        metrics.EVENTS.labels(outcome="duplicate").inc(result.duplicates)
        metrics.EVENTS.labels(outcome="rejected").inc(len(result.rejected))
        if not result.store_updated:
            metrics.DEGRADED.labels(endpoint="events").inc()
        return EventsOut(request_id=request_id, accepted=result.accepted, duplicates=result.duplicates,
                         rejected=[RowRejected(index=r.index, reason=r.reason) for r in result.rejected],
                         online_updated=result.store_updated)

    # Consent and erasure are in force once the log holds them (this worker's ledger notes the row at once,
    # the others read it within CONTROL_REFRESH_SECONDS); the store is a projection a replay can catch up.
    @app.put("/v1/users/{user_id}/consent", response_model=ConsentOut)
    def consent(user_id: str, body: ConsentIn, service: ServiceDep, request_id: RequestId) -> ConsentOut:
        purposes = {k: v for k, v in body.model_dump().items() if v is not None}
        if not purposes:
            raise HTTPException(status_code=422, detail=f"give at least one of {', '.join(CONSENT_PURPOSES)}")
        row = consent_row(user_id, purposes, time.time())
        try:
            service.event_log.append([row])
        except EventLogError as exc:
            raise _log_unavailable("consent", exc) from exc
        service.privacy.ledger.note(row)
        service.recovery.apply_control(row)  # now, or when the store is back: the log has it either way
        return ConsentOut(request_id=request_id, user_id=user_id, **service.privacy.standing(user_id).consent)

    @app.delete("/v1/users/{user_id}", response_model=ErasedOut, status_code=202)
    def erase(user_id: str, service: ServiceDep, request_id: RequestId) -> ErasedOut:
        row = erase_row(user_id, time.time())
        try:
            service.event_log.append([row])
        except EventLogError as exc:
            raise _log_unavailable("erasure", exc) from exc
        service.privacy.ledger.note(row)
        service.recovery.apply_control(row)
        return ErasedOut(request_id=request_id, user_id=user_id, erased=True)

    @app.post("/v1/admin/reload", response_model=ReloadOut)
    def reload(service: ServiceDep, request_id: RequestId,
               body: Annotated[ReloadIn | None, Body()] = None) -> ReloadOut:
        current = service.loaded
        target = body.bundle if body is not None and body.bundle is not None else (
            current.path if current is not None else settings.bundle)
        if target is None:
            raise HTTPException(status_code=422, detail="no bundle given and none loaded")
        try:
            version, previous = service.reload(Path(target))
        except BundleError as exc:
            raise HTTPException(status_code=422, detail=f"bundle refused, still serving the previous one: {exc}"
                                ) from exc
        return ReloadOut(request_id=request_id, bundle_version=version, previous_version=previous,
                         bundle=str(target))

    @app.get("/metrics", include_in_schema=False)
    def metrics_text() -> Response:
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    @app.get("/healthz", response_model=HealthOut, response_model_exclude_none=True)
    def healthz() -> HealthOut:
        return HealthOut(status="ok")

    @app.get("/readyz", response_model=HealthOut)
    def readyz(service: ServiceDep) -> HealthOut:
        recommender = service.recommender
        if recommender is None:
            raise HTTPException(status_code=503, detail="no model bundle is loaded")
        return HealthOut(status="ready", bundle_version=recommender.version)

