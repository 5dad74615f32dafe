"""Shared helpers for the benchmarks: machine description, timing, table printing."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    width = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = [
        "| " + " | ".join(k.ljust(width[k]) for k in keys) + " |",
        "|" + "|".join("-" * (width[k] + 2) for k in keys) + "|",
    ]
    lines += ["| " + " | ".join(str(r[k]).ljust(width[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
