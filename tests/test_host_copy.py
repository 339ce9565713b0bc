"""Block copies between the host pool and vLLM's paged KV caches as raw bytes, in every GPU layout.

On the GPU the copies go through vLLM's batched driver copy (`swap_blocks_batch`), which moves
bytes and knows nothing of layouts. Without a GPU, host memory stands in for device memory and
`memmove` for the driver copy, so the address arithmetic, the host pool's stride mirroring and the
layout views run exactly as they do on the GPU, where the same test runs the real copy.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from vllm_partial_kv import compat
from vllm_partial_kv.restore import copy_rows_as_bytes
from vllm_partial_kv.store import HostPool

NB, BS, H, D = 6, 16, 4, 8


def memmove(src_ptrs: torch.Tensor, dst_ptrs: torch.Tensor, sizes: torch.Tensor) -> None:
    for s, d, n in zip(src_ptrs.tolist(), dst_ptrs.tolist(), sizes.tolist()):
        ctypes.memmove(d, s, n)


def _layouts() -> dict[str, torch.Tensor]:
    """Empty caches with the logical shape and physical order of each backend."""
    return {
        # vLLM 0.26 FlashAttention: logical [blocks, heads, block, 2*head], stored NHD.
        "flash_attn_0.26": torch.empty(NB, BS, H, 2 * D).permute(0, 2, 1, 3),
        "flash_attn_kv_first": torch.empty(2, NB, BS, H, D),
        "flashinfer_nhd": torch.empty(NB, 2, BS, H, D),
        "flashinfer_hnd": torch.empty(NB, 2, H, BS, D).permute(0, 1, 3, 2, 4),
        "cpu_0.32": torch.empty(NB, H, BS, 2 * D),
    }


def _idx(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("layout", list(_layouts()))
def test_blocks_round_trip_through_the_host_pool(layout: str, device: str) -> None:
    """On the CPU through memmove; on a GPU through vLLM's batched copy and a pinned pool."""
    if device == "cuda" and not (torch.cuda.is_available() and compat.batched_memcpy()):
        pytest.skip("needs a GPU and vLLM's CUDA build")
    memcpy = memmove if device == "cpu" else compat.batched_memcpy()
    cache = _layouts()[layout].to(device)  # keeps the physical order
    cache.copy_(torch.randn(cache.shape))
    views = compat.block_views(cache, NB)
    original_k, original_v = (t.clone() for t in compat.kv_cache_views(cache, NB))
    pool = HostPool(4, {"layer": views}, None, cache.dtype, pin=device == "cuda")

    blocks, slots = [4, 1, 3], [2, 0, 3]
    for host, dev in zip(pool.kv["layer"], views):
        copy_rows_as_bytes(memcpy, host, _idx(slots), dev, _idx(blocks))
    if device == "cuda":
        torch.cuda.synchronize()
    for host, dev in zip(pool.kv["layer"], views):  # logically the same blocks, element by element
        assert torch.equal(host[slots], dev[blocks].cpu())

    cache.zero_()
    targets = [0, 5, 2]  # restore into other blocks, as after eviction
    for host, dev in zip(pool.kv["layer"], views):
        copy_rows_as_bytes(memcpy, dev, _idx(targets), host, _idx(slots))
    if device == "cuda":
        torch.cuda.synchronize()
    k, v = compat.kv_cache_views(cache, NB)  # the views the Triton kernel and attention read
    assert torch.equal(k[targets], original_k[blocks]) and torch.equal(v[targets], original_v[blocks])
    untouched = [b for b in range(NB) if b not in targets]
    assert not k[untouched].any() and not v[untouched].any()


def test_host_rows_in_another_element_order_are_refused() -> None:
    """The bug that once scrambled restores on vLLM 0.26: host blocks laid out in the logical
    order of a cache stored in another one."""
    cache = _layouts()["flash_attn_0.26"]
    host = torch.empty(4, *cache.shape[1:])  # contiguous in logical order
    with pytest.raises(ValueError, match="different orders"):
        copy_rows_as_bytes(memmove, host, _idx([0]), cache, _idx([1]))


