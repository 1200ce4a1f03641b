"""API errors: one exception type and the JSON body every 4xx / 5xx response carries.

Body (the OpenAI error shape, so the `openai` client raises its usual exceptions with our message):
    {"error": {"message": str, "type": "invalid_request_error" | "server_error" | ..., "param": field | null,
               "code": str | null}}
`message` names the field, the bad value and the limit (the texts of `fluxrt.request.RequestError`).
"""

from __future__ import annotations

import re

from ..request import RequestError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
         429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}  # fmt: skip
# RequestError names fields as fluxrt.request does ("refs[0]", "num_images"); the HTTP fields are these
FIELD_NAMES = {"refs": "image[]"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        kind = TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def from_request_error(e: RequestError, names: dict | None = None) -> ApiError:
    """A 400 whose `param` is the field the message starts with (mapped to the HTTP name)."""
    message = str(e)
    m = re.match(r"([a-z_]+)(\[\d+\])?", message)
    param = None
    if m and m.group(1) in {"prompt", "negative", "width", "height", "steps", "guidance", "seed", "num_images",
                            "refs", "size", "output_format", "match_image_size"}:  # fmt: skip
        param = (names or {}).get(m.group(1), FIELD_NAMES.get(m.group(1), m.group(1)))
    return ApiError(400, message, param)
