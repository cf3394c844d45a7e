"""Request dependencies every router shares."""

import uuid
from typing import Annotated

from fastapi import Depends, Header


async def request_id(x_request_id: Annotated[str | None, Header(max_length=128)] = None) -> str:
    """The caller's X-Request-ID, else a fresh one: every answer carries it."""
    return x_request_id or uuid.uuid4().hex


RequestId = Annotated[str, Depends(request_id)]
