"""The server's contract, in process (the app on a real tiny engine, driven by Starlette's test
client): every response body of a full flow validates against the schemas of OpenAI's
published OpenAPI description (``data/openai_openapi_subset.json``, its source noted inside),
every response carries an ``x-request-id``, the key is checked before anything else, and every
failure (a request that fails while served, a forward pass that fails, a lost blob, a full
disk, a route that raises) is an OpenAI error body, never a text/plain 500."""

from __future__ import annotations

import codecs
import errno
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from starlette.testclient import TestClient
from test_job import chat_line, completion_line, write_jsonl

from prefixbatch.config import EngineConfig
from prefixbatch.detokenizer import OutputText
from prefixbatch.engine import LLMEngine
from prefixbatch.server import app as app_module
from prefixbatch.server.app import AppConfig, create_app
from prefixbatch.server.storage import Store
from prefixbatch.server.worker import BatchWorker

KEY = "sk-contract"
SUBSET = Path(__file__).parent / "data" / "openai_openapi_subset.json"
# Required fields the live API answers with null where the published schema says string: an
# empty page has no first or last id.
NULLABLE_REQUIRED = {("ListFilesResponse", "first_id"), ("ListFilesResponse", "last_id")}


def relaxed(schemas: dict[str, Any]) -> dict[str, Any]:
    """The published schemas with null allowed for properties that are not required (OpenAI's
    own examples answer null there, e.g. a Batch's ``failed_at``, and its SDKs type them as
    optional) and for ``NULLABLE_REQUIRED``."""

    def walk(node: Any, name: str | None) -> Any:
        if isinstance(node, list):
            return [walk(x, None) for x in node]
        if not isinstance(node, dict):
            return node
        out = {k: walk(v, None) for k, v in node.items() if k != "properties"}
        if "properties" in node:
            required = set(node.get("required", ()))
            out["properties"] = {
                key: (
                    walk(value, None)
                    if key in required and (name, key) not in NULLABLE_REQUIRED
                    else {"anyOf": [walk(value, None), {"type": "null"}]}
                )
                for key, value in node["properties"].items()
            }
        return out

    return {name: walk(schema, name) for name, schema in schemas.items()}


