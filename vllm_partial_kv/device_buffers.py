"""The plugin's device memory, allocated once, right after the model is loaded: the capture space,
its map from KV block to capture block, the restore staging and the tensor-parallel join buffers.

They exist at fixed addresses before vLLM profiles memory, compiles, warms up or records CUDA
graphs, whenever vLLM creates the connector (vLLM 0.34's extensible KV cache creates it only after
graph capture): every recorded graph writes activations, and vLLM's own memory profiling counts
these buffers (on 0.26 as part of the model's memory, on 0.32 and later in what profiling measured
as consumed), so the KV cache vLLM sizes leaves room for them. Everything is sized from the
configuration alone; the worker half takes them over in `register_kv_caches` and never reallocates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vllm_partial_kv import capture
from vllm_partial_kv.config import parse_config
from vllm_partial_kv.deployment import capture_blocks, device_bytes, extra_config, kv_block_bound, model_shape
from vllm_partial_kv.ranks import TensorParallelRanks
from vllm_partial_kv.store import ensure_room

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


@dataclass
class DeviceBuffers:
    capture: dict[str, torch.Tensor]  # per layer [capture_blocks * block_size + 1, width]: + the spare row
    block_map: torch.Tensor  # int32 [kv_block_bound]: KV block -> capture block, -1 none
    block_size: int
    first_column: int  # where this rank's columns start in a row
    staging: list[torch.Tensor]  # restore staging, [max_recompute_tokens // block_size, block_size, width]
    slots: torch.Tensor  # int64 [max_recompute_tokens]: the recomputed tokens' slots
    positions: torch.Tensor  # and their positions
    ranks: TensorParallelRanks | None  # with activation shards: the group, its join buffers reserved

    @property
    def nbytes(self) -> int:
        tensors = [*self.capture.values(), self.block_map, *self.staging, self.slots, self.positions]
        if self.ranks is not None:
            tensors += [self.ranks._gathered, self.ranks._rows]
        return sum(t.numel() * t.element_size() for t in tensors)

    def check_fits(self, num_blocks: int, block_size: int) -> None:
        """At `register_kv_caches`: the KV cache vLLM made must be one these buffers were sized for."""
        if block_size != self.block_size:
            raise RuntimeError(
                f"partial_kv: the capture space was made at model load for blocks of {self.block_size} "
                f"tokens, but the KV cache has blocks of {block_size}; set --block-size {block_size}"
            )
        if num_blocks > self.block_map.shape[0]:
            raise RuntimeError(
                f"partial_kv: vLLM made {num_blocks} KV blocks, more than the {self.block_map.shape[0]} "
                "the map from KV block to capture block was sized for at model load (from the device's "
                "memory or kv_cache_memory_bytes); set num_gpu_blocks_override to the number of "
                "blocks, or recompute_ratio 0 to keep no activations, and please report it"
            )


_CURRENT: list[DeviceBuffers] = []  # the latest model load's, in this process


def current() -> DeviceBuffers | None:
    return _CURRENT[0] if _CURRENT else None


def release() -> None:
    _CURRENT.clear()
    capture.bind_buffers({})


def allocate(vllm_config, layer_names: list[str], device: torch.device) -> DeviceBuffers:
    """Allocate and bind to the capture op at once (called at model load, when activations are
    kept). The join buffers are reserved and warmed up with one all-gather: a collective, which
    every rank of the tensor-parallel group reaches in its own model load."""
    release()  # the previous model's, if any, go first
    shape = model_shape(vllm_config)
    cfg = parse_config(extra_config(vllm_config))
    dtype, bs = vllm_config.model_config.dtype, shape.block_size
    width = shape.hidden_size // shape.act_shards
    ranks = TensorParallelRanks() if shape.act_shards > 1 else None
    rows = capture_blocks(vllm_config) * bs + 1
    max_tokens = cfg.max_recompute_tokens - cfg.max_recompute_tokens % bs
    total = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else _host_total_bytes()
    bound = kv_block_bound(vllm_config, total)
    ensure_room({device: device_bytes(vllm_config) + 4 * bound})
    buffers = DeviceBuffers(
        capture={n: torch.zeros(rows, width, dtype=dtype, device=device) for n in layer_names},
        block_map=torch.full((bound,), -1, dtype=torch.int32, device=device),
        block_size=bs,
        first_column=ranks.rank * width if ranks else 0,  # shards in rank order make a row, as joined
        # Two on CUDA (layer l + 1's copy overlaps layer l's recompute); zeroed, so that the CPU
        # build's memory accounting (resident set) sees them too.
        staging=[torch.zeros(max_tokens // bs, bs, width, dtype=dtype, device=device)
                 for _ in range(2 if device.type == "cuda" else 1)],
        slots=torch.zeros(max_tokens, dtype=torch.long, device=device),
        positions=torch.zeros(max_tokens, dtype=torch.long, device=device),
        ranks=ranks,
    )
    if ranks is not None:
        ranks.reserve(max_tokens, width, dtype, device)
    capture.bind_buffers(buffers.capture, buffers.block_map, bs, buffers.first_column)
    _CURRENT.append(buffers)
    logger.info(
        "partial_kv: %.1f MiB on %s for the capture space (%d tokens per layer), its map (%d KV blocks), "
        "restore staging (%d tokens)%s, allocated before vLLM profiles memory", buffers.nbytes / 2**20,
        device, rows - 1, buffers.block_map.shape[0], max_tokens,
        " and the join of activation shards" if ranks else "",
    )
    return buffers


def _host_total_bytes() -> int:
    import psutil  # a vLLM dependency

    return psutil.virtual_memory().total
