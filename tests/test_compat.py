"""compat: the supported vLLM range at start-up, and vLLM's torch.compile cache key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from packaging.version import Version

TOO_NEW = (
    "error: vllm-partial-kv is checked against vllm>=0.26,<0.35, found vLLM 0.35.0; install a supported "
    "vLLM, or set VLLM_PARTIAL_KV_ALLOW_UNTESTED_VLLM=1 to start at your own risk"
)


@pytest.fixture
def fake_version(monkeypatch):
    """Make the plugin see `version` as the installed vLLM (and forget an earlier check)."""
    from vllm_partial_kv import compat

    def fake(version: str) -> None:
        monkeypatch.setattr(compat, "vllm_version", lambda: Version(version))
        compat.check_version.cache_clear()

    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)
    yield fake
    compat.check_version.cache_clear()


def test_a_vllm_newer_than_the_supported_range_stops_start_up_with_one_line(fake_version):
    from vllm_partial_kv import compat, plugin

    fake_version("0.35.0")
    with pytest.raises(compat.UnsupportedVllm) as refused:
        plugin.register()
    assert str(refused.value) == TOO_NEW
    for newer in ("0.35.0rc1", "0.35.0.dev12+g0123abc", "1.0.0"):  # pre-releases of 0.35 too
        fake_version(newer)
        with pytest.raises(compat.UnsupportedVllm, match=re.escape(f"found vLLM {newer}")):
            compat.check_version()
    fake_version("0.25.2")
    with pytest.raises(compat.UnsupportedVllm, match=r"^error: vllm-partial-kv needs vllm>=0.26,<0.35, found"):
        compat.check_version()
    for supported in ("0.26.0", "0.32.0", "0.34.0", "0.34.3.dev4"):
        fake_version(supported)
        compat.check_version()


def test_a_vllm_without_what_compat_imports_stops_start_up_with_one_line(monkeypatch):
    """A release that moved a module compat imports fails before the version check can run."""
    import vllm_partial_kv
    from vllm_partial_kv import plugin

    monkeypatch.delattr(vllm_partial_kv, "compat")
    monkeypatch.setitem(sys.modules, "vllm_partial_kv.compat", None)  # importing it raises ImportError
    with pytest.raises(SystemExit) as refused:
        plugin.register()
    assert str(refused.value).startswith("error: vllm-partial-kv cannot load beside this vLLM: ")
    assert "\n" not in str(refused.value) and refused.value.__cause__ is None


REFUSED = textwrap.dedent(
    """
    import sys
    from packaging.version import Version
    from vllm_partial_kv import compat

    compat.vllm_version = lambda: Version("0.35.0")
    from vllm.engine.arg_utils import EngineArgs

    EngineArgs(model=sys.argv[1])  # loads the general plugins, as `vllm serve` and LLM() do
    print("STARTED")
    """
)


def test_refused_start_through_vllms_plugin_loader_is_one_line(tiny_model, monkeypatch):
    """vLLM calls plugins bare: the refusal ends the process with its one line, no traceback."""
    monkeypatch.delenv("VLLM_PARTIAL_KV_ALLOW_UNTESTED_VLLM", raising=False)
    proc = subprocess.run([sys.executable, "-c", REFUSED, str(tiny_model("llama2"))],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "STARTED" not in out, out[-3000:]
    assert "Traceback" not in out and out.count(TOO_NEW) == 1, out[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == TOO_NEW


def test_override_starts_an_engine_on_an_unchecked_vllm_with_one_warning(fake_version, monkeypatch, tiny_model):
    """With the override set, vLLM's own plugin loading passes the check (one warning) and an
    in-process engine with the connector serves."""
    import vllm.plugins
    from conftest import drop_parallel_groups, make_llm
    from vllm import SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    from vllm_partial_kv import compat

    fake_version("0.35.0")
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)  # let vLLM load them again
    warnings: list[str] = []
    monkeypatch.setattr(compat.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    ensure_kv_transfer_shutdown()
    drop_parallel_groups()
    llm = make_llm(tiny_model("llama2"), kv_transfer_config=KVTransferConfig(
        kv_connector="PartialRecomputeConnector", kv_role="kv_both",
        kv_connector_extra_config={"cpu_bytes": 64 << 20, "recompute_ratio": 0.5}))
    try:
        out = llm.generate([{"prompt_token_ids": list(range(10, 80))}],
                           SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        del llm
        ensure_kv_transfer_shutdown()
    assert vllm.plugins.plugins_loaded
    assert warnings == [
        "partial_kv: vLLM 0.35.0 is newer than the newest release this plugin is checked against "
        "(vllm>=0.26,<0.35); starting anyway because VLLM_PARTIAL_KV_ALLOW_UNTESTED_VLLM=1: K/V "
        "restores may be wrong or fail"
    ]


def test_compile_key_covers_what_the_plugin_adds():
    """The key vLLM names its torch.compile caches by changes with `add_to_compile_key`, on this
    vLLM (compute_hash up to 0.33) and on 0.34's shape (hash of compile_factors, which includes a
    dict additional_config)."""
    from vllm.config import VllmConfig

    from vllm_partial_kv import compat

    config = VllmConfig()
    before = compat.compile_key(config)
    compat.add_to_compile_key(config, "partial_kv_capture", 1)
    assert compat.compile_key(config) != before

    class Like034:  # vllm/config/vllm.py, VllmConfig.compile_factors, 0.34.0
        def __init__(self) -> None:
            self.additional_config: dict = {}

        def compile_factors(self) -> dict:
            return {"model": {}, **({"additional": self.additional_config} if self.additional_config else {})}

    config = Like034()
    before = compat.compile_key(config)
    compat.add_to_compile_key(config, "partial_kv_capture", 1)
    assert compat.compile_key(config) != before
