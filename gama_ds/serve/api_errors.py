"""Errors a client caused, as OpenAI's API reports them, so that its clients raise the right
exception (`openai.BadRequestError`, `AuthenticationError`, ...) with the message in it."""

from __future__ import annotations

from ..errors import GamaDsError


class ApiError(GamaDsError):
    """A request the server refuses (4xx; 500 when generation fails), with the fields of OpenAI's
    error object. Raised inside a request's handler, where it becomes the response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body over the server's limit of {limit} bytes (--max-request-mb)",
        code="request_too_large",
    )
