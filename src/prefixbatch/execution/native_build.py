"""Builds the project's C++ CPU kernels (``csrc/*.cpp`` files) on first use, once per machine.

``torch.utils.cpp_extension`` compiles a source into ``$PREFIXBATCH_CACHE/torch_extensions``
under a name keyed by the source, the flags, this CPU's feature flags and the torch version, so a
later start loads the cached library (milliseconds) and a change to any of them rebuilds. Without
a C++ compiler the build fails with a warning and callers keep their plain PyTorch path.
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


def build_name(source: Path) -> str:
    """The extension's module name: the source's stem and a hash of what the build depends on."""
    key = source.read_bytes() + " ".join(CFLAGS).encode() + _cpu_flags().encode()
    key += torch.__version__.encode()
    return f"prefixbatch_{source.stem}_{hashlib.sha256(key).hexdigest()[:12]}"


@functools.cache
def build_extension(source: Path, what: str) -> ModuleType | None:
    """The compiled module of ``source``, or None when it cannot be built (a warning names
    ``what`` and the error). The first build of a source takes 10-30 s and is logged."""
    try:
        import ninja  # the pip package ships the binary torch's builder calls

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from torch.utils.cpp_extension import load

    name = build_name(source)
    build_dir = cache_root() / "torch_extensions" / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob(f"{name}*.so")):
            log.info("compiling %s (once, about 20 s) into %s", what, build_dir)
        return load(
            name,
            [str(source)],
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
