"""The `vllm-partial-kv` command line: commands it builds and how it refuses bad input."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from vllm_partial_kv import CONNECTOR_NAME
from vllm_partial_kv.cli import SERVER_MODULE, main


def _dry_run(capsys, *args: str) -> list[str]:
    assert main(["serve", *args, "--dry-run"]) == 0
    return shlex.split(capsys.readouterr().out)


def _transfer_config(cmd: list[str]) -> dict:
    return json.loads(cmd[cmd.index("--kv-transfer-config") + 1])


def test_make_tiny_model(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--arch", "qwen2", "--seed", "1",
                 "--layers", "2", "--hidden", "128"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["architectures"], cfg["num_hidden_layers"], cfg["hidden_size"]) == (
        ["Qwen2ForCausalLM"], 2, 128)


def test_serve_builds_vllm_command_with_connector_config(tmp_path, capsys):
    cmd = _dry_run(capsys, str(tmp_path), "--kv-offload", "partial-recompute",
                   "--block-size", "32", "--kv-offload-size", "0.5", "--max-model-len=4096",
                   "--recompute-ratio", "0.25", "--enforce-eager")
    assert cmd[:5] == [sys.executable, "-m", SERVER_MODULE, "--model", str(tmp_path)]
    assert cmd[7:] == ["--block-size", "32", "--max-model-len=4096", "--enforce-eager"]
    assert _transfer_config(cmd) == {
        "kv_connector": CONNECTOR_NAME,
        "kv_role": "kv_both",
        "kv_connector_module_path": "vllm_partial_kv.connector",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"cpu_bytes": 1 << 29, "recompute_ratio": 0.25},
    }


def test_serve_defaults_and_hub_ids(capsys):
    cmd = _dry_run(capsys, "org/model", "--kv-offload", "partial-recompute")
    assert _transfer_config(cmd)["kv_connector_extra_config"] == {
        "cpu_bytes": 4 << 30, "recompute_ratio": "auto"}


def test_serve_host_format(capsys):
    cmd = _dry_run(capsys, "org/model", "--kv-offload", "partial-recompute", "--host-format", "fp8")
    assert _transfer_config(cmd)["kv_connector_extra_config"]["host_format"] == "fp8"


def test_serve_without_offload_passes_user_connector_through(tmp_path, capsys):
    own = '{"kv_connector":"OffloadingConnector","kv_role":"kv_both"}'
    cmd = _dry_run(capsys, str(tmp_path), "--kv-offload", "none", "--kv-transfer-config", own)
    assert cmd[3:] == ["--model", str(tmp_path), "--kv-transfer-config", own]


@pytest.mark.parametrize("args", [
    ["serve", "{model}", "--kv-offload", "partial-recompute", "--recompute-ratio", "1.5"],
    ["serve", "{model}", "--kv-offload", "partial-recompute", "--recompute-ratio", "most"],
    ["serve", "{model}", "--kv-offload", "bogus"],
    ["serve", "{model}"],
    ["serve", "--kv-offload", "partial-recompute"],
    ["serve", "{model}/missing", "--kv-offload", "none"],
    ["serve", "--max-model-len", "4096", "{model}", "--kv-offload", "none"],
    ["serve", "{model}", "--kv-offload", "partial-recompute", "--kv-offload-size", "0"],
    ["serve", "{model}", "--kv-offload", "partial-recompute", "--kv-offload-size", "nan"],
    ["serve", "{model}", "--kv-offload", "partial-recompute", "--kv-offload-size", "1e-12"],
    ["profile", "{model}", "--tensor-parallel-size", "0"],
    ["serve", "{model}", "--kv-offload", "none", "--recompute-ratio", "0.5"],
    ["serve", "{model}", "--kv-offload", "none", "--host-format", "fp8"],
    ["serve", "{model}", "--kv-offload", "partial-recompute", "--host-format", "fp4"],
    ["serve", "{model}", "--kv-offload", "partial-recompute", "--kv-transfer-config", "{}"],
    ["serve", "{model}", "--kv-offload", "partial-recompute", "--kv-transfer-config={}"],
    ["serve", "{model}", "--kv-offload", "none", "--model", "other"],
    ["make-tiny-model", "{model}", "--arch", "falcon"],
    ["make-tiny-model", "{model}", "--arch", "llama", "--hidden", "100"],
    ["make-tiny-model", "{model}", "--arch", "llama", "--layers", "0"],
    ["make-tiny-model", "{model}", "--arch", "llama", "--block-size", "32"],
    ["profile", "{model}/missing"],
    ["bogus"],
    [],
], ids=lambda a: " ".join(a).replace("{model}", "M") or "nothing")
def test_bad_input_is_one_error_line_and_status_2(tmp_path, capsys, args):
    assert main([a.replace("{model}", str(tmp_path)) for a in args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err


def test_conflicting_transfer_config_message(tmp_path, capsys):
    main(["serve", str(tmp_path), "--kv-offload", "partial-recompute",
          "--kv-transfer-config", "{}"])
    assert "--kv-offload none" in capsys.readouterr().err


def test_console_entry_point_reports_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vllm_partial_kv.cli", "serve", str(tmp_path),
                           "--kv-offload", "partial-recompute", "--recompute-ratio", "1.5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: argument --recompute-ratio: '1.5' is outside 0..1"


def test_profile_prints_a_summary(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_PARTIAL_KV_CACHE_DIR", str(tmp_path))
    assert main(["profile", str(tiny_model("llama")), "--device", "cpu", "--block-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "partial-KV profile" in out and "4 layers" in out
    assert list(tmp_path.glob("profile-*.json"))


@pytest.mark.spawn
@pytest.mark.once  # the demo runs the main CPU build, which `make demo` installs
def test_demo_end_to_end():
    """`vllm-partial-kv demo`: a real server restores an evicted conversation (1-2 minutes)."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.run([sys.executable, "-m", "vllm_partial_kv.cli", "demo"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the restored turn matches the reference answer" in proc.stdout
    assert proc.stdout.rstrip().endswith("[demo] ok")
