"""Builds the project's C++ CPU kernels (``csrc/*.cpp`` files) on first use, once per machine.

``torch.utils.cpp_extension`` compiles an extension's sources into
``$PREFIXBATCH_CACHE/torch_extensions`` under a name keyed by the sources, the flags, this CPU's
feature flags and the torch version, so a later start loads the cached library (milliseconds)
and a change to any of them rebuilds. Without a C++ compiler the build fails with a warning and
callers keep their plain PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..loading.model_source import cache_root

# -ffast-math lets the compiler vectorise exp and the reductions; the kernels keep every value
# finite for it. -march=native: the build is keyed by this machine's CPU flags below.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

log = logging.getLogger(__name__)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def build_name(sources: tuple[Path, ...]) -> str:
    """The extension's module name: the first source's stem and a hash of what the build
    depends on (the sources and the headers beside them)."""
    headers = sorted({h for s in sources for h in s.parent.glob("*.h")})
    key = b"".join(f.read_bytes() for f in (*sources, *headers)) + " ".join(CFLAGS).encode()
    key += _cpu_flags().encode() + torch.__version__.encode()
    return f"prefixbatch_{sources[0].stem}_{hashlib.sha256(key).hexdigest()[:12]}"


@functools.cache
def build_extension(sources: tuple[Path, ...], what: str) -> ModuleType | None:
    """The module compiled from ``sources`` (the first one holds its Python bindings), or None
    when it cannot be built (a warning names ``what`` and the error). The first build takes
    20-40 s on 2 cores and is logged."""
    try:
        import ninja  # the pip package ships the binary torch's builder calls

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from torch.utils.cpp_extension import load

    name = build_name(sources)
    build_dir = cache_root() / "torch_extensions" / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob(f"{name}*.so")):
            log.info("compiling %s (once, about 30 s) into %s", what, build_dir)
        return load(
            name,
            [str(s) for s in sources],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
    except Exception as err:  # no compiler, headers or cache dir: the PyTorch path still works
        warnings.warn(
            f"prefixbatch: {what} could not be built ({err}); using the slower PyTorch path",
            stacklevel=2,
        )
        return None
