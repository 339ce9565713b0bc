"""Load and fault tests on vLLM's real OpenAI server (a subprocess, CPU build), with real OpenAI
clients: 64 concurrent multi-turn conversations, half of them streaming, greedy, compared token
for token with the same server without the plugin; clients that disconnect mid-stream and right
after sending (while their restore is in flight); a host store far smaller than the working set;
injected restore failures under both `kv_load_failure_policy` values. The GPU KV cache holds a
few conversations only, so later turns restore their histories from the host store.

Servers run one at a time (2-core machines): the baseline once per module, then each plugin
server for its test.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vllm_partial_kv.faults import ENV as FAIL_EVERY_ENV
from vllm_partial_kv.server import Server, free_port, metric_sum

pytestmark = pytest.mark.spawn

CLIENTS = 64
TURNS = 3
REPLY_TOKENS = 10
SYSTEM_TOKENS = 128  # shared by every conversation: vLLM's prefix cache shares its blocks
FIRST_TURN_TOKENS = 64
LATER_TURN_TOKENS = 24
BLOCK_SIZE = 32
GPU_CACHE_TOKENS = 2048  # a fifth of the working set (~330 blocks of 32 tokens)
MODEL_NAME = "tiny"


@dataclass
class Round:
    """One pass of every conversation: the replies' token ids, per client and turn (None: the
    request failed), and the errors seen."""

    replies: list[list[list[int] | None]]
    errors: list[str] = field(default_factory=list)


def _server(model: Path, tmp: Path, name: str, connector: dict | None = None,
            fail_every: int | None = None) -> Server:
    port = free_port()
    cfg = json.loads((model / "config.json").read_text())
    kv_bytes = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4 * GPU_CACHE_TOKENS
    cmd = [sys.executable, "-m", "vllm_partial_kv.cli", "serve", str(model), "--kv-offload", "none",
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME,
           "--dtype", "float32", "--block-size", str(BLOCK_SIZE), "--max-model-len", "1024",
           "--kv-cache-memory-bytes", str(kv_bytes), "--enforce-eager", "--seed", "0"]
    if connector is not None:
        cmd += ["--kv-transfer-config", json.dumps(connector)]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    if fail_every is not None:
        env[FAIL_EVERY_ENV] = str(fail_every)
    return Server(cmd, port, tmp / f"{name}.log", env=env)


def _plugin(cpu_mib: int, policy: str = "recompute") -> dict:
    return {"kv_connector": "PartialRecomputeConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "vllm_partial_kv.connector",
            "kv_load_failure_policy": policy,
            # A fixed share: "auto" streams everything on a CPU (a host "copy" is a memcpy there).
            "kv_connector_extra_config": {"cpu_bytes": cpu_mib << 20, "recompute_ratio": 0.5}}


def _text(tok, seed: int, tokens: int) -> str:
    from vllm_partial_kv.tiny_models import corpus

    words: list[str] = []
    for line in corpus(seed):
        words += line.split()
        if len(tok.encode(" ".join(words), add_special_tokens=False)) >= tokens:
            break
    return " ".join(words)


def _user_turns(tok) -> list[list[tuple[str, str]]]:
    """Per client and turn: the user's message and the first word of the reply. The tiny peaked
    model's reply is mostly a fixed chain from its first token, so replies that all started at
    "assistant:" would be equal; a different opening word per turn makes them differ."""
    return [[(_text(tok, 1000 + 10 * c + t, FIRST_TURN_TOKENS if t == 0 else LATER_TURN_TOKENS),
              _text(tok, 5000 + 10 * c + t, 1).split()[0]) for t in range(TURNS)]
            for c in range(CLIENTS)]


def _messages(system: str, turns: list[tuple[str, str]], replies: list[str]) -> list[dict]:
    """A conversation up to the turn after `replies`, ending in that turn's opening word, which
    the model continues (vLLM's `continue_final_message`)."""
    out = [{"role": "system", "content": system}]
    for (user, opener), reply in zip(turns, [*replies, None]):
        out += [{"role": "user", "content": user},
                {"role": "assistant", "content": opener + (reply if reply is not None else "")}]
    return out


async def _chat(client, messages: list[dict], stream: bool, max_tokens: int = REPLY_TOKENS):
    """The reply's text and token ids (vLLM's `return_token_ids`); raises if it did not finish."""
    kwargs = dict(model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0.0,
                  extra_body={"return_token_ids": True, "add_generation_prompt": False,
                              "continue_final_message": True})
    if not stream:
        out = await client.chat.completions.create(**kwargs)
        choice = out.choices[0]
        if choice.finish_reason not in ("length", "stop"):
            raise RuntimeError(f"finish_reason {choice.finish_reason}")
        return choice.message.content, list(choice.token_ids)
    text, ids, finish = "", [], None
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            ids += getattr(choice, "token_ids", None) or []
            finish = choice.finish_reason or finish
    if finish not in ("length", "stop"):
        raise RuntimeError(f"finish_reason {finish}")
    return text, ids


def _client(server: Server):
    """An OpenAI client that never reuses a connection idle for more than a second: the server
    closes idle ones after 5 s, and a request sent down one just closed fails to connect."""
    import httpx
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    http = DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=None, keepalive_expiry=1.0))
    return AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=600, max_retries=0,
                       http_client=http)


