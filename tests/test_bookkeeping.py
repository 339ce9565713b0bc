"""The scheduler half's bookkeeping on real vLLM (in-process): which blocks a request still has to
store after a preemption or a host-store reset, host pins of aborted restores on an idle engine,
and what vLLM 0.34's offloading does that the plugin adopts (asynchronous-load hints, no second
look-up after a failed restore, a breaker for repeated failures)."""

from __future__ import annotations

import gc

import pytest

from vllm import SamplingParams

from test_restore import (
    _connector_cfg, _prompt, _run_until_idle, _scheduler, _scheduler_connector, _slow_restores, _worker,
)


@pytest.fixture(scope="module")
def llm(tiny_model):
    """One engine (llama2, ratio 0.5) for the module's engine tests, each starting on an empty host
    store. Not from test_restore's `make_llm` fixture: its teardown shuts the connector down."""
    from conftest import drop_parallel_groups, make_llm as base

    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    gc.collect()
    ensure_kv_transfer_shutdown()
    drop_parallel_groups()
    connector = _connector_cfg(0.5)
    connector.kv_load_failure_policy = "recompute"
    engine = base(tiny_model("llama2"), kv_transfer_config=connector)
    yield engine
    del engine
    gc.collect()
    ensure_kv_transfer_shutdown()


@pytest.fixture
def fresh(llm):
    """The module's engine on an empty host store, restores working, the breaker closed."""
    from vllm_partial_kv.faults import RestoreFaults
    from vllm_partial_kv.scheduler import RestoreBreaker

    llm.reset_prefix_cache(reset_connector=True)
    yield llm
    _worker()._faults = RestoreFaults()
    _scheduler_connector(llm).breaker = RestoreBreaker()


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
def test_blocks_lost_from_the_host_are_stored_again(event, fresh):
    """After a host-store reset (reset_cache) or a preemption during which its host copies were
    evicted, a running request's early blocks are stored again from the GPU (or once recomputed):
    the count of blocks it stored goes back to 0, as vLLM's own offloading restarts at chunk 0."""
    llm = fresh
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


def test_restore_aborted_in_flight_unpins_on_an_idle_engine(fresh):
    """A request aborted while its asynchronous restore is in flight: vLLM keeps its blocks until the
    worker reports the load done, and keeps stepping (empty steps) while it holds them, so the host
    pins go too, with no other request arriving."""
    from vllm.v1.request import RequestStatus

    llm = fresh
    engine, core, scheduler = llm.llm_engine, _scheduler(llm), _scheduler_connector(llm)
    runtime = _worker().runtime
    sp = SamplingParams(temperature=0, max_tokens=4)
    prompt = _prompt(32, 6 * 32 + 5)
    llm.generate([prompt], sp, use_tqdm=False)
    llm.reset_prefix_cache()

    _slow_restores(runtime)
    try:
        engine.add_request("aborted", prompt, sp)
        engine.step()
        assert _request(core, "aborted").status == RequestStatus.WAITING_FOR_REMOTE_KVS
        pinned = [e for entries in scheduler._in_flight.values() for e in entries]
        engine.abort_request([_request(core, "aborted").request_id])
        assert pinned and all(e.pins > 0 for e in pinned)
        assert core.has_requests()  # vLLM holds the aborted request's blocks until the load is done
        steps = 0
        while engine.has_unfinished_requests() or core.has_requests():
            engine.step()
            steps += 1
            assert steps < 20, "the engine never went idle"
    finally:
        del runtime.load
    assert steps > 0 and not scheduler._in_flight
    assert all(e.pins == 0 for e in scheduler.index._entries.values())


def _failures() -> int:
    return _worker().totals.data["restore_failures"]


def _lookups(scheduler) -> list[tuple[str, int]]:
    """(request id, tokens offered) of every host look-up from now on."""
    seen: list[tuple[str, int]] = []
    lookup = scheduler.get_num_new_matched_tokens
    scheduler.get_num_new_matched_tokens = lambda req, n: (
        lambda got: (seen.append((req.request_id, got[0])), got)[1])(lookup(req, n))
    return seen


