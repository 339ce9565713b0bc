"""Two OpenAI servers (subprocesses, CPU build) sharing one storage directory: conversations'
first turns on server A, their next turn on server B, whose host store holds a few blocks only:
B restores the prefixes A wrote, and every reply equals a server's without the plugin."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from test_serving import BLOCK_SIZE, _chat, _client, _messages, _plugin, _server, _text
from vllm_partial_kv.server import metric_sum

# Once per CI run: the in-process engine tests (tests/test_storage_engine.py) cover each vLLM version.
pytestmark = [pytest.mark.spawn, pytest.mark.once]

CONVERSATIONS = 6
TURNS = 3


def _turns(tok) -> list[list[tuple[str, str]]]:
    return [[(_text(tok, 1000 + 10 * c + t, 64 if t == 0 else 24), _text(tok, 5000 + 10 * c + t, 1).split()[0])
             for t in range(TURNS)] for c in range(CONVERSATIONS)]


def _replies(server, system, turns, history, only: list[int]) -> dict[tuple[int, int], list[int]]:
    """Turns `only` of every conversation, each with `history`'s earlier replies (None: its own)."""

    async def main():
        client = _client(server)
        out, texts = {}, [[""] * TURNS for _ in range(CONVERSATIONS)]

        async def conversation(c: int):
            for t in only:
                past = (history or texts)[c][:t]
                texts[c][t], out[c, t] = await _chat(client, _messages(system, turns[c][: t + 1], past), c % 2 == 0)

        await asyncio.gather(*(conversation(c) for c in range(CONVERSATIONS)))
        await client.close()
        return out, texts

    return asyncio.run(main())


def _storage_plugin(cpu_bytes: int, directory) -> dict:
    cfg = _plugin(cpu_mib=1)
    cfg["kv_connector_extra_config"].update(cpu_bytes=cpu_bytes, storage_dir=str(directory), storage_rescan_s=0.5)
    return cfg


def _counter(server, name: str) -> float:
    return metric_sum(server.metrics(), f"vllm:partial_kv_{name}_total")


def test_server_b_restores_what_server_a_wrote(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from vllm_partial_kv import compat

    if not compat.block_hashes_reproducible("sha256"):  # vLLM 0.26 seeds block hashes per process
        monkeypatch.setenv("PYTHONHASHSEED", "0")

    model = tiny_model("llama2")
    tok = AutoTokenizer.from_pretrained(model)
    system = _text(tok, 999, 128)
    turns = _turns(tok)
    cfg = json.loads((model / "config.json").read_text())
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    block_bytes = BLOCK_SIZE * layers * 4 * (2 * cfg["num_key_value_heads"] * cfg["head_dim"] + hidden)
    directory = tmp_path / "kv"
    with _server(model, tmp_path, "baseline") as server:
        want, texts = _replies(server, system, turns, None, list(range(TURNS)))
    with _server(model, tmp_path, "a", _storage_plugin(256 << 20, directory)) as server:
        got, _ = _replies(server, system, turns, texts, [0, 1])
        assert got == {k: v for k, v in want.items() if k[1] < 2}
        deadline = time.time() + 60  # the writes run on I/O threads after the replies
        while _counter(server, "storage_blocks_written") < CONVERSATIONS * 6 and time.time() < deadline:
            time.sleep(0.5)
        written = _counter(server, "storage_blocks_written")
    # B: a host store of 8 blocks, far below the conversations' ~80 blocks; the directory holds them all.
    with _server(model, tmp_path, "b", _storage_plugin(8 * block_bytes, directory)) as server:
        time.sleep(2)  # a rescan has found A's files
        got, _ = _replies(server, system, turns, texts, [2])
        text = server.metrics()
    assert got == {k: v for k, v in want.items() if k[1] == 2}
    read = metric_sum(text, "vllm:partial_kv_storage_blocks_read_total")
    hits = metric_sum(text, "vllm:partial_kv_storage_hit_blocks_total")
    prompt_tokens = metric_sum(text, "vllm:prompt_tokens_total")
    assert written > 0 and read > 0 and hits >= read, (written, read, hits)
    assert metric_sum(text, "vllm:partial_kv_storage_rejected_files_total") == 0
    assert metric_sum(text, "vllm:partial_kv_storage_used_bytes") > 0
    print(f"server B: {hits:.0f} blocks hit in storage, {read:.0f} read; "
          f"storage hit rate {hits * BLOCK_SIZE / prompt_tokens:.0%} of prompt tokens")
