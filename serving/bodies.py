"""How request bodies are read: strict JSON (RFC 8259), parsed by orjson, on every route.

Python's `json` module, which FastAPI uses by default, also takes what JSON does not allow: `NaN` and
`Infinity`, and strings with a lone UTF-16 surrogate (`"\\ud800"`). Such a string cannot be written as
UTF-8 anywhere after (the event log, Redis, a segment file, even the 422 that echoes it), so it is refused
at the door with the parser's reason, as a 422 like any other malformed body.
"""

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            # orjson.JSONDecodeError is a json.JSONDecodeError: FastAPI answers it with 422 "json_invalid"
            self._json = orjson.loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed strictly (see the module's docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