def test_rows_that_are_not_dense_are_refused() -> None:
    cache = torch.empty(NB, BS, H, 2 * D)[:, :, :, :D]  # every row has holes
    host = torch.empty_strided((4, BS, H, D), cache.stride())
    with pytest.raises(ValueError, match="not dense"):
        copy_rows_as_bytes(memmove, host, _idx([0]), cache, _idx([1]))


@pytest.mark.parametrize("kv_cache_dtype,fp8", [
    ("fp8", torch.float8_e4m3fn), ("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2),
])
@pytest.mark.parametrize("layout", list(_layouts()))
def test_fp8_caches_allocated_as_bytes_are_viewed_as_fp8(layout: str, kv_cache_dtype: str, fp8) -> None:
    """vLLM allocates fp8 KV caches as uint8: the kernel gets the fp8 views its backend reads,
    over the same memory, or else it refused every fp8 cache."""
    cache = torch.zeros_like(_layouts()[layout], dtype=torch.uint8)  # same physical order
    k, v = compat.kv_cache_views(cache, NB, kv_cache_dtype)
    assert k.dtype == v.dtype == fp8 and k.shape == (NB, BS, H, D)
    k[1, 2, 0].fill_(1.0)
    assert cache.view(fp8).float().sum() == D  # written through to the cache itself
    with pytest.raises(ValueError, match="not plain fp8"):
        compat.kv_cache_views(cache, NB, "fp8_per_token_head")


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn])
def test_pool_is_one_allocation_of_the_store_size_registered_whole(kv_dtype, monkeypatch) -> None:
    """torch's pinned allocator rounds every tensor up to a power of two: the pool is one buffer
    of exactly slots x (K/V + activation bytes per block), registered with the driver whole and
    unregistered when the pool goes. On the CPU the registration is recorded instead of made."""
    import gc
    import math

    calls = []
    monkeypatch.setattr(compat, "pin_host_memory", lambda buf: calls.append(
        ("pin", buf.data_ptr(), buf.numel() * buf.element_size())) or (lambda: calls.append(("unpin",))))
    views = {f"layer{i}": compat.block_views(cache.to(kv_dtype), NB) for i, cache in enumerate(_layouts().values())}
    slots, act_shape = 5, (BS, 3 * D)
    pool = HostPool(slots, views, act_shape, torch.bfloat16, pin=True)

    per_slot = sum(v[0].numel() * v.element_size() for vs in views.values() for v in vs)
    per_slot += len(views) * math.prod(act_shape) * 2
    assert pool.buffer.numel() == pool.nbytes == slots * per_slot and pool.pinned
    assert calls == [("pin", pool.buffer.data_ptr(), slots * per_slot)]
    host = [(t, dev) for n in views for t, dev in zip(pool.kv[n], views[n])]
    host += [(t, torch.empty(NB, *act_shape, dtype=torch.bfloat16)) for t in pool.act.values()]
    spans = []
    for t, dev in host:
        assert t.untyped_storage().data_ptr() == pool.buffer.data_ptr()  # views of the one buffer
        assert t.shape == (slots, *dev.shape[1:]) and t.stride()[1:] == dev.stride()[1:]
        assert t.data_ptr() % t.element_size() == 0
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    spans.sort()  # together they tile the buffer: no overlap, no gap
    assert spans[0][0] == pool.buffer.data_ptr() and spans[-1][1] == pool.buffer.data_ptr() + pool.nbytes
    assert all(end == start for (_, end), (start, _) in zip(spans, spans[1:]))

    del pool, host
    gc.collect()
    assert calls[-1] == ("unpin",)


def test_pool_refuses_blocks_with_holes() -> None:
    cache = torch.empty(NB, BS, H, 2 * D)[:, :, :, :D]  # every block has holes
    with pytest.raises(ValueError, match="layer: KV blocks .* not dense"):
        HostPool(4, {"layer": [cache]}, None, torch.float32, pin=False)
