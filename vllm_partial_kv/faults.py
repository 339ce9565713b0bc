"""A documented test hook: make every k-th restore fail, to check how a deployment (vLLM's
`kv_load_failure_policy`, clients, monitoring) behaves when restores fail.

Set `VLLM_PARTIAL_KV_FAIL_EVERY_KTH_RESTORE=k` in the server's environment; it is read once, when
the worker half of the connector starts. An environment variable rather than a
`kv_connector_extra_config` key, so that a testing switch can never ride along in a production
config file. A failed restore takes the same path as a real one: logged, counted in
`restore_failures_total`, reported to vLLM as a KV load error.
"""

from __future__ import annotations

import logging
import os

from vllm_partial_kv.config import ConfigError

ENV = "VLLM_PARTIAL_KV_FAIL_EVERY_KTH_RESTORE"

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


class InjectedRestoreFailure(RuntimeError):
    """Raised by the test hook instead of issuing a restore."""


class RestoreFaults:
    """Counts restores (one per step that restores) and fails every k-th one; k None: never."""

    def __init__(self, every: int | None = None) -> None:
        self.every = every
        self.restores = 0

    @classmethod
    def from_env(cls) -> RestoreFaults:
        raw = os.environ.get(ENV, "").strip()
        if not raw:
            return cls()
        try:
            every = int(raw)
        except ValueError:
            every = 0
        if every < 1:
            raise ConfigError(f"{ENV} must be a positive integer (fail every k-th restore), got {raw!r}")
        logger.warning("partial_kv: %s=%d: every %d-th restore fails on purpose (a test hook)", ENV, every, every)
        return cls(every)

    def check(self) -> None:
        """Call once per restore, before issuing it."""
        self.restores += 1
        if self.every and self.restores % self.every == 0:
            raise InjectedRestoreFailure(f"restore {self.restores} failed on purpose ({ENV}={self.every})")
