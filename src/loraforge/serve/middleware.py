"""Two plain ASGI middlewares: a request-body size cap, and a last-resort 500 that keeps the connection.

Why not Starlette's own handling: an exception handler for ``Exception`` answers 500 but then re-raises,
and uvicorn closes a connection whose application raised, so the client's next request on that kept-alive
connection was reset. ``CatchAll`` answers and does not re-raise.

``BodyLimit`` reads a request's whole body before the application sees it (at most ``max_bytes``, also
when no Content-Length is sent) and replays it, so an oversized body costs no more than the cap. Later
``receive`` calls reach the server unchanged: a route can still learn of the client's disconnect. A 413
keeps the connection open: uvicorn discards the rest of the body. Closing at once would make the kernel
reset the connection while the client is still sending, and the client could lose the 413 itself.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("loraforge")


async def send_error(send, status: int, message: str, kind: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = (f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                   "(serve --max-body-bytes)")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, 413, too_big, "invalid_request_error")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await send_error(send, 413, too_big, "invalid_request_error")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay():
            nonlocal replayed, body
            if replayed:
                return await receive()
            replayed = True
            out, body = body, b""  # the route's copy is the only one kept
            return {"type": "http.request", "body": out, "more_body": False}

        return await self.app(scope, replay, send)


class CatchAll:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:  # a bug: log it, answer 500, keep the connection usable
            log.exception("unhandled error")
            if not started:
                await send_error(send, 500, f"internal server error ({type(e).__name__})", "server_error")
