"""``prefixbatch run``, ``prefixbatch plan`` and ``prefixbatch serve``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .chat.reasoning import REASONING_PARSERS
from .chat.render import ChatOptions
from .chat.template_source import chat_template_text
from .chat.tool_parsers import TOOL_CALL_PARSERS
from .config import EngineConfig, parse_memory
from .execution.attention.registry import backend_names
from .logs import log_to_stderr
from .policy import Policy

EXIT_JOB_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a job stopped by Ctrl-C

DESCRIPTION = (
    "Offline LLM batch inference on OpenAI batch files: prompts that share a prefix are "
    "grouped and each shared prefix is computed once."
)


def _version() -> str:
    try:
        return version("prefixbatch")
    except PackageNotFoundError:
        return "unknown"


def _model_args(p: argparse.ArgumentParser) -> None:
    """Options that decide which requests fit: used by both commands."""
    p.add_argument(
        "--model",
        help="Hugging Face model directory or GGUF file (default: the embedded SmolLM2-135M)",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=_memory_size,
        help="KV cache size, e.g. 512MiB or 2GiB (default: a share of free memory)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda or cuda:N; auto picks a GPU when there is one"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and KV cache precision; auto is float32 on the CPU",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        help="longest prompt plus answer in tokens (default: the model's context length)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="max_tokens for requests that set none",
    )
    p.add_argument(
        "--score-tokens",
        type=_score_tokens,
        help="a causal LM reranker's two answer tokens, false then true (e.g. no,yes for "
        "Qwen3-Reranker): /v1/score and /v1/rerank score p(true), the softmax over their "
        "logits at the pair's last token (vLLM's classifier_from_token)",
    )
    _chat_args(p)


def _score_tokens(value: str) -> tuple[str, str]:
    tokens = value.split(",")
    if len(tokens) != 2 or not all(tokens):
        raise argparse.ArgumentTypeError(f"two tokens, false then true: no,yes (got {value!r})")
    return tokens[0], tokens[1]


def _memory_size(value: str) -> int:
    """A memory size option's bytes; argparse shows the message of what it cannot parse."""
    try:
        return parse_memory(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _chat_template(value: str) -> str:
    try:
        return chat_template_text(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _chat_args(p: argparse.ArgumentParser) -> None:
    """How chat requests are rendered and their answers parsed: used by every command."""
    p.add_argument(
        "--chat-template",
        type=_chat_template,
        help="a Jinja chat template file (or its text) used instead of the model's, e.g. one "
        "that renders tools (examples/chat_templates/chatml_tools.jinja for the default model)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=["auto", "none", *TOOL_CALL_PARSERS],
        default="auto",
        help="how tool calls are read from answers; auto: from the chat template's format",
    )
    p.add_argument(
        "--reasoning-parser",
        choices=["auto", "none", *REASONING_PARSERS],
        default="auto",
        help="how a thought (<think>...</think>) is split into reasoning_content; auto: when "
        "the chat template has thoughts",
    )


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    fmt = _DefaultsFormatter
    parser = argparse.ArgumentParser(prog="prefixbatch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"prefixbatch {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run a batch file", description="Run a batch file.", formatter_class=fmt
    )
    run.add_argument("input", type=Path, help="OpenAI batch input file (.jsonl)")
    run.add_argument("-o", "--output", type=Path, required=True, help="output file (.jsonl)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an earlier run (also what happens when the output exists)",
    )
    run.add_argument("--overwrite", action="store_true", help="start over, discarding the output")
    run.add_argument("--quiet", action="store_true", help="print nothing but errors")
    _model_args(run)
    _engine_args(run)
    plan = sub.add_parser(
        "plan",
        help="show what sharing saves, without running the model",
        description="Show the prefix-sharing plan of a batch file without running the model.",
        formatter_class=fmt,
    )
    plan.add_argument("input", type=Path, help="OpenAI batch input file (.jsonl)")
    plan.add_argument("--json", action="store_true", help="print the report as JSON")
    _model_args(plan)
    serve = sub.add_parser(
        "serve",
        help="serve the OpenAI Files + Batches API over HTTP",
        description="Serve the OpenAI Files + Batches API: batches run one at a time, each "
        "planned as a whole.",
        formatter_class=fmt,
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on: 127.0.0.1 accepts connections from this machine only, "
        "0.0.0.0 from every network interface (then set --api-key)",
    )
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=Path("prefixbatch-data"),
        help="where files and batch state are kept (SQLite + blobs)",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("PREFIXBATCH_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $PREFIXBATCH_API_KEY; none: open)",
    )
    serve.add_argument(
        "--max-upload-size",
        type=_memory_size,
        default=200 * 2**20,
        help="largest uploaded file in bytes (e.g. 200MiB)",
    )
    _model_args(serve)
    _engine_args(serve)
    return parser


def _engine_args(p: argparse.ArgumentParser) -> None:
    """How requests are run: used by ``run`` and ``serve``."""
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="engine actors on a local Ray cluster (pip install 'prefixbatch[ray]')",
    )
    p.add_argument("--ray-address", help="run on an existing Ray cluster: auto or ray://...")
    p.add_argument(
        "--policy",
        choices=[p.value for p in Policy],
        default=Policy.BATCHLLM.value,
        help="batchllm: global prefix plan; fcfs-lru: file order with an LRU prefix cache "
        "(what vLLM does); fcfs: file order, no sharing",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=1024,
        help="prefill tokens per step (chunked prefill)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of requests that set none")
    p.add_argument(
        "--attention-backend",
        choices=["auto", *backend_names()],
        default="auto",
        help="auto: the fastest available here (triton on CUDA, the compiled kernel on the CPU "
        "in float32, torch otherwise); torch is the plain PyTorch reference",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    run_only = {}
    if args.command in ("run", "serve"):
        run_only = dict(
            max_num_batched_tokens=args.max_num_batched_tokens,
            policy=args.policy,
            seed=args.seed,
            attention_backend=args.attention_backend,
        )
    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len,
        score_tokens=args.score_tokens,
        **run_only,  # type: ignore[arg-type]
    )


def chat_options(args: argparse.Namespace) -> ChatOptions:
    return ChatOptions(args.chat_template, args.tool_call_parser, args.reasoning_parser)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import JobError, JobInterrupted

    if getattr(args, "resume", False) and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    log_to_stderr(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # stop as cleanly as on Ctrl-C
    try:
        config = engine_config(args)
        if args.command == "plan":
            return _plan(args, config)
        if args.command == "serve":
            return _serve(args, config)
        return _run(args, config)
    except JobError as e:  # a whole-job problem; anything else is a bug and keeps its traceback
        print(f"prefixbatch: error: {e}", file=sys.stderr)
        return EXIT_JOB_ERROR
    except JobInterrupted as e:
        print(f"prefixbatch: {e}; {resume_hint(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("prefixbatch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def resume_hint(argv: list[str]) -> str:
    """How to resume an interrupted ``run`` given its arguments: the same command, or, when it
    said ``--overwrite`` (which would throw the answers away again), that command without it."""
    if "--overwrite" not in argv:
        return "run the same command again to resume"
    command = shlex.join(["prefixbatch", *(a for a in argv if a != "--overwrite")])
    return f"to resume, run it again without --overwrite: {command}"


def _run(args: argparse.Namespace, config: EngineConfig) -> int:
    from .jobs.job import JobOptions, run_job

    summary = run_job(
        config,
        JobOptions(
            args.input,
            args.output,
            args.overwrite,
            args.default_max_tokens,
            args.quiet,
            args.workers,
            args.ray_address,
            chat_options(args),
        ),
    )
    if not args.quiet:
        for line in summary.lines():
            print(f"[prefixbatch] {line}", file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace, config: EngineConfig) -> int:
    from .jobs.planning_job import plan_job

    report, text = plan_job(config, args.input, args.default_max_tokens, chat_options(args))
    print(json.dumps(report) if args.json else text)
    return 0


def _serve(args: argparse.Namespace, config: EngineConfig) -> int:
    from .server import ServeOptions, serve

    serve(
        config,
        ServeOptions(
            args.host,
            args.port,
            args.data_dir,
            args.api_key,
            args.max_upload_size,
            args.default_max_tokens,
            args.workers,
            args.ray_address,
            chat_options(args),
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
