"""``prefixbatch run``, ``prefixbatch plan`` and ``prefixbatch serve``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import EngineConfig, parse_memory

EXIT_JOB_ERROR = 2


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model directory or GGUF file (default: SmolLM2-135M)")
    p.add_argument(
        "--kv-cache-memory",
        type=parse_memory,
        help="KV pool size, e.g. 512MiB or 2GiB (default: a share of free memory)",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--policy", choices=["batchllm", "fcfs-lru", "fcfs"], default="batchllm")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=1024,
        help="prefill tokens per step (chunked prefill)",
    )
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--default-max-tokens", type=int, default=256, help="max_tokens for requests that set none"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a batch file")
    run.add_argument("input", type=Path)
    run.add_argument("-o", "--output", type=Path, required=True)
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an earlier run (also the default when the output exists)",
    )
    run.add_argument("--overwrite", action="store_true", help="start over, discarding the output")
    run.add_argument("--quiet", action="store_true")
    _executor_args(run)
    _engine_args(run)
    plan = sub.add_parser("plan", help="report the prefix-sharing plan without running it")
    plan.add_argument("input", type=Path)
    plan.add_argument("--json", action="store_true")
    _engine_args(plan)
    serve = sub.add_parser("serve", help="serve the OpenAI Files + Batches API over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", type=Path, default=Path("prefixbatch-data"))
    serve.add_argument(
        "--api-key",
        default=os.environ.get("PREFIXBATCH_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $PREFIXBATCH_API_KEY)",
    )
    serve.add_argument(
        "--max-upload-size", type=parse_memory, default=200 * 2**20, help="e.g. 200MiB"
    )
    _executor_args(serve)
    _engine_args(serve)
    return parser


def _executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="engine actors on a local Ray cluster (pip install 'prefixbatch[ray]')",
    )
    p.add_argument("--ray-address", help="run on an existing Ray cluster: auto or ray://...")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        policy=args.policy,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .io.job import JobError

    try:
        config = engine_config(args)
        if args.command == "plan":
            return _plan(args, config)
        if args.command == "serve":
            return _serve(args, config)
        return _run(args, config)
    except (JobError, ValueError, OSError) as e:
        print(f"prefixbatch: error: {e}", file=sys.stderr)
        return EXIT_JOB_ERROR


def _run(args: argparse.Namespace, config: EngineConfig) -> int:
    from .io.job import JobOptions, run_job

    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
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
        ),
    )
    if not args.quiet:
        for line in summary.lines():
            print(f"[prefixbatch] {line}", file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace, config: EngineConfig) -> int:
    from .io.planning_job import plan_job

    report, text = plan_job(config, args.input, args.default_max_tokens)
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
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