def _run_round(server: Server, system: str, turns, history: list[list[str]] | None = None,
               disconnects: int = 0) -> tuple[Round, list[list[str]]]:
    """Every client's conversation, all at once (even clients stream). With `history` (the
    baseline's replies) every turn sees the baseline's history, so each turn is compared on its
    own, also after an earlier one failed. `disconnects` clients of each kind hang up early.
    Returns the replies' token ids and texts."""

    async def main():
        client = _client(server)
        replies = [[None] * TURNS for _ in range(CLIENTS)]
        texts = [[""] * TURNS for _ in range(CLIENTS)]
        errors: list[str] = []

        async def conversation(c: int):
            for t in range(TURNS):
                past = history[c][:t] if history else texts[c][:t]
                try:
                    texts[c][t], replies[c][t] = await _chat(
                        client, _messages(system, turns[c][: t + 1], past), stream=c % 2 == 0)
                except Exception as exc:  # noqa: BLE001  (collected; the test decides)
                    errors.append(f"client {c} turn {t}: {type(exc).__name__}: {exc}")

        async def hang_up_mid_stream(c: int):
            stream = await client.chat.completions.create(
                model=MODEL_NAME, messages=_messages(system, turns[c][:1], []), max_tokens=200,
                temperature=0.0, stream=True, extra_body={"add_generation_prompt": False,
                                                          "continue_final_message": True})
            async for _ in stream:
                break
            await stream.close()

        async def hang_up_while_restoring(c: int):
            # A whole conversation's history: evicted from the GPU by the time it comes, so the
            # request waits for its restore; the client is gone before the first token.
            stream = await client.chat.completions.create(
                model=MODEL_NAME, messages=_messages(system, turns[c], history[c][: TURNS - 1]),
                max_tokens=50, temperature=0.0, stream=True,
                extra_body={"add_generation_prompt": False, "continue_final_message": True})
            await stream.close()

        tasks = [conversation(c) for c in range(CLIENTS)]
        tasks += [hang_up_mid_stream(c) for c in range(disconnects)]
        tasks += [hang_up_while_restoring(CLIENTS - 1 - c) for c in range(disconnects)]
        await asyncio.gather(*tasks)
        await client.close()
        return Round(replies, errors), texts

    return asyncio.run(main())


