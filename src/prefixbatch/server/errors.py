"""OpenAI-shaped API errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP
status (the OpenAI API reference's error object; the ``openai`` client maps 400, 401, 404, 409
and 413 to its ``BadRequestError``, ``AuthenticationError``, ``NotFoundError``, ... classes)."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client; raised anywhere in a route."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def not_found(kind: str, object_id: str, param: str = "id") -> APIError:
    """OpenAI's wording: ``No such File object: file-...``."""
    return APIError(404, f"No such {kind} object: {object_id}", param)
