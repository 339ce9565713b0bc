"""The GPU capture space's free list: a few block-rows of activations, lent to the KV blocks
being filled and handed back once their store has been issued.

Pure Python, scheduler side. The worker only follows the assignments the scheduler sends, so
both halves always agree. First in, first out: a block handed back is lent again as late as
possible, so the store still reading it has usually finished (the worker fences it anyway).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class CaptureSpace:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"capture space needs >= 0 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.exhausted = 0  # blocks that found no capture block, since start-up (for logs)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def lend(self) -> int | None:
        """A capture block for a KV block about to be filled; None when all are lent."""
        if not self._free:
            self.exhausted += 1
            return None
        return self._free.popleft()

    def give_back(self, blocks: Iterable[int]) -> None:
        self._free.extend(blocks)