def _distinct_blocks(model: Path, system: str, turns, texts: list[list[str]]) -> int:
    """Full KV blocks of all conversations, each shared prefix counted once (as vLLM hashes them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    prefixes = set()
    for c in range(CLIENTS):
        text = tok.apply_chat_template(_messages(system, turns[c], texts[c]), tokenize=False,
                                       continue_final_message=True)
        ids = tok.encode(text, add_special_tokens=False)
        prefixes.update(tuple(ids[: (i + 1) * BLOCK_SIZE]) for i in range(len(ids) // BLOCK_SIZE))
    return len(prefixes)


def _gauges(server: Server) -> dict[str, float]:
    text = server.metrics()
    names = ["tokens_loaded", "tokens_recomputed", "restore_failures", "restores"]
    out = {n: metric_sum(text, f"vllm:partial_kv_{n}_total") for n in names}
    for n in ("capacity", "used", "pinned"):
        out[f"store_{n}"] = metric_sum(text, f"vllm:partial_kv_store_{n}_blocks")
    out["store_activation"] = metric_sum(text, "vllm:partial_kv_store_activation_blocks")
    return out


def _mismatches(got: Round, want: Round) -> list[str]:
    return [f"client {c} turn {t}: {got.replies[c][t]} != {want.replies[c][t]}"
            for c in range(CLIENTS) for t in range(TURNS)
            if got.replies[c][t] is not None and got.replies[c][t] != want.replies[c][t]]


@pytest.fixture(scope="module")
def workload(tiny_model, tmp_path_factory):
    """The model, the conversations and the baseline server's replies (no plugin)."""
    from transformers import AutoTokenizer

    model = tiny_model("llama2")
    tok = AutoTokenizer.from_pretrained(model)
    system = _text(tok, 999, SYSTEM_TOKENS)
    turns = _user_turns(tok)
    tmp = tmp_path_factory.mktemp("serving")
    with _server(model, tmp, "baseline") as server:
        reference, texts = _run_round(server, system, turns)
    assert not reference.errors, reference.errors[:5]
    assert len({tuple(r) for rs in reference.replies for r in rs}) > CLIENTS, "replies too alike"
    return model, tmp, system, turns, reference, texts


def test_many_clients_same_tokens_as_without_the_plugin(workload):
    """64 concurrent conversations, three times over: every turn equals the baseline's, also
    with every 5th restore failing (policy "recompute": vLLM recomputes those blocks); clients
    that hang up cost nothing; nothing stays pinned; the server's memory does not grow."""
    model, tmp, system, turns, reference, texts = workload
    with _server(model, tmp, "plugin", _plugin(cpu_mib=256), fail_every=5) as server:
        rss = []
        for r in range(3):
            got, _ = _run_round(server, system, turns, texts, disconnects=4 if r else 0)
            assert not got.errors, got.errors[:5]
            assert not _mismatches(got, reference), _mismatches(got, reference)[:5]
            rss.append(server.rss_bytes())
        gauges = _gauges(server)
        assert server.healthy()
    assert gauges["tokens_loaded"] > 0 and gauges["tokens_recomputed"] > 0, gauges
    assert gauges["restore_failures"] > 0, gauges
    assert gauges["store_pinned"] == 0, gauges
    assert gauges["store_capacity"] >= gauges["store_used"] >= gauges["store_activation"] > 0, gauges
    assert rss[2] - rss[1] < 64 << 20, f"server memory grew by {(rss[2] - rss[1]) >> 20} MiB in a round"


def test_fail_policy_with_a_small_store(workload):
    """Every restore fails, under vLLM's "fail" policy, with a host store well under half the
    working set (so restores are few): the requests that restore fail, every other turn equals
    the baseline's, the engine keeps serving, failures are counted and nothing stays pinned."""
    model, tmp, system, turns, reference, texts = workload
    working_set = _distinct_blocks(model, system, turns, texts)
    with _server(model, tmp, "fail-policy", _plugin(cpu_mib=48, policy="fail"), fail_every=1) as server:
        got, _ = _run_round(server, system, turns, texts, disconnects=4)
        gauges = _gauges(server)
        assert server.healthy()
        assert asyncio.run(_chat(_client(server), [{"role": "assistant", "content": "So"}], stream=False))
    assert not _mismatches(got, reference), _mismatches(got, reference)[:5]
    assert gauges["restore_failures"] > 0 and gauges["store_used"] > 0, gauges
    assert gauges["store_pinned"] == 0, gauges
    assert gauges["store_capacity"] * 2 < working_set, (gauges, working_set)
    assert got.errors, "no request failed under the fail policy"
    assert len(got.errors) < CLIENTS * TURNS // 2, got.errors[:5]
