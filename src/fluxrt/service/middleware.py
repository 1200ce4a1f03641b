"""ASGI middleware: a hard cap on request bodies and security headers on every response.

BodyLimit(app, max_bytes): a Content-Length above the cap is refused with 413 before the body is read; a body sent
without one (chunked) is counted while it is read and refused the same way once it passes the cap.
SecurityHeaders(app): nosniff, no framing, no referrer leaks; HTML gets a same-origin content security policy
(the page works offline: it needs nothing from another origin).
"""

from __future__ import annotations

import json

CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'self'")  # fmt: skip


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "body_too_large"}}).encode()  # fmt: skip
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        too_big = f"the request body is larger than the limit of {self.max_bytes} bytes"
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                return await _send_error(send, 400, f"invalid Content-Length {length[:40]!r}")
            if int(length) > self.max_bytes:
                return await _send_error(send, 413, too_big)
        state = {"received": 0, "over": False, "started": False}

        async def counted_receive():
            if state["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["over"] = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer 413 below
            return message

        async def guarded_send(message):
            if state["over"]:
                return  # whatever the app says after a cut-off body is replaced by the 413
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await _send_error(send, 413, too_big)


class SecurityHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                         (b"referrer-policy", b"no-referrer")]  # fmt: skip
                ctype = dict(headers).get(b"content-type", b"")
                if ctype.startswith(b"text/html"):
                    extra.append((b"content-security-policy", CSP.encode()))
                headers += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
