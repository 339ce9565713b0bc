"""`kv_connector_extra_config` parsed and validated once, at start-up, into a frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vllm_partial_kv.formats import HOST_FORMATS

DEFAULT_CPU_BYTES = 4 << 30
DEFAULT_STORAGE_BYTES = 100 << 30
HOST_LAYOUTS = ("kv+act", "act", "kv")


class ConfigError(ValueError):
    """A bad `kv_connector_extra_config`: raised at start-up, never mid-serving."""


@dataclass(frozen=True)
class PartialKVConfig:
    cpu_bytes: int = DEFAULT_CPU_BYTES
    """Size of the host store (KV blocks plus activations), allocated once."""
    recompute_ratio: float | None = None
    """Fraction of each restore recomputed from activations; None means "auto" (planner)."""
    offload_prompt_only: bool = False
    """Store only prompt blocks; by default decode-phase blocks are stored too."""
    max_recompute_tokens: int = 16384
    """Staging capacity for activations per restore step (GPU memory, double-buffered)."""
    capture_tokens: int | None = None
    """Activation rows per layer kept on the GPU for blocks being filled or stored; None: sized
    from max_num_seqs and max_num_batched_tokens, at most DEFAULT_CAPTURE_TOKENS."""
    kernel: str = "auto"
    """Recompute backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch"."""
    profile_cache_dir: str | None = None
    host_layout: str = "kv+act"
    """What the host store keeps per block: "kv+act" K/V and activations (the planner picks the
    split), "act" activations only where the block has them (every restore of them recomputes),
    "kv" K/V only (nothing is captured)."""
    host_format: str = "auto"
    """Number format of the host store: "auto" (K/V in the KV cache's dtype, activations in the
    model's: lossless) or "fp8" (e4m3 with per-token scales: half the bytes of 16-bit K/V, a quarter
    for activations; lossy, see `formats`)."""
    async_load: bool = True
    """Restore between steps while other requests keep running, as vLLM's own offloading does;
    false restores inside the step that needs the blocks (the forward waits per layer)."""
    storage_dir: str | None = None
    """The storage tier under the host store (storage.py): a directory on a local disk or a shared
    filesystem, shared by every instance pointed at it; None: no storage tier."""
    storage_bytes: int = DEFAULT_STORAGE_BYTES
    """Size bound of the whole directory (every instance and model in it), kept by removing the
    least recently used files."""
    storage_rescan_s: float = 2.0
    """Seconds between rescans of the directory, which find other instances' blocks and keep
    the size bound."""
    storage_io_threads: int = 4
    """Threads per worker that read and write block files."""
    storage_fsync: bool = False
    """fsync each file before its rename: blocks survive a power loss (without it a crash can
    leave a damaged file, which reads then reject as a miss)."""

    @property
    def wants_activations(self) -> bool | None:
        """True/False when the ratio forces it; None when the planner decides from the shape."""
        if self.host_layout == "kv":
            return False
        if self.recompute_ratio is None:
            return None
        return self.recompute_ratio > 0


def parse_config(extra: dict[str, Any] | None) -> PartialKVConfig:
    extra = dict(extra or {})
    known = {f.name for f in fields(PartialKVConfig)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ConfigError(
            f"unknown kv_connector_extra_config key(s) {unknown} for PartialRecomputeConnector; "
            f"known: {sorted(known)}"
        )
    out: dict[str, Any] = {}
    if "cpu_bytes" in extra:
        out["cpu_bytes"] = _positive_int("cpu_bytes", extra["cpu_bytes"])
    if "max_recompute_tokens" in extra:
        out["max_recompute_tokens"] = _positive_int(
            "max_recompute_tokens", extra["max_recompute_tokens"]
        )
    if extra.get("capture_tokens") is not None:  # null: the default
        out["capture_tokens"] = _positive_int("capture_tokens", extra["capture_tokens"])
    if "recompute_ratio" in extra:
        out["recompute_ratio"] = _ratio(extra["recompute_ratio"])
    for name in ("storage_bytes", "storage_io_threads"):
        if name in extra:
            out[name] = _positive_int(name, extra[name])
    if "storage_rescan_s" in extra:
        value = extra["storage_rescan_s"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ConfigError(f"storage_rescan_s must be a positive number of seconds, got {value!r}")
        out["storage_rescan_s"] = float(value)
    if extra.get("storage_dir") is not None:  # null: no storage tier
        if not isinstance(extra["storage_dir"], str) or not extra["storage_dir"]:
            raise ConfigError(f"storage_dir must be a directory path, got {extra['storage_dir']!r}")
        out["storage_dir"] = extra["storage_dir"]
        if extra.get("async_load") is False:
            raise ConfigError("storage_dir needs async_load true: a request waits for its file reads between steps")
    for name in ("offload_prompt_only", "async_load", "storage_fsync"):
        if name in extra:
            if not isinstance(extra[name], bool):
                raise ConfigError(f"{name} must be true or false, got {extra[name]!r}")
            out[name] = extra[name]
    if "host_layout" in extra:
        if extra["host_layout"] not in HOST_LAYOUTS:
            raise ConfigError(f"host_layout must be one of {list(HOST_LAYOUTS)}, got {extra['host_layout']!r}")
        out["host_layout"] = extra["host_layout"]
        _check_layout_and_ratio(out["host_layout"], out.get("recompute_ratio"))
    if "host_format" in extra:
        if extra["host_format"] not in HOST_FORMATS:
            raise ConfigError(f"host_format must be one of {list(HOST_FORMATS)}, got {extra['host_format']!r}")
        out["host_format"] = extra["host_format"]
    if "kernel" in extra:
        if extra["kernel"] not in ("auto", "triton", "torch"):
            raise ConfigError(f"kernel must be auto, triton or torch, got {extra['kernel']!r}")
        out["kernel"] = extra["kernel"]
    if extra.get("profile_cache_dir") is not None:  # null: the default
        if not isinstance(extra["profile_cache_dir"], str) or not extra["profile_cache_dir"]:
            raise ConfigError(f"profile_cache_dir must be a directory path, got {extra['profile_cache_dir']!r}")
        out["profile_cache_dir"] = extra["profile_cache_dir"]
    return PartialKVConfig(**out)


def _check_layout_and_ratio(layout: str, ratio: float | None) -> None:
    """A fixed ratio the layout cannot serve is refused, not quietly replaced: "kv" keeps nothing to
    recompute from, "act" keeps activations in place of K/V, so each of its restores recomputes."""
    if layout == "kv" and ratio:
        raise ConfigError(
            f"host_layout \"kv\" keeps no activations, so nothing can be recomputed: recompute_ratio {ratio} "
            "cannot be served; set recompute_ratio 0 or \"auto\", or host_layout \"kv+act\""
        )
    if layout == "act" and ratio == 0:
        raise ConfigError(
            f"host_layout \"act\" keeps activations in place of K/V, so every restore recomputes: recompute_ratio "
            f"{ratio} cannot be served; set recompute_ratio above 0 or \"auto\", or host_layout \"kv\""
        )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    try:
        number = int(float(value))
    except (ValueError, OverflowError):  # OverflowError: inf
        raise ConfigError(f"{name} must be a positive integer, got {value!r}") from None
    if number <= 0 or number != float(value):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return number


def _ratio(value: Any) -> float | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        raise ConfigError(f"recompute_ratio must be \"auto\" or a number in [0, 1], got {value!r}")
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"recompute_ratio must be \"auto\" or a number in [0, 1], got {value!r}"
        ) from None
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"recompute_ratio must be in [0, 1], got {ratio}")
    return ratio
