"""What the server keeps across restarts: file and batch records in SQLite, blobs on disk.

Layout of the data dir: ``server.sqlite3`` (WAL mode) and ``blobs/<random stored name>``. One
connection serves every thread behind a lock, so there is one writer and each read-modify-write
of a record is atomic. A record is its dataclass as JSON, next to the columns that are queried
(id, status) and an insertion sequence that orders lists.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import JobError
from .objects import ACTIVE, BatchRecord, FileRecord, new_stored_name

T = TypeVar("T", FileRecord, BatchRecord)

_STORED_NAME = re.compile(r"[0-9a-f]{32}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL,
    data TEXT NOT NULL);
"""
_TABLES: dict[type, str] = {FileRecord: "files", BatchRecord: "batches"}


class StoreError(JobError):
    """The data dir's database cannot be opened (a corrupt or foreign file): the server does
    not start."""


class UnknownCursor(LookupError):
    """A list's ``after`` names no object of that list."""


class Store:
    """File and batch records (SQLite) and blobs (files under ``data_dir/blobs``)."""

    def __init__(self, data_dir: Path) -> None:
        """Raises ``StoreError`` when the database is not a readable SQLite file (checked with
        ``PRAGMA quick_check``, which reads every page once)."""
        self.blob_dir = data_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        path = data_dir / "server.sqlite3"
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a killed process
            (check,) = self._db.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise StoreError(
                f"the server's database {path} is damaged ({e}); move it away to start with "
                "an empty data dir, or restore it from a backup"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # blobs

    def new_blob(self) -> tuple[str, Path]:
        """A fresh stored name and its (not yet existing) path."""
        name = new_stored_name()
        return name, self.blob_path(name)

    def remove_orphan_blobs(self) -> int:
        """Delete the blobs no record names (an upload or an output file that a crash left
        half written); returns how many. Call at start-up, before anything writes blobs."""
        with self._lock:
            files = self._db.execute("SELECT json_extract(data, '$.stored_name') FROM files")
            batches = self._db.execute("SELECT json_extract(data, '$.records_name') FROM batches")
            named = {row[0] for row in [*files.fetchall(), *batches.fetchall()]}
        orphans = [p for p in self.blob_dir.iterdir() if p.name not in named]
        for path in orphans:
            path.unlink(missing_ok=True)
        return len(orphans)

    def blob_path(self, stored_name: str) -> Path:
        if not _STORED_NAME.fullmatch(stored_name):
            raise ValueError(f"not a stored blob name: {stored_name!r}")
        return self.blob_dir / stored_name

    # records

    def add(self, record: FileRecord | BatchRecord) -> None:
        table = _TABLES[type(record)]
        cols, values = ["id", "data"], [record.id, _dump(record)]
        if isinstance(record, BatchRecord):
            cols.append("status")
            values.append(record.status)
        with self._lock:
            self._db.execute(
                f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                values,
            )

    def get(self, cls: type[T], object_id: str) -> T | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT data FROM {_TABLES[cls]} WHERE id = ?", (object_id,)
            ).fetchone()
        return cls(**json.loads(row[0])) if row else None

    def page(
        self,
        cls: type[T],
        after: str | None,
        limit: int,
        newest_first: bool = True,
        match: dict[str, str] | None = None,
    ) -> tuple[list[T], bool]:
        """Up to ``limit`` records after the one with id ``after``, and whether more follow;
        ``match`` keeps records whose fields equal its values (the files list's ``purpose``).
        Raises ``UnknownCursor`` for an ``after`` that names no record."""
        table = _TABLES[cls]
        names = {f.name for f in dataclasses.fields(cls)}
        where, args = [], []
        for name, value in (match or {}).items():
            if name not in names:  # the only text spliced into SQL is a known field name
                raise ValueError(f"{cls.__name__} has no field {name!r}")
            where.append(f"json_extract(data, '$.{name}') = ?")
            args.append(value)
        with self._lock:
            if after is not None:
                row = self._db.execute(f"SELECT seq FROM {table} WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise UnknownCursor(after)
                where.append(f"seq {'<' if newest_first else '>'} ?")
                args.append(row[0])
            rows = self._db.execute(
                f"SELECT data FROM {table}"
                + (f" WHERE {' AND '.join(where)}" if where else "")
                + f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
        records = [cls(**json.loads(r[0])) for r in rows]
        return records[:limit], len(records) > limit

    def update_batch(
        self,
        batch_id: str,
        change: Callable[[BatchRecord], dict[str, Any] | None],
        new_files: tuple[FileRecord, ...] = (),
    ) -> BatchRecord:
        """Apply ``change(current)`` (fields to replace, or None for none) atomically; when it
        changes something, ``new_files`` are added in the same transaction. Raises KeyError."""
        with self._lock:
            row = self._db.execute("SELECT data FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                raise KeyError(batch_id)
            batch = BatchRecord(**json.loads(row[0]))
            fields = change(batch)
            if not fields:
                return batch
            batch = dataclasses.replace(batch, **fields)
            with self._db:  # one transaction
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO files (id, data) VALUES (?, ?)",
                    [(f.id, _dump(f)) for f in new_files],
                )
                self._db.execute(
                    "UPDATE batches SET data = ?, status = ? WHERE id = ?",
                    (_dump(batch), batch.status, batch_id),
                )
        return batch

    def next_active_batch(self) -> BatchRecord | None:
        """The oldest batch that is not finished (queued, running, finalizing or cancelling)."""
        with self._lock:
            active = self._active_batches()
        return active[0] if active else None

    def delete_file(self, file_id: str) -> FileRecord | None:
        """Remove a file record and its blob; None when there is no such file. Raises
        ``FileInUse`` (removing nothing) while an unfinished batch reads the file."""
        with self._lock:
            row = self._db.execute("SELECT data FROM files WHERE id = ?", (file_id,)).fetchone()
            if row is None:
                return None
            for batch in self._active_batches():
                if batch.input_file_id == file_id:
                    raise FileInUse(batch.id)
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        record = FileRecord(**json.loads(row[0]))
        self.blob_path(record.stored_name).unlink(missing_ok=True)
        return record

    def _active_batches(self) -> list[BatchRecord]:
        rows = self._db.execute(
            f"SELECT data FROM batches WHERE status IN ({', '.join('?' * len(ACTIVE))}) "
            "ORDER BY seq",
            ACTIVE,
        ).fetchall()
        return [BatchRecord(**json.loads(r[0])) for r in rows]


class FileInUse(RuntimeError):
    """The file is the input of a batch that has not finished (its id is the message)."""


def _dump(record: FileRecord | BatchRecord) -> str:
    return json.dumps(dataclasses.asdict(record))
