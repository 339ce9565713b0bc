"""What a worker does together with the other ranks: join the tensor-parallel ranks' activation
shards, agree whether a restore goes ahead and whether it succeeded, and plan from one profile.

The shards are joined over the torch process group vLLM made for its tensor-parallel group
(`device_group`: NCCL on GPUs, gloo on the CPU build), not through its device communicator: on
GPUs that communicator's NCCL calls run on the caller's stream, and a restore's all-gather on the
restore's stream beside a forward's all-reduce on the main stream, through one NCCL
communicator, may deadlock. torch's process group runs its collectives on a stream of its own,
in the order the ranks issue them, which every rank does in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vllm.distributed.parallel_state import get_pp_group, get_tp_group


class TensorParallelRanks:
    """This worker's tensor-parallel group, for a restore that reads activation shards."""

    def __init__(self) -> None:
        group = get_tp_group()
        self.size, self.rank = group.world_size, group.rank_in_group
        self._device_group, self._cpu_group = group.device_group, group.cpu_group
        self._gathered = self._rows = torch.empty(0)

    def reserve(self, max_tokens: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        """The join's buffers (the all-gather's output and the rows in token order), allocated once
        at start-up: an allocation failing on one rank in the middle of a restore would leave the
        others waiting in the next layer's all-gather. One layer's worth: the compute stream joins
        and recomputes one layer after the other. One join now, too: NCCL sets a communicator up
        (and its buffers) at its first collective, which must not be a served restore's.
        A collective: every rank calls it at start-up."""
        self._gathered = torch.empty(self.size * max_tokens, width, dtype=dtype, device=device)
        self._rows = torch.empty(max_tokens, self.size * width, dtype=dtype, device=device)
        self.gather(torch.zeros(1, width, dtype=dtype, device=device))

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """[tokens, hidden / TP] shards of every rank -> [tokens, hidden] rows (a view of the
        reserved buffer, valid until the next gather)."""
        tokens, width = shard.shape
        if tokens > self._rows.shape[0]:
            raise ValueError(f"joining {tokens} rows, {self._rows.shape[0]} reserved")
        out = self._gathered[: self.size * tokens]
        dist.all_gather_into_tensor(out, shard.contiguous(), group=self._device_group)
        rows = self._rows[:tokens]
        rows.view(tokens, self.size, width).copy_(out.view(self.size, tokens, width).transpose(0, 1))
        return rows

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag true on every rank (a host-side all-reduce): a restore whose all-gathers some
        rank would not join must not start on any rank."""
        values = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(values, op=dist.ReduceOp.MIN, group=self._cpu_group)
        return [bool(v) for v in values.tolist()]


def from_first_rank(obj):
    """The first rank's object on every tensor-parallel rank of every pipeline stage of this
    engine (not across data-parallel engines): ranks that plan from the same profile pick the
    same split. Stage by stage from its TP rank 0, then from the first stage along each PP group."""
    return get_pp_group().broadcast_object(get_tp_group().broadcast_object(obj, src=0), src=0)
