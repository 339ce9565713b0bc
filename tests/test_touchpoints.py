"""The touch-point check (`python -m vllm_partial_kv.touchpoints`) against the newest supported vLLM
release, pinned (a later release on PyPI never changes this test), read from its wheel."""

from __future__ import annotations

import shutil

import pytest

from vllm_partial_kv import touchpoints

# Reads wheels' source, never the installed vLLM: the same on every vLLM, so run once per CI run.
pytestmark = pytest.mark.once

PINNED = "0.34.0"


@pytest.fixture(scope="module")
def pinned():
    """The pinned release's wheel (downloaded once into the wheel cache) and the files the check
    reads from it."""
    wheel = touchpoints.fetch_wheel(PINNED)
    report, source = touchpoints.check(wheel)
    return wheel, report, source.touched


def test_pinned_release_passes(pinned):
    _, report, _ = pinned
    assert report.differences == []
    ok = {line for _, lines, _ in report.sections for line in lines}
    assert "StableLmForCausalLM: the Transformers backend (plugin: plain K/V)" in ok
    assert "LlamaForCausalLM: vLLM's own llama.LlamaForCausalLM" in ok
    assert "vllm-0.34.patch applies without fuzz or offset" in ok
    assert any(line.startswith("PartialRecomputeConnector(KVConnectorBase_V1): ") and "start_load_kv" in line
               for line in ok)
    assert "vllm.forward_context.is_forward_context_available" in ok


BASE = "vllm/distributed/kv_transfer/kv_connector/v1/base.py"

# One touch point changed in a copy of the release's source -> what the report must name.
CHANGES = {
    "connector parameter renamed": (
        BASE, "        request: \"Request\",\n        num_computed_tokens: int,\n    ) -> tuple[int | None, bool]:",
        "        request: \"Request\",\n        num_tokens: int,\n    ) -> tuple[int | None, bool]:",
        "KVConnectorBase_V1.get_num_new_matched_tokens: parameter 2 is 'num_tokens' in vLLM, "
        "'num_computed_tokens' in the plugin"),
    "imported name removed": (
        "vllm/forward_context.py", "def is_forward_context_available()", "def forward_context_is_available()",
        "vllm.forward_context has no is_forward_context_available"),
    "architecture moved to the Transformers backend": (
        "vllm/model_executor/models/registry.py", '    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),',
        '    "LlamaForCausalLM": ("transformers", "TransformersForCausalLM"),',
        "LlamaForCausalLM: the Transformers backend (plugin: plain K/V); the plugin expects own on 0.34"),
    "config field renamed": (
        "vllm/config/scheduler.py", "    max_num_seqs: int = Field(", "    max_seqs: int = Field(",
        "SchedulerConfig.max_num_seqs: not in vLLM's SchedulerConfig"),
    "patch context changed": (
        "vllm/config/cache.py", 'KVOffloadingBackend = Literal["native", "lmcache"]',
        'KVOffloadingBackend = Literal["native", "lmcache", "other"]',
        "no patch in patches/ applies to vLLM 0.34 without fuzz"),
}


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the patch tool")
def test_a_changed_touch_point_fails_naming_it(pinned, tmp_path, capsys):
    """A copy of the release's source (the files the check reads) passes as the wheel does; with one
    touch point changed, the check exits 1 and its report names that touch point."""
    wheel, _, touched = pinned
    source = touchpoints.Source(wheel)
    for path in touched:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(source.text(path))
    assert touchpoints.main([str(tmp_path)]) == 0, capsys.readouterr().out
    capsys.readouterr()
    for change, (path, old, new, named) in CHANGES.items():
        text = (tmp_path / path).read_text()
        assert text.count(old) == 1, change
        (tmp_path / path).write_text(text.replace(old, new))
        assert touchpoints.main([str(tmp_path)]) == 1, change
        out = capsys.readouterr().out
        diffs = [line for line in out.splitlines() if line.startswith("  DIFF  ")]
        assert len(diffs) == 1 and named in diffs[0], (change, diffs)
        assert out.rstrip().endswith("1 unexpected difference")
        (tmp_path / path).write_text(text)