def test_request_whose_restore_failed_never_looks_up_the_host_again(fresh):
    """As vLLM 0.34's offloading does: after a failed restore (the fault hook fails it; policy
    "recompute"), the request is computed by vLLM and, even once preempted and resumed with its blocks
    stored again, never offered host blocks; other requests are."""
    from vllm_partial_kv.faults import RestoreFaults

    llm, worker = fresh, _worker()
    engine, core, scheduler = llm.llm_engine, _scheduler(llm), _scheduler_connector(llm)
    prompt, sp = _prompt(33, 6 * 32 + 5), SamplingParams(temperature=0, max_tokens=60)
    expected = list(llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids)
    llm.reset_prefix_cache()
    worker._faults, failures = RestoreFaults(every=1), _failures()
    seen = _lookups(scheduler)
    engine.add_request("failing", prompt, sp)
    hashes = _step_until_stored(engine, scheduler, core, "failing", 6)[:6]
    assert _failures() == failures + 1 and any(n > 0 for r, n in seen if r.startswith("failing"))
    worker._faults = RestoreFaults()
    core.reset_prefix_cache(reset_running_requests=True)  # preempted; its blocks are on the host again
    assert all(h in scheduler.index for h in hashes)
    seen.clear()
    assert _run_until_idle(engine, "failing") == expected
    assert seen and all(n == 0 for r, n in seen if r.startswith("failing")), seen
    llm.reset_prefix_cache()
    assert list(llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids) == expected
    assert seen[-1][1] == 6 * 32  # another request is offered them


def test_breaker_stops_offering_host_hits_after_failures_in_a_row(fresh, monkeypatch):
    """Three steps in a row whose restores fail open the breaker: for its cooldown no host hit is
    offered (vLLM computes, the same tokens) and vLLM 0.34 is told no load may run asynchronously; then
    a restore probes, and one that succeeds closes it."""
    from types import SimpleNamespace

    from vllm_partial_kv import scheduler as scheduler_module
    from vllm_partial_kv.faults import RestoreFaults

    llm, worker = fresh, _worker()
    connector, scheduler = _scheduler(llm).connector, _scheduler_connector(llm)
    warnings: list[str] = []
    warn = scheduler_module.logger.warning
    monkeypatch.setattr(scheduler_module.logger, "warning", lambda msg, *a: (warnings.append(msg % a), warn(msg, *a)))
    now = [0.0]
    scheduler.breaker.clock = lambda: now[0]
    prompt, sp = _prompt(34, 6 * 32 + 5), SamplingParams(temperature=0, max_tokens=4)
    expected = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    first_block = SimpleNamespace(block_hashes=[h for h in scheduler.index._entries][:1])
    assert connector.may_load_async(first_block)
    worker._faults, before = RestoreFaults(every=1), _failures()
    for attempt in range(1, 5):
        llm.reset_prefix_cache()
        assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == expected
        assert _failures() - before == min(attempt, 3)  # the 4th is not offered
    assert not scheduler.breaker.allows() and not connector.may_load_async(first_block)
    assert [w for w in warnings if "host hits are not offered" in w] == [
        "partial_kv: restores failed in 3 steps in a row; host hits are not offered for 30 s"]
    worker._faults = RestoreFaults()
    now[0] += 31  # cooled down: the next restore probes, succeeds, and closes the breaker
    loaded = worker.totals.data["tokens_loaded"]
    llm.reset_prefix_cache()
    assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == expected
    assert scheduler.breaker.failures == 0 and worker.totals.data["tokens_loaded"] > loaded


def test_may_load_async_is_one_look_up_of_the_first_block():
    """vLLM 0.34 asks it of every request entering its waiting queue: true exactly when the first
    block is on the host and restores run asynchronously."""
    from dataclasses import replace
    from types import SimpleNamespace

    from test_memory import _scheduler_half

    conn = _scheduler_half("kv+act", 64)
    conn.index.allocate(b"first", has_activations=True)
    assert conn.may_load_async(SimpleNamespace(block_hashes=[b"first", b"second"]))
    assert not conn.may_load_async(SimpleNamespace(block_hashes=[b"second", b"first"]))
    assert not conn.may_load_async(SimpleNamespace(block_hashes=[]))
    conn.cfg = replace(conn.cfg, async_load=False)
    assert not conn.may_load_async(SimpleNamespace(block_hashes=[b"first"]))
