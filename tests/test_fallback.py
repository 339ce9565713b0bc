"""Models the plugin cannot recompute for, found by configuration (a family vLLM serves through its
Transformers backend) or only by the worker's structural match: start-up goes on, one warning says
why, restores stream plain K/V, and the tokens under eviction are vLLM's without the plugin."""

from __future__ import annotations

import pytest

from vllm import SamplingParams

from test_restore import (  # noqa: F401  (make_llm: the fixture)
    _baseline, _connector_cfg, _conversations, _kv_bytes, _worker, make_llm,
)


def _served_by_transformers_backend(hf_name: str) -> bool:
    from vllm.model_executor.models.registry import ModelRegistry

    registered = ModelRegistry.models.get(hf_name)
    return registered is not None and registered.module_name.endswith(".transformers")


def _on_backend(arch: str, hf_name: str):
    """`arch` as a test parameter, skipped where this vLLM has a class of its own for `hf_name` (0.26
    has them for GPT-NeoX and Phi-2; 0.32 serves both by its Transformers backend)."""
    return pytest.param(arch, {}, marks=pytest.mark.skipif(
        not _served_by_transformers_backend(hf_name), reason=f"this vLLM serves {hf_name} by its own class"))


def _count_warnings(monkeypatch, *modules) -> list[str]:
    """The warnings the loggers of `modules` give from now on (vLLM reconfigures its loggers at
    start-up: caplog misses them)."""
    warnings: list[str] = []
    for module in modules:
        warn = module.logger.warning
        monkeypatch.setattr(module.logger, "warning",
                            lambda msg, *a, warn=warn, **k: (warnings.append(msg % a), warn(msg, *a, **k)))
    return warnings


def _serve_under_eviction(make_llm, model, connector, **engine) -> dict:
    """Two turns of four conversations on a GPU cache of about two: the plugin's tokens equal those
    of vLLM without it; its worker's totals."""
    sp = SamplingParams(temperature=0, max_tokens=24)
    small = dict(kv_cache_memory_bytes=_kv_bytes(model, 2048), max_model_len=1024, **engine)
    baseline = _baseline(make_llm, model, _conversations, 4, 2, sp, **small)
    llm = make_llm(model, **small, kv_transfer_config=connector)
    assert _conversations(llm, 4, 2, sp) == baseline
    worker = _worker()
    totals = dict(worker.totals.data, with_act=worker.with_act, recomputes=worker.recomputes)
    del llm
    return totals


@pytest.mark.parametrize("arch,engine", [
    _on_backend("gpt_neox", "GPTNeoXForCausalLM"),
    _on_backend("phi", "PhiForCausalLM"),
    pytest.param("llama2", {"model_impl": "transformers"}, id="llama2-forced-onto-transformers"),
])
def test_model_outside_vllms_own_code_serves_plain_kv_with_one_warning(arch, engine, tiny_model, make_llm,
                                                                        monkeypatch, hf_classes_restored):
    """vLLM's Transformers backend runs Hugging Face's attention code, which rotates K in a function the
    structural match cannot see, whatever the architecture's name: both halves decide from the class vLLM
    really instantiates, keep no activations, and say so once."""
    from vllm_partial_kv import capture, deployment

    monkeypatch.setattr(deployment, "_warned_no_capture", set())
    warnings = _count_warnings(monkeypatch, deployment, capture)
    totals = _serve_under_eviction(make_llm, tiny_model(arch), _connector_cfg(0.5), **engine)
    assert not totals["with_act"] and totals["tokens_loaded"] > 0 and totals["tokens_recomputed"] == 0, totals
    warnings = [w for w in warnings if "cannot recompute" in w]
    assert len(warnings) == 1 and "TransformersForCausalLM" in warnings[0], warnings


@pytest.mark.parametrize("layout", ["kv+act", "act"])
def test_structure_refusing_an_admitted_model_never_stops_startup(layout, tiny_model, make_llm, monkeypatch):
    """Had the configuration check admitted a model whose layers the worker's structural match
    refuses, the scheduler plans with activations the worker never captures: the worker starts, warns
    once, never recomputes (every restore streams K/V), and refuses blocks kept without K/V (host
    layout "act") as load errors, which vLLM computes again: the same tokens."""
    from vllm_partial_kv import capture, matcher

    def refuse(model):
        raise matcher.Mismatch("model.layers.0.self_attn: injected mismatch")

    monkeypatch.setattr(matcher, "match_layers", refuse)
    warnings = _count_warnings(monkeypatch, capture)
    connector = _connector_cfg(1.0, host_layout=layout)
    connector.kv_load_failure_policy = "recompute"
    totals = _serve_under_eviction(make_llm, tiny_model("llama2"), connector)
    assert totals["with_act"] and not totals["recomputes"], totals
    assert totals["tokens_recomputed"] == 0, totals
    if layout == "kv+act":  # ratio 1 would recompute every block: all stream instead
        assert totals["tokens_loaded"] > 0 and totals["restore_failures"] == 0, totals
    else:
        assert totals["restore_failures"] > 0, totals
    assert [w for w in warnings if "cannot recompute" in w] == [
        "partial_kv: cannot recompute from activations: model.layers.0.self_attn: injected mismatch, although "
        "this model's configuration passes the check the scheduler makes; this worker offloads plain K/V "
        "(please report it)"]
