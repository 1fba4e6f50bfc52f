"""Serving errors: the project's LoraForgeError with the HTTP status and OpenAI error fields attached."""

from __future__ import annotations

from ..errors import LoraForgeError


class ServeError(LoraForgeError):
    """A request the server refuses: `status` is the HTTP code, `param` the offending field (or None)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error"}.get(self.status, "server_error")
