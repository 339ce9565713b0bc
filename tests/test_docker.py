"""The Docker image cannot be built here (no daemon): check what it relies on instead, that a wheel
built from exactly the files docker/Dockerfile copies has the command and the plugin entry point."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not importlib.util.find_spec("setuptools"), reason="needs setuptools to build a wheel offline")
def test_dockerfile_context_builds_the_plugin(tmp_path):
    lines = (ROOT / "docker" / "Dockerfile").read_text().splitlines()
    assert any(ln.startswith("FROM vllm/vllm-openai:v0.26.") for ln in lines)  # the version CI tests
    context = tmp_path / "context"
    context.mkdir()
    for line in lines:
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            for src in sources:
                copy = shutil.copytree if (ROOT / src).is_dir() else shutil.copy
                copy(ROOT / src, context / src)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist"), str(context)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("vllm_partial_kv-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        entry_points = next(zf.read(n).decode() for n in zf.namelist() if n.endswith("entry_points.txt"))
        names = zf.namelist()
    assert "vllm-partial-kv = vllm_partial_kv.cli:main" in entry_points
    assert "partial_kv = vllm_partial_kv.plugin:register" in entry_points
    assert "vllm_partial_kv/connector.py" in names and "vllm_partial_kv/kernels/triton_recompute.py" in names
