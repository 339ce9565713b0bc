"""The scheduler half's bookkeeping on real vLLM (in-process): which blocks a request still has to
store after a preemption or a host-store reset, host pins of aborted restores on an idle engine,
and what vLLM 0.34's offloading does that the plugin adopts (asynchronous-load hints, no second
look-up after a failed restore, a breaker for repeated failures)."""

from __future__ import annotations

import pytest

from vllm import SamplingParams

from test_restore import (  # noqa: F401  (make_llm: the fixture)
    _connector_cfg, _prompt, _run_until_idle, _scheduler, _scheduler_connector, make_llm,
)


@pytest.fixture(scope="module")
def llm_holder():
    """One engine for the module's engine tests (llama2, ratio 0.5); built by the first test."""
    holder: dict = {}
    yield holder
    holder.clear()


def _engine(llm_holder, make_llm, tiny_model):
    if "llm" not in llm_holder:
        llm_holder["llm"] = make_llm(tiny_model("llama2"), kv_transfer_config=_connector_cfg(0.5))
    llm = llm_holder["llm"]
    llm.reset_prefix_cache(reset_connector=True)
    return llm


def _request(core, prefix: str):
    return next(r for rid, r in core.requests.items() if rid.startswith(prefix))


def _step_until_stored(engine, scheduler, core, prefix: str, blocks: int) -> list[bytes]:
    """Steps until request `prefix` has stored `blocks` blocks; its block hashes."""
    for _ in range(50):
        engine.step()
        req = _request(core, prefix)
        if scheduler.reqs[req.request_id].stored_blocks >= blocks:
            return list(req.block_hashes)
    raise AssertionError(f"{prefix} never stored {blocks} blocks")


@pytest.mark.parametrize("event", ["reset", "preemption"])
def test_blocks_lost_from_the_host_are_stored_again(event, llm_holder, make_llm, tiny_model):
    """After a host-store reset (reset_cache) or a preemption during which its host copies were
    evicted, a running request's early blocks are stored again from the GPU (or once recomputed):
    the count of blocks it stored goes back to 0, as vLLM's own offloading restarts at chunk 0."""
    llm = _engine(llm_holder, make_llm, tiny_model)
    engine, core, scheduler = llm.llm_engine, _scheduler(llm), _scheduler_connector(llm)
    engine.add_request(event, _prompt(31, 6 * 32 + 5), SamplingParams(temperature=0, max_tokens=60))
    hashes = _step_until_stored(engine, scheduler, core, event, 6)[:6]
    assert all(h in scheduler.index for h in hashes)
    if event == "reset":  # while the request runs: vLLM's GPU prefix reset fails, the host store empties
        core.reset_prefix_cache(reset_connector=True)
    else:  # preempted and resumed; meanwhile its host copies are evicted
        core.reset_prefix_cache(reset_running_requests=True)
        scheduler.index.discard(hashes)
    assert not any(h in scheduler.index for h in hashes)
    _run_until_idle(engine, event)
    assert [h in scheduler.index for h in hashes] == [True] * 6
