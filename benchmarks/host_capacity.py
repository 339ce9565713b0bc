"""Tokens the host store holds at equal cpu_bytes, per host format and host layout, for a multi-head
7B shape (Llama-2-7B) and a grouped-query 8B shape (Llama-3-8B), bf16, block size 16.

Slot counts come from the plugin's own sizing (`slots_for_layout` on the format's bytes per block);
bytes per token from the HostPool really allocated with them (CPU memory, unpinned, `cpu_bytes` of
it), with the slot views the worker builds for that format.

    python benchmarks/host_capacity.py [--cpu-mib 512]      # prints a Markdown table
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from vllm_partial_kv.planner import ModelShape
from vllm_partial_kv.store import HostPool, slots_for_layout
from vllm_partial_kv.store_format import act_dtype, kv_slot_views

SHAPES = {  # layers, hidden, KV heads, head size
    "MHA-7B": (32, 4096, 32, 128),
    "GQA-8B": (32, 4096, 8, 128),
}
FORMATS = ("auto", "fp8")
LAYOUTS = ("kv", "kv+act", "act")
BLOCK = 16


@dataclass(frozen=True)
class Capacity:
    tokens: int
    pool_bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.pool_bytes / self.tokens


def capacity(shape_name: str, fmt: str, layout: str, cpu_bytes: int) -> Capacity:
    """Allocate the host pool the worker would for this shape, format and layout in `cpu_bytes`."""
    layers, hidden, heads, head = SHAPES[shape_name]
    shape = ModelShape(num_layers=layers, hidden_size=hidden, num_kv_heads=heads, head_size=head, dtype_bytes=2,
                       block_size=BLOCK, host_format=fmt)
    kv_block, act_block = (BLOCK * b * layers for b in (shape.kv_bytes_per_token, shape.act_bytes_per_token))
    kv_slots, act_slots = slots_for_layout(cpu_bytes, kv_block, act_block, layout)
    # One device block of a flash-attention cache per layer: [2, blocks, block_size, heads, head].
    device = torch.empty((2, 1, BLOCK, heads, head), dtype=torch.bfloat16, device="meta")
    views = kv_slot_views(fmt, {f"layer.{i}": [device[0], device[1]] for i in range(layers)}, torch.bfloat16,
                          (BLOCK, heads, head))
    pool = HostPool(kv_slots, views, None if layout == "kv" else (BLOCK, hidden), act_dtype(fmt, torch.bfloat16),
                    pin=False, act_slots=act_slots if layout == "act" else None, fmt=fmt)
    if pool.nbytes > cpu_bytes:
        raise AssertionError(f"{shape_name} {fmt} {layout}: the pool takes {pool.nbytes} > cpu_bytes {cpu_bytes}")
    return Capacity((kv_slots + act_slots) * BLOCK, pool.nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-mib", type=int, default=512)
    cpu_bytes = parser.parse_args().cpu_mib << 20
    print(f"cpu_bytes = {cpu_bytes >> 20} MiB per store; x: tokens held / the 16-bit K/V store's (format auto, "
          "layout kv)\n")
    print("| shape | format | layout | bytes per token (all layers) | tokens per host GiB | x |")
    print("|---|---|---|---|---|---|")
    for shape_name in SHAPES:
        base = capacity(shape_name, "auto", "kv", cpu_bytes).tokens
        for fmt in FORMATS:
            for layout in LAYOUTS:
                c = capacity(shape_name, fmt, layout, cpu_bytes)
                print(f"| {shape_name} | {fmt} | {layout} | {c.bytes_per_token:,.0f} | "
                      f"{c.tokens * 2**30 / cpu_bytes:,.0f} | {c.tokens / base:.2f} |")


if __name__ == "__main__":
    main()
