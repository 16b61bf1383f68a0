"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}} with an HTTP status.

Every client mistake is raised as an APIError with a 4xx status somewhere between reading the body
and handing requests to the scheduler, so no stream has started when it is answered.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def queue_full(retry_after: int) -> APIError:
    return APIError(
        429,
        "The server is at capacity: too many requests are waiting. Retry shortly.",
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after)},
    )


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="unavailable", headers={"Retry-After": "1"})
