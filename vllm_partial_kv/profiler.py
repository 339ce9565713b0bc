"""Measure what the planner's cost model needs (copy bandwidth, per-call copy latency, per-layer
recompute time) once per device and model shape, and cache it on disk so start-up stays fast.

Pure torch and stdlib: no vLLM. On a GPU, copies come from pinned memory and are timed with CUDA
events; on a CPU the "device" copy is a memcpy and sizes are capped so profiling stays short.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from vllm_partial_kv import __version__
from vllm_partial_kv.planner import ModelShape, Profile, RestoreRequest, plan_split, restore_time

__all__ = [
    "measure_profile", "measure_gather", "load_or_measure", "load_or_measure_storage", "format_profile", "CACHE_DIR_ENV",
]

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "VLLM_PARTIAL_KV_CACHE_DIR"
DEFAULT_TOKEN_COUNTS = (256, 1024, 4096, 16384)
_CACHE_FORMAT = 3
# The shape fields a measurement depends on (layer count and forward_ratio only enter the model).
_MEASURED_FIELDS = ("hidden_size", "num_kv_heads", "head_size", "dtype_bytes", "kv_dtype_bytes", "block_size")
_GPU_COPY_BYTES = 256 << 20
_CPU_COPY_BYTES = 4 << 20
_CPU_MAX_FLOP = 1e9  # largest recompute call on a CPU: well under 0.1 s on two idle cores
_SUMMARY_TOKENS = 16384

RecomputeFn = Callable[..., None]
"""`vllm_partial_kv.kernels.recompute_kv(x, w_k, w_v, key_cache, value_cache, slot_mapping,
positions, cos_sin_cache)` or anything with that signature."""


def measure_profile(
    shape: ModelShape,
    *,
    device: torch.device | str,
    recompute_fn: RecomputeFn,
    dtype: torch.dtype,
    token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
    with_load: bool = False,
) -> Profile:
    """Measure a Profile on `device`. with_load=True also times the recompute while a matmul loop
    keeps the device busy and stores the slowdown as busy_factor (>= 1)."""
    device = torch.device(device)
    if not token_counts or min(token_counts) <= 0:
        raise ValueError(f"token_counts must be positive, got {token_counts}")
    token_counts = sorted(set(token_counts))
    if device.type != "cuda":
        return _measure(shape, device, recompute_fn, dtype, _cpu_token_counts(shape, token_counts), with_load)
    with torch.cuda.device(device):  # events, streams and the load must all be on the measured GPU
        device = torch.device("cuda", torch.cuda.current_device())
        return _measure(shape, device, recompute_fn, dtype, token_counts, with_load)


def load_or_measure(
    shape: ModelShape,
    *,
    device: torch.device | str,
    recompute_fn: RecomputeFn,
    dtype: torch.dtype,
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
    with_load: bool = False,
    kernel: str = "auto",
) -> Profile:
    """The cached Profile for this device, software stack, shape and dtype (and load: with_load
    measures recompute next to a concurrent matmul stream), measured if absent, stale, corrupt
    or `refresh` is set. `kernel` names the recompute backend `recompute_fn` runs: a profile of
    one backend says nothing about another."""
    device = torch.device(device)
    key = {**_cache_key(shape, device, dtype), "with_load": with_load, "kernel": kernel}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_dir(cache_dir) / f"profile-{digest}.json"
    if not refresh and path.exists():
        try:
            data = json.loads(path.read_text())
            if data["key"] == key:
                profile = Profile.from_dict(data["profile"])
                logger.info("partial_kv: loaded profile from %s", path)
                return profile
            logger.info("partial_kv: profile %s was made for %s, re-measuring", path, data["key"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("partial_kv: profile cache %s is unreadable (%s), re-measuring", path, exc)
    started = time.perf_counter()
    profile = measure_profile(
        shape, device=device, recompute_fn=recompute_fn, dtype=dtype, with_load=with_load
    )
    logger.info("partial_kv: measured profile in %.1f s", time.perf_counter() - started)
    try:
        _write_atomic(path, json.dumps({"key": key, "profile": profile.to_dict()}, indent=1))
        logger.info("partial_kv: saved profile to %s", path)
    except OSError as exc:
        logger.warning("partial_kv: cannot save profile to %s (%s); it will be measured again", path, exc)
    return profile


def device_peak_bytes(shape: ModelShape) -> int:
    """The most a profile's measuring holds on a GPU at once: the recompute timer's inputs for the
    largest count (activations and a K and V weight, drawn in float32 and cast; a paged K and V
    cache), the copy's buffer and the background load's matrices."""
    tokens, kv_dim = max(DEFAULT_TOKEN_COUNTS), shape.num_kv_heads * shape.head_size
    inputs = (tokens + 2 * kv_dim) * shape.hidden_size * (4 + shape.dtype_bytes)
    inputs += 2 * tokens * kv_dim * shape.dtype_bytes
    return inputs + _GPU_COPY_BYTES + 2 * 4096 * 4096 * 2


def format_profile(profile: Profile, shape: ModelShape | None = None) -> str:
    """One-screen summary for `vllm-partial-kv profile`; with a shape, also the modelled best split
    of a 16k-token restore."""
    bw = profile.h2d_bytes_per_s
    lines = [
        f"partial-KV profile: {profile.device or 'unknown device'}",
        f"  host->device copy: {bw / 1e9:.1f} GB/s, {profile.copy_latency_s * 1e6:.1f} us per call",
        f"  K+V recompute of one layer (busy factor {profile.busy_factor:.2f}):",
    ]
    for tokens, seconds in profile.recompute_points:
        lines.append(f"    {tokens:>7} tokens: {seconds * 1e6:10.1f} us  ({seconds / tokens * 1e9:.2f} ns/token)")
    if not profile.recompute_points:
        lines.append("    (none: recompute disabled)")
    if shape is not None:
        blocks = _SUMMARY_TOKENS // shape.block_size
        (r,) = plan_split(shape, profile, [RestoreRequest(blocks, blocks)])
        best = restore_time(shape, profile, r * shape.block_size, (blocks - r) * shape.block_size)
        stream = restore_time(shape, profile, 0, blocks * shape.block_size)
        gain = f"{stream / best:.2f}x" if 0 < best < math.inf else "n/a"
        lines.append(
            f"  {blocks * shape.block_size}-token restore, {shape.num_layers} layers: recompute {r}/{blocks} "
            f"blocks ({100 * r / max(blocks, 1):.0f}%) -> {best * 1e3:.2f} ms, "
            f"stream only {stream * 1e3:.2f} ms ({gain})"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ measuring
def _measure(
    shape: ModelShape, device: torch.device, fn: RecomputeFn, dtype: torch.dtype,
    token_counts: list[int], with_load: bool,
) -> Profile:
    bandwidth, latency = _measure_copy(shape, device)
    recompute = _recompute_timer(shape, device, fn, dtype, max(token_counts))
    idle = [recompute(t) for t in token_counts]
    busy = 1.0
    if with_load:
        with _background_load(device):
            loaded = [recompute(t) for t in token_counts]
        ratios = [b / i for b, i in zip(loaded, idle) if i > 0]
        busy = max(1.0, statistics.median(ratios)) if ratios else 1.0
    return Profile(bandwidth, tuple(zip(token_counts, idle)), latency, busy, _device_name(device),
                   overlap=device.type == "cuda")  # the CPU runtime copies, then recomputes


def measure_gather(
    shape: ModelShape, gather_fn: Callable[[torch.Tensor], torch.Tensor], *, device: torch.device | str,
    dtype: torch.dtype, max_tokens: int,
) -> tuple[float, float]:
    """(bytes/s, seconds per call) of the all-gather that joins the tensor-parallel ranks'
    activation shards, timed on the real group like the copy: one block's rows, and the most
    rows a restore gathers (`max_tokens`, within what the join reserved; on a CPU at most a few
    MiB). A collective: every rank of the group must call it at once, with the same shape; it is
    never cached (the group's links are not part of the device's key)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    width = shape.hidden_size // shape.act_shards
    row = width * shape.dtype_bytes
    tokens = max_tokens if cuda else min(max_tokens, max(2 * shape.block_size, _CPU_COPY_BYTES // 4 // row))
    x = torch.zeros(max(tokens, shape.block_size), width, dtype=dtype, device=device)
    repeats = 10 if cuda else 5
    t_one = _median_seconds(lambda: gather_fn(x[: shape.block_size]), device, repeats)
    if tokens <= shape.block_size:  # restores join one block at most: no latency to separate
        return shape.block_size * shape.gather_bytes_per_token / t_one, 0.0
    t_all = _median_seconds(lambda: gather_fn(x), device, repeats)
    small, big = shape.block_size * shape.gather_bytes_per_token, tokens * shape.gather_bytes_per_token
    bandwidth = (big - small) / (t_all - t_one) if t_all > t_one else big / t_all
    return bandwidth, max(0.0, t_one - small / bandwidth)


def _cpu_token_counts(shape: ModelShape, token_counts: Sequence[int]) -> list[int]:
    """Scale the counts down together so the largest recompute stays within _CPU_MAX_FLOP, but
    never below one block: the planner only asks about whole blocks."""
    flop_per_token = 4 * shape.hidden_size * shape.num_kv_heads * shape.head_size
    scale = min(1.0, _CPU_MAX_FLOP / flop_per_token / max(token_counts))
    return sorted({max(shape.block_size, round(t * scale)) for t in token_counts})


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure_copy(shape: ModelShape, device: torch.device) -> tuple[float, float]:
    """(bytes/s, seconds per call) from a two-point fit: one block's K/V of one layer, and the
    whole buffer of such blocks in one call (what the runtime's batched row copy achieves)."""
    cuda = device.type == "cuda"
    chunk = shape.block_size * shape.kv_bytes_per_token
    chunks = max(2, (_GPU_COPY_BYTES if cuda else _CPU_COPY_BYTES) // chunk)
    src = torch.ones(chunks, chunk, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(chunks, chunk, dtype=torch.uint8, device=device)
    repeats = 10 if cuda else 5
    t_one = _median_seconds(lambda: dst[0].copy_(src[0], non_blocking=True), device, repeats)
    t_all = _median_seconds(lambda: dst.copy_(src, non_blocking=True), device, repeats)
    big, small = src.numel(), chunk
    bandwidth = (big - small) / (t_all - t_one) if t_all > t_one else big / t_all
    return bandwidth, max(0.0, t_one - small / bandwidth)


def _recompute_timer(
    shape: ModelShape, device: torch.device, fn: RecomputeFn, dtype: torch.dtype, max_tokens: int
) -> Callable[[int], float]:
    """Inputs for the largest count allocated once; the returned function gives the median
    seconds of one layer's K+V recompute of its first `tokens` rows into a paged cache."""
    heads, head, hidden, bs = shape.num_kv_heads, shape.head_size, shape.hidden_size, shape.block_size
    x = torch.randn(max_tokens, hidden, device=device).to(dtype)
    # Adjacent slices of one weight, as in vLLM's merged QKV projection (one GEMM projects both).
    w_k, w_v = (torch.randn(2 * heads * head, hidden, device=device) * hidden**-0.5).to(dtype).chunk(2)
    key_cache = torch.zeros(math.ceil(max_tokens / bs), bs, heads, head, dtype=dtype, device=device)
    value_cache = torch.zeros_like(key_cache)
    slots = positions = torch.arange(max_tokens, device=device)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head, 2, device=device, dtype=torch.float32) / head)
    freqs = positions.float()[:, None] * inv_freq
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
    repeats = 10 if device.type == "cuda" else 3

    def seconds(tokens: int) -> float:
        args = (x[:tokens], w_k, w_v, key_cache, value_cache, slots[:tokens], positions[:tokens], cos_sin)
        return _median_seconds(lambda: fn(*args), device, repeats)

    return seconds


@contextmanager
def _background_load(device: torch.device) -> Iterator[None]:
    """Keep the device busy with matmuls on another stream (another thread on a CPU)."""
    cuda = device.type == "cuda"
    n = 4096 if cuda else 256
    a = torch.randn(n, n, device=device, dtype=torch.float16 if cuda else torch.float32)
    out = torch.empty_like(a)
    stream = torch.cuda.Stream(device) if cuda else None
    stop = threading.Event()

    def loop() -> None:
        if cuda:
            torch.cuda.set_stream(stream)
        while not stop.is_set():
            for _ in range(4):
                torch.mm(a, a, out=out)
            if cuda:
                stream.synchronize()  # bounded queue, and releases the GIL while the GPU works

    worker = threading.Thread(target=loop, name="partial-kv-load", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()


# ------------------------------------------------------------------------------- storage reads
_STORAGE_PROBE_BYTES = 64 << 20


def measure_storage(directory: str | os.PathLike, block_bytes: int, total_bytes: int = _STORAGE_PROBE_BYTES,
                    threads: int = 4) -> tuple[float, float]:
    """(bytes/s, seconds per file) of block-file reads from `directory`, as the storage tier reads:
    files of `block_bytes` written, synced and dropped from the page cache (where the kernel
    allows), then read and verified on `threads` threads. The files are removed afterwards."""
    from vllm_partial_kv import storage

    files = max(2 * threads, total_bytes // max(block_bytes, 1))
    src = torch.randint(0, 256, (block_bytes,), dtype=torch.uint8)
    dst = torch.empty(threads, block_bytes, dtype=torch.uint8)
    key = storage.identity_key({"probe": os.getpid()})
    root = Path(directory) / f".probe-{os.getpid()}"
    paths = [storage.block_path(str(root), key, i.to_bytes(8, "little"), False) for i in range(files)]
    try:
        for i, path in enumerate(paths):
            storage.write_block(path, key, i.to_bytes(8, "little"), storage.FLAG_KV,
                                [memoryview(src.numpy())], [], fsync=True)
            _drop_cached(path)

        def read(i: int) -> None:
            view = memoryview(dst[i % threads].numpy())
            storage.read_block(paths[i], key, i.to_bytes(8, "little"), storage.FLAG_KV, [view], [])

        started = time.perf_counter()
        read(0)
        one = time.perf_counter() - started
        with ThreadPoolExecutor(threads) as pool:
            started = time.perf_counter()
            list(pool.map(read, range(1, files)))
            seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bandwidth = (files - 1) * block_bytes / seconds
    return bandwidth, max(0.0, one - block_bytes / bandwidth)


def _drop_cached(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


def load_or_measure_storage(
    directory: str | os.PathLike, block_bytes: int, cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
) -> tuple[float, float]:
    """The storage tier's read rate for this directory's filesystem and block size, cached like
    the device profiles (a new mount, block size or plugin version measures again)."""
    st = os.stat(directory)
    key = {"format": _CACHE_FORMAT, "storage": os.path.realpath(directory), "st_dev": st.st_dev,
           "block_bytes": block_bytes, "plugin": __version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_dir(cache_dir) / f"storage-{digest}.json"
    if not refresh and path.exists():
        try:
            data = json.loads(path.read_text())
            if data["key"] == key:
                return float(data["bytes_per_s"]), float(data["latency_s"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    bandwidth, latency = measure_storage(directory, block_bytes)
    logger.info("partial_kv: storage reads from %s: %.2f GB/s, %.0f us per block file", directory,
                bandwidth / 1e9, latency * 1e6)
    try:
        _write_atomic(path, json.dumps({"key": key, "bytes_per_s": bandwidth, "latency_s": latency}))
    except OSError as exc:
        logger.warning("partial_kv: cannot save the storage profile to %s (%s)", path, exc)
    return bandwidth, latency


# --------------------------------------------------------------------------------------- caching
def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "vllm_partial_kv"
    return Path(cache_dir).expanduser()


def _cache_key(shape: ModelShape, device: torch.device, dtype: torch.dtype) -> dict:
    """Everything a measurement depends on: a change in any of it means measuring again."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        stack = f"cuda {torch.version.cuda}, driver {_nvidia_driver()}, sm {torch.cuda.get_device_capability(index)}"
    else:
        stack = f"{device.type}, {torch.get_num_threads()} threads"
    return {
        "format": _CACHE_FORMAT,
        "device": _device_name(device),
        "stack": stack,
        "torch": torch.__version__,
        "plugin": __version__,  # a new kernel version is a new measurement
        "shape": {name: getattr(shape, name) for name in _MEASURED_FIELDS},
        "dtype": str(dtype),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _nvidia_driver() -> str:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return "unknown"


def _write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a crash or a concurrent worker never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
