"""Builds the project's C++ CPU kernels (``csrc/*.cpp`` files) on first use, once per machine.

``torch.utils.cpp_extension`` compiles an extension's sources into
``$PREFIXBATCH_CACHE/torch_extensions`` under a name keyed by the sources, the flags, this CPU's
feature flags, the torch version and the Python ABI, so a later start loads the cached library
(milliseconds) and a change to any of them rebuilds. A built library is imported directly, not
through ``cpp_extension.load``: its ninja file names the source and header paths of the checkout
that built it, so two checkouts or environments sharing the cache would otherwise rebuild (15-30
s, silently) each time the other one had loaded. Processes starting at once (Ray workers, a job
beside a server) take a file lock per module, so one of them builds it and the others wait,
then import it. Without a C++ compiler the build fails with a warning and callers keep their
plain PyTorch path.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from ..paths import cache_root

# -ffast-math lets the compiler vectorise exp and the reductions; the kernels keep every value
# finite for it. -march=native: the build is keyed by this machine's CPU flags below.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
PROGRESS_EVERY_S = 15.0  # a build logs that it is still running this often

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
    key += sys.implementation.cache_tag.encode()  # the Python ABI the library is built for
    return f"prefixbatch_{sources[0].stem}_{hashlib.sha256(key).hexdigest()[:12]}"


@functools.cache
def build_extension(sources: tuple[Path, ...], what: str) -> ModuleType | None:
    """The module compiled from ``sources`` (the first one holds its Python bindings), or None
    when it cannot be built (a warning names ``what`` and the error). The first build takes
    15-30 s on 2 idle cores and is logged, with a line every ``PROGRESS_EVERY_S`` while it
    runs. Processes sharing the cache build a module once: the others wait on a file lock,
    then import it."""
    name = build_name(sources)
    build_dir = cache_root() / "torch_extensions" / name
    built = build_dir / f"{name}.so"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir.with_suffix(".lock"), what):
            if built.is_file():
                try:
                    return _import_library(name, built)
                except ImportError as err:  # a damaged library: build it again
                    log.info("rebuilding %s (%s)", what, err)
            return _compile(name, sources, build_dir, what)
    except Exception as err:  # no compiler, headers or cache dir: the PyTorch path still works
        warnings.warn(
            f"prefixbatch: {what} could not be built ({err}); using the slower PyTorch path",
            stacklevel=2,
        )
        return None


@contextlib.contextmanager
def _build_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (released by the kernel if the process dies)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish building %s", what)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(name: str, sources: tuple[Path, ...], build_dir: Path, what: str) -> ModuleType:
    """Compile and import (under the build lock). torch's builder guards the folder with a
    ``lock`` file it never removes when a build is killed, after which every later build waits
    on it forever; under our lock no other build is running, so such a file is stale."""
    try:
        import ninja  # the pip package ships the binary torch's builder calls

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from torch.utils.cpp_extension import load

    (build_dir / "lock").unlink(missing_ok=True)
    log.info("compiling %s (once, 15-30 s on 2 idle cores) into %s", what, build_dir)
    start = time.monotonic()
    done = threading.Event()

    def progress() -> None:
        while not done.wait(PROGRESS_EVERY_S):
            log.info("still compiling %s: %.0f s", what, time.monotonic() - start)

    ticker = threading.Thread(target=progress, name="kernel-build-progress", daemon=True)
    ticker.start()
    try:
        module = load(
            name,
            [str(s) for s in sources],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
    finally:
        done.set()
    log.info("compiled %s in %.0f s", what, time.monotonic() - start)
    return module


def _import_library(name: str, path: Path) -> ModuleType:
    """The extension module ``name`` from its built library at ``path`` (ImportError if it
    does not load)."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
