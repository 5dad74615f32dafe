"""A regular install can build the CPU kernels: the wheel is built, must hold every file of the
kernels' source folders (the ``.cpp`` files and the headers they include), is installed into a
fresh virtual environment (which reuses this environment's installed dependencies, so nothing is
downloaded), and a short job runs there with both kernel modules compiled from the wheel's own
files into an empty ``PREFIXBATCH_CACHE``: not the PyTorch fallback. It costs the two kernel
builds, run at once: about 30 s on 2 idle cores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from test_job import completion_line, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str | Path], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_a_wheel_install_compiles_its_own_kernels(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    project = tmp_path / "project"  # a copy: setuptools writes build/ and egg-info beside it
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    wheels = tmp_path / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    run([*pip_wheel, "--no-index", "-w", wheels, project])
    (wheel,) = wheels.glob("prefixbatch-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    kernel_files = [f for f in (REPO / "src").rglob("csrc/*") if f.is_file()]
    assert any(f.suffix == ".h" for f in kernel_files)
    missing = [str(f) for f in kernel_files if str(f.relative_to(REPO / "src")) not in packed]
    assert not missing, f"the wheel lacks {missing}"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(
        run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    )
    # This environment's packages as plain path entries: their own .pth files (an editable
    # install of prefixbatch among them) are not run, so prefixbatch comes from the wheel only.
    (site.resolve() / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip_install = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
    run([*pip_install, wheel], env)
    where = run([python, "-c", "import prefixbatch; print(prefixbatch.__file__)"], env)
    assert Path(where.strip()).resolve().is_relative_to(site.resolve())

    cache = tmp_path / "cache"
    inp = write_jsonl(tmp_path / "in.jsonl", [completion_line(i) for i in range(3)])
    out = tmp_path / "out.jsonl"
    job = [venv / "bin" / "prefixbatch", "run", inp, "-o", out, "--model", tiny_models["llama"]]
    log = run(
        [*job, "--device", "cpu", "--kv-cache-memory", "16MiB"],
        env | {"PREFIXBATCH_CACHE": str(cache)},
    )
    assert "could not be built" not in log, log
    assert "compiling the CPU attention kernels" in log and "compiled the CPU attention" in log
    built = sorted(p.name.split("_")[1] for p in cache.glob("torch_extensions/*/*.so"))
    assert built == ["elementwise", "paged"], log  # both modules, from the wheel's sources
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 3 and all(r["error"] is None for r in records)
