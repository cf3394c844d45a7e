"""How `sharefeed serve` runs the app under uvicorn: httptools and uvloop, and TCP_NODELAY on every
connection.

With several workers uvicorn hands each process a socket it created without the TCP protocol number, so
asyncio does not switch Nagle's algorithm off and every answer on a kept-alive connection waits for the
client's delayed ACK (about 40 ms on Linux). The protocol below sets TCP_NODELAY itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class NoDelayHttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # not a TCP socket after all: nothing to switch off
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


HTTP_PROTOCOL = "serving.server:NoDelayHttpProtocol"
