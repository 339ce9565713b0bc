"""What the scheduler half tells the worker half each step (vLLM ships it between processes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_partial_kv import compat
from vllm_partial_kv.restore import LoadSpec


@dataclass
class PartialKVMetadata(compat.KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    busy: bool = False  # the step also computes for requests that are not restoring
    forward_tokens: int = 0  # tokens the step's forward computes (all requests)
    store_block_ids: list[int] = field(default_factory=list)
    store_slots: list[int] = field(default_factory=list)
    store_capture: list[int] = field(default_factory=list)  # per stored block: its capture block, -1: none
    store_kv: list[bool] = field(default_factory=list)  # per stored block: copy its K/V (not: layout "act")
    # Every block the forward writes this step, and the capture block its rows go to (-1: none).
    capture_block_ids: list[int] = field(default_factory=list)
    capture_blocks: list[int] = field(default_factory=list)
    new_block_ids: list[int] = field(default_factory=list)  # allocated this step: about to be written
    # Storage tier: per stored block, its hash to write to the directory (b"": not written), and
    # per restoring request, the blocks it reads from the directory first (storage_tier.Fetch).
    store_hashes: list[bytes] = field(default_factory=list)
    fetches: dict[str, list] = field(default_factory=dict)
