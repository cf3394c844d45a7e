"""The FastAPI application: a factory whose lifespan loads the bundle once.

Handlers parse, call one domain function and map the result; the model logic lives in
`serving.recommender`.
"""


import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request

from serving.recommender import FeedResult, Recommender
from serving.schemas import FeedItemOut, FeedOut, HealthOut
from serving.settings import ServingSettings
from training.bundle import Bundle, load_bundle


def _recommender(request: Request) -> Recommender:
    recommender: Recommender | None = getattr(request.app.state, "recommender", None)
    if recommender is None:
        raise HTTPException(status_code=503, detail="no model bundle is loaded")
    return recommender


def _request_id(x_request_id: Annotated[str | None, Header(max_length=128)] = None) -> str:
    return x_request_id or uuid.uuid4().hex


RecommenderDep = Annotated[Recommender, Depends(_recommender)]
RequestId = Annotated[str, Depends(_request_id)]


def _feed_out(result: FeedResult, request_id: str, version: str, explain: bool) -> FeedOut:
    return FeedOut(
        request_id=request_id,
        bundle_version=version,
        user_id=result.user_id,
        personalized=result.personalized,
        step=result.step.value if result.step else None,
        items=[
            FeedItemOut(item_id=i.item_id, score=i.score, source=i.source.value,
                        reason=i.reason if explain else None)
            for i in result.items
        ],
    )


def create_app(settings: ServingSettings, bundle: Bundle | None = None) -> FastAPI:
    """The service; `bundle` is loaded from `settings.bundle` at start-up when not given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = bundle if bundle is not None else (load_bundle(settings.bundle) if settings.bundle else None)
        app.state.recommender = Recommender(loaded) if loaded is not None else None
        yield
        app.state.recommender = None

    app = FastAPI(title="sharefeed", version="1", lifespan=lifespan,
                  description="Recommendations and audience segments for social e-commerce.")

    @app.get("/v1/users/{user_id}/feed", response_model=FeedOut, response_model_exclude_none=True)
    def feed(
        user_id: str,
        recommender: RecommenderDep,
        request_id: RequestId,
        n: Annotated[int, Query(ge=1, le=settings.max_n)] = 20,
        category: Annotated[str | None, Query(max_length=256)] = None,
        exclude: Annotated[list[str] | None, Query(max_length=1000)] = None,
        personalized: bool = True,
        explain: bool = False,
    ) -> FeedOut:
        excluded = [part for value in exclude or [] for part in value.split(",") if part]
        result = recommender.feed(user_id, n, category=category, exclude=excluded, personalized=personalized)
        return _feed_out(result, request_id, recommender.version, explain)

    @app.get("/healthz", response_model=HealthOut, response_model_exclude_none=True)
    def healthz() -> HealthOut:
        return HealthOut(status="ok")

    @app.get("/readyz", response_model=HealthOut)
    def readyz(request: Request) -> HealthOut:
        recommender: Recommender | None = getattr(request.app.state, "recommender", None)
        if recommender is None:
            raise HTTPException(status_code=503, detail="no model bundle is loaded")
        return HealthOut(status="ready", bundle_version=recommender.version)

    return app
