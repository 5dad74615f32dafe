"""The server's SQLite store and batch worker, without HTTP or a model: pagination, atomic
updates, what survives a reopen, blob names, the upload check, expiry at dequeue."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from prefixbatch.server.objects import (
    BATCH_ID,
    BATCH_PREFIX,
    FILE_ID,
    FILE_PREFIX,
    BatchRecord,
    FileRecord,
    new_id,
)
from prefixbatch.server.storage import FileInUse, Store, UnknownCursor
from prefixbatch.server.uploads import BadUpload, check_jsonl
from prefixbatch.server.worker import BatchWorker


def make_file(store: Store, purpose: str = "batch") -> FileRecord:
    name, path = store.new_blob()
    path.write_text('{"custom_id": "a", "prompt": "w3"}\n')
    record = FileRecord(new_id(FILE_PREFIX), 35, int(time.time()), "in.jsonl", purpose, name)
    store.add(record)
    return record


def make_batch(store: Store, file_id: str, expires_at: int | None = None) -> BatchRecord:
    now = int(time.time())
    _, path = store.new_blob()
    batch = BatchRecord(
        new_id(BATCH_PREFIX),
        file_id,
        "/v1/completions",
        "24h",
        now,
        now + 86400 if expires_at is None else expires_at,
        "tiny",
        path.name,
    )
    store.add(batch)
    return batch


def test_ids_are_random_and_never_paths(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ids = {new_id(FILE_PREFIX) for _ in range(100)}
    assert len(ids) == 100 and all(FILE_ID.fullmatch(i) for i in ids)
    assert BATCH_ID.fullmatch(new_id(BATCH_PREFIX)) and not FILE_ID.fullmatch("file-../x")
    record = make_file(store)
    assert record.id not in str(store.blob_path(record.stored_name))
    for bad in ("../server.sqlite3", record.id, "/etc/passwd", ""):
        with pytest.raises(ValueError):
            store.blob_path(bad)


def test_pages_newest_first_with_cursor_and_filter(tmp_path: Path) -> None:
    store = Store(tmp_path)
    files = [make_file(store, "batch" if i % 2 == 0 else "batch_output") for i in range(5)]
    ids = [f.id for f in files]
    page, more = store.page(FileRecord, None, 2)
    assert [r.id for r in page] == ids[::-1][:2] and more
    page, more = store.page(FileRecord, ids[2], 10)
    assert [r.id for r in page] == [ids[1], ids[0]] and not more
    page, more = store.page(FileRecord, ids[2], 10, newest_first=False)
    assert [r.id for r in page] == [ids[3], ids[4]] and not more
    page, more = store.page(FileRecord, None, 10, match={"purpose": "batch"})
    assert [r.id for r in page] == [ids[4], ids[2], ids[0]] and not more
    page, more = store.page(FileRecord, ids[4], 1, match={"purpose": "batch"})
    assert [r.id for r in page] == [ids[2]] and more
    with pytest.raises(UnknownCursor):
        store.page(FileRecord, new_id(FILE_PREFIX), 10)
    with pytest.raises(ValueError):
        store.page(FileRecord, None, 10, match={"purpose) OR 1=1 --": "x"})


def test_records_survive_a_reopen_and_updates_are_atomic(tmp_path: Path) -> None:
    store = Store(tmp_path)
    source = make_file(store)
    first, second = make_batch(store, source.id), make_batch(store, source.id)
    assert store.next_active_batch() == first
    out_name, _ = store.new_blob()
    output = FileRecord(new_id(FILE_PREFIX), 0, 0, "o.jsonl", "batch_output", out_name)
    store.update_batch(
        first.id,
        lambda b: {"status": "completed", "output_file_id": output.id},
        new_files=(output,),
    )
    unchanged = store.update_batch(second.id, lambda b: None, new_files=(output,))
    assert unchanged == second  # no change, so no file added either
    store.close()
    store = Store(tmp_path)
    assert store.get(BatchRecord, first.id).status == "completed"  # type: ignore[union-attr]
    assert store.get(FileRecord, output.id) == output
    assert store.next_active_batch() == second
    with pytest.raises(FileInUse, match=second.id):
        store.delete_file(source.id)  # the queued batch still reads it
    assert store.get(FileRecord, source.id) == source
    assert store.delete_file(output.id) == output and store.get(FileRecord, output.id) is None
    assert store.delete_file(output.id) is None
    with pytest.raises(KeyError):
        store.update_batch(new_id(BATCH_PREFIX), lambda b: {"status": "failed"})


def test_upload_check_names_the_first_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"b": 2}\n')
    assert check_jsonl(path) == 2
    for text, expected in [
        ('{"a": 1}\n[1]\n', "line 2: expected a JSON object, got list"),
        # the column within the line, as `prefixbatch run` reports it (not the next line's 1)
        ('{"a": 1}\n{"a": \n', "line 2: invalid JSON: Expecting value: column 7"),
        ("\n\n", "holds no JSON lines"),
    ]:
        path.write_text(text)
        with pytest.raises(BadUpload, match=expected):
            check_jsonl(path)
    path.write_bytes(b'{"a": 1}\n\xff\n')
    with pytest.raises(BadUpload, match="line 2: not valid UTF-8"):
        check_jsonl(path)


def test_a_queued_batch_past_its_window_expires_at_dequeue(tmp_path: Path) -> None:
    store = Store(tmp_path)
    batch = make_batch(store, make_file(store).id, expires_at=int(time.time()) - 1)
    worker = BatchWorker(store, engine=None)  # type: ignore[arg-type]  # expiry needs no engine
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while store.get(BatchRecord, batch.id).status == "validating":  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        worker.stop()
    done = store.get(BatchRecord, batch.id)
    assert done is not None and done.status == "expired" and done.expired_at is not None
    assert json.dumps(done.to_openai())  # JSON-serialisable as is
    assert done.to_openai()["request_counts"] == {"total": 0, "completed": 0, "failed": 0}


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_database_stops_serve_with_one_line(tmp_path, capsys, damage):  # type: ignore[no-untyped-def]
    from prefixbatch.cli import main

    data = tmp_path / "data"
    db = data / "server.sqlite3"
    if damage == "garbage":
        data.mkdir()
        db.write_bytes(b"this is not a database" * 100)
    else:
        store = Store(data)
        for _ in range(40):
            make_file(store)
        store.close()
        db.write_bytes(db.read_bytes()[: db.stat().st_size // 2] + b"\0" * 4096)
    # No model is loaded: the store is opened first (a missing model would be another error).
    code = main(["serve", "--data-dir", str(data), "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("prefixbatch: error: the server's database") and "damaged" in err[0]


def test_orphan_blobs_are_removed_and_named_ones_kept(tmp_path: Path) -> None:
    store = Store(tmp_path)
    record = make_file(store)
    batch = make_batch(store, record.id)
    store.blob_path(batch.records_name).write_text("")  # a batch's record file is named too
    _, partial = store.new_blob()
    partial.write_text('{"custom_id": "half')
    assert store.remove_orphan_blobs() == 1 and not partial.exists()
    assert store.blob_path(record.stored_name).exists()
    assert store.blob_path(batch.records_name).exists()
