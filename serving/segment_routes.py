"""HTTP routes of audience segments: query into a snapshot, page through it, export it, saved definitions.

Handlers parse, call one method of `serving.segment_service.Segments` and map the result. Snapshots live
as files under `settings.segments_dir`, shared by every worker process.
"""

from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import StreamingResponse

from serving import audit
from serving.bodies import StrictJSONRoute
from serving.deps import RequestId, privacy_of
from serving.segment_schemas import (
    MAX_PAGE,
    MemberOut,
    PageOut,
    QueryIn,
    RunIn,
    SavedListOut,
    SavedOut,
    SegmentDefinition,
    SnapshotOut,
)
from serving.segment_service import BadCursorError, Page, Segments, definition_json, engine_for, parse_definition
from serving.segment_snapshots import SnapshotMeta, SnapshotStore, UnknownSegmentError
from serving.segments import SegmentError
from serving.settings import ServingSettings

SegmentIdPath = Annotated[str, Path(min_length=1, max_length=64)]
SavedNamePath = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


def segments_router(settings: ServingSettings) -> APIRouter:
    """The segment routes; `settings.segments_dir` and `settings.segment_ttl_seconds` say where snapshots
    live and for how long."""
    snapshots = SnapshotStore(settings.segments_dir, settings.segment_ttl_seconds)
    router = APIRouter(prefix="/v1/segments", tags=["segments"], route_class=StrictJSONRoute)

    def segments(request: Request) -> Segments:
        recommender = getattr(request.app.state, "recommender", None)
        if recommender is None:
            raise HTTPException(status_code=503, detail="no model bundle is loaded")
        return Segments(engine_for(request.app.state, recommender.bundle), snapshots, privacy_of(request))

    SegmentsDep = Annotated[Segments, Depends(segments)]

    def snapshot_out(page: Page, request_id: str) -> SnapshotOut:
        meta = page.meta
        return SnapshotOut(request_id=request_id, segment_id=meta.segment_id, size=meta.size,
                           items=_members(page), next_cursor=page.next_cursor, bundle_version=meta.bundle_version,
                           created_at=meta.created_at, expires_at=meta.expires_at,
                           definition=parse_definition(meta.definition), saved_name=meta.saved_name)

    @router.post("/query", response_model=SnapshotOut)
    def query(body: QueryIn, service: SegmentsDep, request_id: RequestId) -> SnapshotOut:
        try:
            return snapshot_out(service.query(body.definition, body.page_size), request_id)
        except SegmentError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        except UnknownSegmentError as exc:
            raise HTTPException(status_code=404, detail=f"seed segment {exc.args[0]!r} not found or expired") from exc

    @router.get("/saved", response_model=SavedListOut)
    def saved_list(request_id: RequestId) -> SavedListOut:
        out = []
        for name in snapshots.saved_names():
            definition, updated = snapshots.saved(name)
            out.append(SavedOut(name=name, definition=parse_definition(definition), updated_at=updated))
        return SavedListOut(request_id=request_id, segments=out)

    @router.put("/saved/{name}", response_model=SavedOut)
    def save(name: SavedNamePath, definition: SegmentDefinition) -> SavedOut:
        updated = snapshots.save_definition(name, definition_json(definition))
        return SavedOut(name=name, definition=definition, updated_at=updated)

    @router.post("/saved/{name}/run", response_model=SnapshotOut)
    def run(name: SavedNamePath, service: SegmentsDep, request_id: RequestId, body: RunIn | None = None) -> SnapshotOut:
        try:
            return snapshot_out(service.run_saved(name, (body or RunIn()).page_size), request_id)
        except SegmentError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        except UnknownSegmentError as exc:
            raise HTTPException(status_code=404, detail=f"no saved segment or seed segment {exc.args[0]!r}") from exc

    @router.get("/{segment_id}", response_model=PageOut)
    def page(segment_id: SegmentIdPath, service: SegmentsDep, request_id: RequestId,
             cursor: Annotated[str | None, Query(max_length=32)] = None,
             limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> PageOut:
        try:
            result = service.page(segment_id, cursor, limit)
        except UnknownSegmentError as exc:
            raise HTTPException(status_code=404, detail=f"segment {segment_id!r} not found or expired") from exc
        except BadCursorError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return PageOut(request_id=request_id, segment_id=segment_id, size=result.meta.size, items=_members(result),
                       next_cursor=result.next_cursor)

    @router.get("/{segment_id}/export")
    def export(segment_id: SegmentIdPath, service: SegmentsDep, request: Request,
               format: Literal["csv", "parquet"] = "csv") -> StreamingResponse:
        who = getattr(request.state, "key_id", None) or "open-mode"
        key_name = getattr(request.state, "key_name", None)

        def audited(meta: SnapshotMeta, rows: int, complete: bool) -> None:
            audit.record(settings.audit_log, {"who": who, "key_name": key_name, "segment_id": meta.segment_id,
                                              "format": format, "definition": meta.definition, "rows": rows,
                                              "complete": complete})

        try:
            body: Iterator[bytes] = service.export(segment_id, format, audited)
        except UnknownSegmentError as exc:
            raise HTTPException(status_code=404, detail=f"segment {segment_id!r} not found or expired") from exc
        media = "text/csv" if format == "csv" else "application/vnd.apache.parquet"
        return StreamingResponse(body, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="segment-{segment_id}.{format}"'})

    return router


def _members(page: Page) -> list[MemberOut]:
    return [MemberOut(user_id=u, score=s) for u, s in zip(page.user_ids, page.scores, strict=True)]
