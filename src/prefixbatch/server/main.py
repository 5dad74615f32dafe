"""``prefixbatch serve``: load the engine once, then serve the OpenAI Files + Batches API."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..chat.render import ChatOptions
from ..config import EngineConfig
from ..jobs.job import make_executor
from .app import AppConfig, create_app
from .storage import Store
from .worker import BatchWorker, WorkerOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("prefixbatch-data")  # SQLite metadata and file blobs
    api_key: str | None = None
    max_upload_bytes: int = 200 * 2**20
    default_max_tokens: int = 256
    workers: int = 1  # > 1, or a ray_address: engine actors on Ray
    ray_address: str | None = None
    chat: ChatOptions = ChatOptions()  # chat template and tool-call / reasoning parsers


def serve(config: EngineConfig, opts: ServeOptions) -> None:
    """Open the data dir, load the executor (raises ``JobError`` when either cannot be), then
    serve until interrupted. Batches left unfinished by an earlier server on the same data dir
    resume first."""
    import uvicorn

    opts.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(opts.data_dir)  # a damaged database stops here, before the model loads
    try:
        engine = make_executor(config, opts.workers, opts.ray_address)
        worker = BatchWorker(store, engine, WorkerOptions(opts.default_max_tokens, chat=opts.chat))
        app = create_app(
            store, worker, AppConfig(engine.model_name, opts.api_key, opts.max_upload_bytes)
        )
        url = f"http://{opts.host}:{opts.port}/v1"
        log.info("serving the OpenAI Files and Batches API at %s (%s)", url, engine.model_name)
        uvicorn.run(app, host=opts.host, port=opts.port, log_level="info")
    finally:
        store.close()
