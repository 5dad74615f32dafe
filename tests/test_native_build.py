"""Building the C++ kernels into a shared cache: two processes starting at once build a module
once (the other waits on the file lock, then imports it), a ``lock`` file left in the build
folder by a killed build does not hang the next one, and a running build logs its progress.
The module built here is a tiny CPython extension, so each build takes seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import prefixbatch

# torch's builder passes -DTORCH_EXTENSION_NAME=<module name>; the module needs no torch header.
SOURCE = r"""
#include <Python.h>
#define INIT_NAME(name) PyInit_##name
#define INIT(name) INIT_NAME(name)
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "tiny", nullptr, -1, nullptr};
PyMODINIT_FUNC INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
"""

SCRIPT = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from prefixbatch.execution import native_build
native_build.PROGRESS_EVERY_S = 0.2
# A tiny module can compile faster than any progress interval: hold each build 1 s so the
# progress line of a running build is always due.
import time, torch.utils.cpp_extension as cpp_extension
load = cpp_extension.load
cpp_extension.load = lambda *args, **kwargs: (time.sleep(1.0), load(*args, **kwargs))[1]
module = native_build.build_extension((Path(sys.argv[1]),), "the tiny module")
print("built" if module is not None else "fallback")
"""


def test_two_processes_build_once_past_a_stale_lock(tmp_path: Path) -> None:
    from prefixbatch.execution.native_build import build_name

    source = tmp_path / "tiny.cpp"
    source.write_text(SOURCE)
    cache = tmp_path / "cache"
    build_dir = cache / "torch_extensions" / build_name((source,))
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")  # left by a build that was killed
    src = str(Path(prefixbatch.__file__).resolve().parents[1])
    env = {**os.environ, "PREFIXBATCH_CACHE": str(cache), "PYTHONPATH": src}
    cmd = [sys.executable, "-c", SCRIPT, str(source)]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert [out.strip() for out, _ in results] == ["built", "built"], results
    logs = "".join(err for _, err in results)
    assert logs.count("compiling the tiny module (once") == 1, logs  # one build for both
    assert "compiled the tiny module in" in logs
    assert "still compiling the tiny module" in logs  # the progress line of a running build
    assert not (build_dir / "lock").exists()
