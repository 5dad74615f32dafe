"""The server's records of files and batches, and their OpenAI JSON shapes.

Shapes follow the OpenAI API reference (File object, Batch object, list objects, error objects)
as the official ``openai`` Python client parses them (``openai/types/file_object.py``,
``openai/types/batch.py``, ``openai/pagination.py``). Ids are random (``secrets``) and never name
anything on disk: each record keeps its own random stored name for its blob.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

FILE_PREFIX = "file-"
BATCH_PREFIX = "batch_"
_ID_HEX = 24
FILE_ID = re.compile(rf"{FILE_PREFIX}[0-9a-f]{{{_ID_HEX}}}")
BATCH_ID = re.compile(rf"{BATCH_PREFIX}[0-9a-f]{{{_ID_HEX}}}")

COMPLETION_WINDOW_S = {"24h": 24 * 3600}  # the only window OpenAI accepts

BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
ACTIVE: tuple[BatchStatus, ...] = ("validating", "in_progress", "finalizing", "cancelling")


def new_id(prefix: str) -> str:
    """A fresh unguessable id, e.g. ``file-`` + 24 hex digits (96 random bits)."""
    return prefix + secrets.token_hex(_ID_HEX // 2)


def new_stored_name() -> str:
    """A fresh random name for a blob on disk, unrelated to any id."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class FileRecord:
    """An uploaded (purpose ``batch``) or generated (purpose ``batch_output``) JSONL file."""

    id: str
    bytes: int
    created_at: int  # unix seconds
    filename: str
    purpose: str
    stored_name: str  # the blob's name under the data dir's blobs/; never shown

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI File object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclass(frozen=True)
class BatchRecord:
    """One batch: its OpenAI fields plus the stored name of its combined record file (successes
    and errors in one crash-safe file, split into the output and error files at finalize)."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: int
    expires_at: int
    model: str
    records_name: str
    metadata: dict[str, str] | None = None
    status: BatchStatus = "validating"
    completed: int = 0  # request_counts
    failed: int = 0
    total: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)  # batch-level errors
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    # Token usage of the answered requests, OpenAI's shape: set when the batch is finalized.
    usage: dict[str, Any] | None = None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI Batch object."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": self.usage,
            "metadata": self.metadata,
        }


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """An OpenAI cursor page: ``{"object": "list", "data", "first_id", "last_id", "has_more"}``."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
