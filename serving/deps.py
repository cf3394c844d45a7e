"""Request dependencies every router shares."""

import uuid
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from serving.privacy import Privacy


async def request_id(x_request_id: Annotated[str | None, Header(max_length=128)] = None) -> str:
    """The caller's X-Request-ID, else a fresh one: every answer carries it."""
    return x_request_id or uuid.uuid4().hex


RequestId = Annotated[str, Depends(request_id)]


def privacy_of(request: Request) -> Privacy:
    """The running service's consent and erasure check (set up with the service; see serving.privacy)."""
    privacy = getattr(request.app.state, "privacy", None)
    if not isinstance(privacy, Privacy):
        raise HTTPException(status_code=503, detail="the service is not started")
    return privacy


async def _privacy(request: Request) -> Privacy:
    return privacy_of(request)


PrivacyDep = Annotated[Privacy, Depends(_privacy)]
