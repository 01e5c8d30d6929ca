"""Errors of the server: a bad launch setting (ServeError) and a bad HTTP request (APIError, OpenAI's error shape)."""

from __future__ import annotations

from typing import Any

from lorakit.errors import LorakitError


class ServeError(LorakitError):
    """A server setting or adapter path that cannot be used; raised before or while the server starts."""


class APIError(Exception):
    """One failed request: the HTTP status and the body OpenAI's clients parse, {"error": {...}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def model_not_found(name: str, known: list[str]) -> APIError:
    return APIError(
        404,
        f"The model `{name}` does not exist; served models: {', '.join(known)} (see GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def over_capacity(active: int, queued: int) -> APIError:
    return APIError(
        429,
        f"the server is at capacity ({active} requests decoding, {queued} waiting); retry later",
        type="rate_limit_error",
        code="rate_limit_exceeded",
    )