@pytest.fixture(scope="module")
def openai_schema() -> Any:
    """``validate(instance, "Batch")`` against the vendored schema of that name."""
    doc = json.loads(SUBSET.read_text())
    doc["components"]["schemas"] = relaxed(doc["components"]["schemas"])
    resource = Resource.from_contents(doc, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:openai", resource)

    def validate(instance: Any, name: str) -> None:
        ref = {"$ref": f"urn:openai#/components/schemas/{name}"}
        Draft202012Validator(ref, registry=registry).validate(instance)

    return validate


@pytest.fixture(scope="module")
def engine(tiny_models: dict[str, Path]) -> LLMEngine:
    config = EngineConfig(
        model=str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20
    )
    return LLMEngine(config)


def serve(engine: LLMEngine, data: Path, key: str | None = KEY) -> TestClient:
    data.mkdir(parents=True, exist_ok=True)
    store = Store(data)
    app = create_app(store, BatchWorker(store, engine), AppConfig(engine.model_name, key))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return TestClient(app, headers=headers, raise_server_exceptions=False)


@pytest.fixture
def client(engine: LLMEngine, tmp_path: Path) -> Iterator[TestClient]:
    with serve(engine, tmp_path / "data") as c:
        yield c


def upload(client: TestClient, path: Path) -> Any:
    with open(path, "rb") as f:
        return client.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": "batch"})


def wait(client: TestClient, batch_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not finish")


def run_batch(client: TestClient, path: Path, endpoint: str) -> dict[str, Any]:
    file_id = upload(client, path).json()["id"]
    body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
    return wait(client, client.post("/v1/batches", json=body).json()["id"])


def test_every_response_of_a_full_flow_matches_openais_schemas(  # type: ignore[no-untyped-def]
    client, openai_schema, tmp_path, monkeypatch
):
    def check(response: Any, name: str, status: int = 200) -> Any:
        assert response.status_code == status, response.text
        assert response.headers["x-request-id"].startswith("req_")
        openai_schema(response.json(), name)
        return response.json()

    served = marked_fault(monkeypatch)  # line 3 fails while it is served
    lines = [chat_line(0), chat_line(1), chat_line(2, max_tokens=7), chat_line(3)]
    lines += [{"custom_id": 5, "body": {}}, chat_line(6, logprobs=True, top_logprobs=2)]
    chat = write_jsonl(tmp_path / "chat.jsonl", lines)
    assert check(client.get("/v1/models"), "ListModelsResponse")["data"][0]["owned_by"]
    check(client.get("/v1/files"), "ListFilesResponse")
    file = check(upload(client, chat), "OpenAIFile")
    check(client.get("/v1/files"), "ListFilesResponse")
    check(client.get(f"/v1/files/{file['id']}"), "OpenAIFile")
    create = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions"}
    check(client.post("/v1/batches", json={**create, "completion_window": "24h"}), "Batch")
    check(client.post("/v1/batches", json=create), "ErrorResponse", 400)
    batch = check(client.get("/v1/batches"), "ListBatchesResponse")["data"][0]
    batch = wait(client, batch["id"])
    openai_schema(batch, "Batch")
    assert batch["status"] == "completed" and served
    assert batch["request_counts"] == {"total": 6, "completed": 4, "failed": 2}
    output = client.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    cached = 0
    for record in map(json.loads, output):
        openai_schema(record, "BatchRequestOutput")
        openai_schema(record["response"]["body"], "CreateChatCompletionResponse")
        assert record["response"]["body"]["choices"][0]["message"]["refusal"] is None
        for key in usage:
            usage[key] += record["response"]["body"]["usage"][key]
        cached += record["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert len(output) == 4 and batch["usage"]["input_tokens"] == usage["prompt_tokens"] > 0
    assert batch["usage"]["output_tokens"] == usage["completion_tokens"] > 0
    assert batch["usage"]["total_tokens"] == sum(usage.values())
    assert batch["usage"]["input_tokens_details"]["cached_tokens"] == cached
    errors = client.get(f"/v1/files/{batch['error_file_id']}/content").text.splitlines()
    by_line = {}
    for record in map(json.loads, errors):
        openai_schema(record, "BatchRequestOutput")
        by_line[record["error"]["line"]] = record
    assert by_line[5]["custom_id"] == "5"  # a string, as OpenAI's error file has it
    assert by_line[3]["custom_id"] == "chat-2" and by_line[3]["error"]["code"] == "server_error"
    assert by_line[3]["error"]["message"] == "line 3: detokenizing: RuntimeError: injected fault"
    check(client.post(f"/v1/batches/{batch['id']}/cancel"), "ErrorResponse", 409)
    check(client.get(f"/v1/batches/{batch['id']}"), "Batch")
    check(client.get("/v1/files/file-" + "0" * 24), "ErrorResponse", 404)
    check(client.get("/v1/files", headers={"Authorization": "Bearer no"}), "ErrorResponse", 401)
    check(client.delete(f"/v1/files/{file['id']}"), "DeleteFileResponse")

    completions = write_jsonl(tmp_path / "cmpl.jsonl", [completion_line(i) for i in range(3)])
    batch = run_batch(client, completions, "/v1/completions")
    openai_schema(batch, "Batch")
    for raw in client.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines():
        openai_schema(json.loads(raw)["response"]["body"], "CreateCompletionResponse")


def marked_fault(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Requests with max_tokens 7 fail while their text is built; returns the calls seen."""
    seen: list[int] = []
    original = OutputText.append

    def append(self: OutputText, token: int, stop_token: bool) -> bool:
        seen.append(token)
        if self.params.max_tokens == 7:
            raise RuntimeError("injected fault")
        return original(self, token, stop_token)

    monkeypatch.setattr(OutputText, "append", append)
    return seen


def test_a_failed_batch_never_leaves_the_engine_busy(client, engine, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    calls = {"n": 0}
    original = engine.runner.execute

    def execute(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the forward pass failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", execute)
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(4)])
    failed = run_batch(client, path, "/v1/chat/completions")
    assert failed["status"] == "failed"
    assert failed["errors"]["data"][0]["code"] == "server_error"
    assert "the forward pass failed" in failed["errors"]["data"][0]["message"]
    assert not engine.has_unfinished()
    engine.scheduler.check_integrity()
    done = run_batch(client, path, "/v1/chat/completions")  # the next batch runs
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 4


def test_the_key_comes_before_anything_else(engine, tmp_path):  # type: ignore[no-untyped-def]
    with serve(engine, tmp_path / "data", key=None) as open_client:
        assert open_client.get("/openapi.json").status_code == 200  # no key set: all open
    with serve(engine, tmp_path / "data") as keyed:
        anonymous = {"Authorization": ""}
        bad_body = keyed.post(
            "/v1/batches", content=b"{not json", headers={**anonymous, "content-type": "x"}
        )
        assert bad_body.status_code == 401 and bad_body.json()["error"]["code"] == "invalid_api_key"
        for path in ("/openapi.json", "/docs", "/redoc", "/v1/models", "/v1/nothing-here"):
            response = keyed.get(path, headers=anonymous)
            assert response.status_code == 401, path
            assert response.headers["x-request-id"].startswith("req_")
        health = keyed.get("/health", headers=anonymous)
        assert health.status_code == 200 and health.headers["x-request-id"]
        unknown = keyed.get("/v1/nothing-here")
        assert unknown.status_code == 404 and unknown.json()["error"]["message"]


def test_a_lost_blob_and_a_failing_route_are_openai_errors(client, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    file = upload(client, write_jsonl(tmp_path / "in.jsonl", [chat_line(0)])).json()
    for blob in (tmp_path / "data" / "blobs").iterdir():
        blob.unlink()
    lost = client.get(f"/v1/files/{file['id']}/content")
    assert lost.status_code == 500 and lost.headers["content-type"] == "application/json"
    assert "missing" in lost.json()["error"]["message"]
    assert lost.json()["error"]["type"] == "server_error"
    monkeypatch.setattr(Store, "page", lambda *a, **k: 1 / 0)
    broken = client.get("/v1/files")
    assert broken.status_code == 500 and broken.headers["content-type"] == "application/json"
    assert broken.json()["error"]["message"] == (
        "internal server error: ZeroDivisionError: division by zero"
    )
    assert broken.headers["x-request-id"].startswith("req_")


def test_a_full_disk_is_507_and_leaves_nothing_behind(client, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    blobs = tmp_path / "data" / "blobs"
    kept = upload(client, write_jsonl(tmp_path / "a.jsonl", [chat_line(0)])).json()
    before = set(blobs.iterdir())
    save = app_module._save

    async def full_disk(upload: Any, path: Path, limit: int) -> int:
        path.write_bytes(b'{"custom_id": "partial')  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(app_module, "_save", full_disk)
    refused = upload(client, write_jsonl(tmp_path / "b.jsonl", [chat_line(1)]))
    assert refused.status_code == 507 and "disk is full" in refused.json()["error"]["message"]
    assert set(blobs.iterdir()) == before  # the partial file is removed
    deleted = client.delete(f"/v1/files/{kept['id']}")  # deletes still work
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    monkeypatch.setattr(app_module, "_save", save)
    assert upload(client, tmp_path / "b.jsonl").status_code == 200


def test_partial_uploads_left_by_a_crash_are_removed_at_start_up(engine, tmp_path):  # type: ignore[no-untyped-def]
    with serve(engine, tmp_path / "data") as c:
        file_id = upload(c, write_jsonl(tmp_path / "in.jsonl", [chat_line(0)])).json()["id"]
    blobs = tmp_path / "data" / "blobs"
    (kept,) = blobs.iterdir()
    (blobs / ("0" * 32)).write_bytes(b'{"custom_id": "half')  # a crash mid-upload
    with serve(engine, tmp_path / "data") as c:
        assert list(blobs.iterdir()) == [kept]
        assert c.get(f"/v1/files/{file_id}/content").status_code == 200


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig crlf blank"])
def test_the_server_takes_every_file_the_cli_takes(client, tmp_path, encoding):  # type: ignore[no-untyped-def]
    lines = [{"custom_id": f"m{i}", "prompt": f"w{5 + i} w9", "max_tokens": 3} for i in range(3)]
    text = "\n".join(json.dumps(x) for x in lines) + "\n"
    path = tmp_path / "in.jsonl"
    if encoding == "utf-16":
        path.write_bytes(text.encode("utf-16"))  # with its byte-order mark
    else:
        crlf = text.replace("\n", "\r\n\r\n")
        path.write_bytes(codecs.BOM_UTF8 + crlf.encode())
    batch = run_batch(client, path, "/v1/completions")
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
