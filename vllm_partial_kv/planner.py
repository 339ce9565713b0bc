"""Cost model of one restore step and the choice of how many leading blocks to recompute.

Pure Python (no torch, no vLLM): it runs in the scheduler every step, so it must stay well under
a millisecond. The model mirrors `restore.RestoreRuntime._load_pipelined`, per layer l:

    copy stream:    wait until recompute(l-2) freed staging slot l%2, copy X of the R recomputed
                    tokens (t_x), then K/V of the S streamed tokens (t_kv)
    compute stream: wait for X(l), recompute K/V of R tokens (t_c)
    forward:        (a restore inside the step, waited for per layer) wait for layer l's
                    recompute and K/V, run the step's own layer l (f)

with t_x = lat + R*act_bytes/bw, t_kv = lat + S*kv_bytes/bw (each 0 when nothing is copied),
t_c = busy_factor * recompute_curve(R) + t_g, and f the forward's time per layer. Under tensor
parallelism each rank copies only its shard of the activation columns (act_bytes is per rank) and
the compute stream first joins the ranks' shards: t_g = gather_lat + R*gather_bytes/gather_bw.
The recompute and the forward share the compute units, so they are modelled as one queue:
recompute(l) after forward(l-1). The step ends when the forward finishes layer L-1 (with f = 0:
when the restore does). An asynchronous restore runs beside other requests' steps instead: f = 0
and the busy profile's factor stands for them. Where nothing overlaps (`Profile.overlap` False:
the CPU runtime copies and recomputes one after the other), a layer costs t_x + t_kv + t_c + f.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from vllm_partial_kv import formats

__all__ = ["ModelShape", "Profile", "RestoreRequest", "forward_seconds", "restore_time", "plan_split"]


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_size: int
    dtype_bytes: int
    block_size: int
    forward_ratio: float = 0.0
    """A layer's forward GEMM work per token in units of its K/V projection's (0: unknown)."""
    kv_dtype_bytes: int | None = None
    """Bytes per K/V element in the cache when it differs from the model's (fp8 caches: 1)."""
    act_shards: int = 1
    """Tensor-parallel ranks that each keep 1/act_shards of every activation row's columns
    (num_kv_heads is already this rank's; hidden_size is the whole row the recompute reads)."""
    host_format: str = "auto"
    """The host store's number format (`formats`): the bytes a token costs on the host and link."""

    def __post_init__(self) -> None:
        if self.kv_dtype_bytes is None:
            object.__setattr__(self, "kv_dtype_bytes", self.dtype_bytes)
        for name in ("num_layers", "hidden_size", "num_kv_heads", "head_size", "dtype_bytes", "block_size",
                     "kv_dtype_bytes", "act_shards"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelShape.{name} must be positive, got {getattr(self, name)}")
        if not (self.forward_ratio >= 0 and math.isfinite(self.forward_ratio)):
            raise ValueError(f"ModelShape.forward_ratio must be finite and >= 0, got {self.forward_ratio}")
        if self.host_format not in formats.HOST_FORMATS:
            raise ValueError(f"ModelShape.host_format must be one of {formats.HOST_FORMATS}, got {self.host_format!r}")
        if self.hidden_size % self.act_shards:
            raise ValueError(f"hidden_size {self.hidden_size} does not split into {self.act_shards} shards")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in one layer, as the host store keeps them (and the link moves them)."""
        return formats.kv_bytes_per_token(self.host_format, self.num_kv_heads, self.head_size, self.kv_dtype_bytes)

    @property
    def act_bytes_per_token(self) -> int:
        """This rank's part of the K/V-projection input X of one token in one layer, as the host
        store keeps it (and the link moves it)."""
        return formats.act_bytes_per_token(self.host_format, self.hidden_size // self.act_shards, self.dtype_bytes)

    @property
    def capture_bytes_per_token(self) -> int:
        """This rank's part of X in the model's dtype: the GPU capture space's row."""
        return self.hidden_size * self.dtype_bytes // self.act_shards

    @property
    def gather_bytes_per_token(self) -> int:
        """What a rank receives from the others to rebuild one token's row (0 without shards):
        shards are joined in the model's dtype."""
        return self.capture_bytes_per_token * (self.act_shards - 1)


@dataclass(frozen=True)
class Profile:
    """Measured rates of one device for one model shape.

    recompute_points: (tokens, seconds) of ONE layer's K+V recompute, interpolated piecewise-linearly
    from (0, 0) and extrapolated past the last point at its seconds per token. No points (or infinite
    seconds) means recompute is impossible; h2d_bytes_per_s == 0 means nothing can be copied.
    busy_factor scales recompute time to model a GPU shared with other work.
    """

    h2d_bytes_per_s: float
    recompute_points: tuple[tuple[int, float], ...] = ()
    copy_latency_s: float = 0.0
    busy_factor: float = 1.0
    device: str = ""
    overlap: bool = True
    """Copies run beside the recompute (a GPU's copy engine); False where the runtime runs them one
    after the other (the CPU)."""
    gather_bytes_per_s: float = 0.0
    gather_latency_s: float = 0.0
    """The all-gather joining the tensor-parallel ranks' activation shards, measured on the real
    group at start-up (0: not measured, no shards)."""

    def __post_init__(self) -> None:
        bw = float(self.h2d_bytes_per_s)
        if not bw >= 0:
            raise ValueError(f"h2d_bytes_per_s must be >= 0, got {self.h2d_bytes_per_s}")
        if not (self.copy_latency_s >= 0 and math.isfinite(self.copy_latency_s)):
            raise ValueError(f"copy_latency_s must be finite and >= 0, got {self.copy_latency_s}")
        for name in ("gather_bytes_per_s", "gather_latency_s"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
        if not (self.busy_factor > 0 and math.isfinite(self.busy_factor)):
            raise ValueError(f"busy_factor must be finite and > 0, got {self.busy_factor}")
        points = sorted((int(t), float(s)) for t, s in self.recompute_points)
        if any(t <= 0 or not s >= 0 for t, s in points) or len({t for t, _ in points}) != len(points):
            raise ValueError(f"recompute_points need distinct tokens > 0 and seconds >= 0, got {points}")
        # Noise must never make more tokens look cheaper: keep the curve non-decreasing.
        monotone, worst = [], 0.0
        for t, s in points:
            worst = max(worst, s)
            monotone.append((t, worst))
        object.__setattr__(self, "h2d_bytes_per_s", bw)
        object.__setattr__(self, "recompute_points", tuple(monotone))

    def recompute_seconds(self, tokens: float) -> float:
        """One layer's K+V recompute of `tokens` rows on an idle device."""
        if tokens <= 0:
            return 0.0
        if not self.recompute_points:
            return math.inf
        prev_t, prev_s = 0, 0.0
        for t, s in self.recompute_points:
            if tokens <= t:
                if math.isinf(s):  # not inf - inf
                    return math.inf
                return prev_s + (s - prev_s) * (tokens - prev_t) / (t - prev_t)
            prev_t, prev_s = t, s
        return tokens * prev_s / prev_t

    def through_link(self, bytes_per_s: float, latency_s: float = 0.0) -> Profile:
        """This device's profile for blocks that first cross a slower link (the storage tier's
        reads, measured by `profiler.load_or_measure_storage`): every copy runs at the slower of
        the two rates, so the split recomputes more where the link is slower than the host's."""
        if not (bytes_per_s > 0 and math.isfinite(latency_s) and latency_s >= 0):
            raise ValueError(f"a link needs a positive rate and a latency >= 0, got {bytes_per_s}, {latency_s}")
        return dataclasses.replace(
            self, h2d_bytes_per_s=min(self.h2d_bytes_per_s, bytes_per_s) if self.h2d_bytes_per_s > 0 else 0.0,
            copy_latency_s=max(self.copy_latency_s, latency_s),
        )

    def copy_seconds(self, nbytes: int) -> float:
        """One host->device copy call; nothing to copy costs nothing, even without bandwidth."""
        if nbytes <= 0:
            return 0.0
        if self.h2d_bytes_per_s <= 0:
            return math.inf
        return self.copy_latency_s + nbytes / self.h2d_bytes_per_s

    def gather_seconds(self, nbytes: int) -> float:
        """One all-gather that brings this rank `nbytes` of the other ranks' shards."""
        if nbytes <= 0 or self.gather_bytes_per_s <= 0:
            return 0.0
        return self.gather_latency_s + nbytes / self.gather_bytes_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "h2d_bytes_per_s": self.h2d_bytes_per_s,
            "recompute_points": [list(p) for p in self.recompute_points],
            "copy_latency_s": self.copy_latency_s,
            "busy_factor": self.busy_factor,
            "device": self.device,
            "overlap": self.overlap,
            "gather_bytes_per_s": self.gather_bytes_per_s,
            "gather_latency_s": self.gather_latency_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(
            h2d_bytes_per_s=float(d.get("h2d_bytes_per_s") or 0.0),
            recompute_points=tuple((int(t), float(s)) for t, s in d.get("recompute_points", ())),
            copy_latency_s=float(d.get("copy_latency_s", 0.0)),
            busy_factor=float(d.get("busy_factor", 1.0)),
            device=str(d.get("device", "")),
            overlap=bool(d.get("overlap", True)),
            gather_bytes_per_s=float(d.get("gather_bytes_per_s", 0.0)),
            gather_latency_s=float(d.get("gather_latency_s", 0.0)),
        )


@dataclass(frozen=True)
class RestoreRequest:
    num_blocks: int
    """Blocks this request restores in this step."""
    max_recompute_blocks: int
    """Leading blocks whose activations X are stored: only these can be recomputed."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_recompute_blocks <= self.num_blocks:
            raise ValueError(f"need 0 <= max_recompute_blocks <= num_blocks, got {self}")


def forward_seconds(shape: ModelShape, profile: Profile, tokens: int) -> float:
    """One layer of the step's own forward over `tokens` rows, from the measured projection
    rate (GEMMs only: attention over short contexts is left out)."""
    if tokens <= 0 or shape.forward_ratio == 0:
        return 0.0
    return shape.forward_ratio * profile.recompute_seconds(tokens)


def restore_time(
    shape: ModelShape, profile: Profile, recompute_tokens: int, stream_tokens: int, forward_s: float = 0.0
) -> float:
    """Modelled seconds of one restore step: the exact recurrence over layers (module docstring).

    The recurrence is max-plus linear, so once all state times advance by the same step the
    pipeline is periodic and the remaining layers are added in one go (O(1) after a short
    transient instead of O(L): the planner evaluates this a few dozen times per step).
    """
    t_x = profile.copy_seconds(recompute_tokens * shape.act_bytes_per_token)
    t_kv = profile.copy_seconds(stream_tokens * shape.kv_bytes_per_token)
    t_c = profile.busy_factor * profile.recompute_seconds(recompute_tokens) + profile.gather_seconds(
        recompute_tokens * shape.gather_bytes_per_token
    )
    if math.isinf(t_x + t_kv + t_c + forward_s):
        return math.inf
    if not profile.overlap:  # each layer's copies, then its recompute, then (if any) its forward
        return shape.num_layers * (t_x + t_kv + t_c + forward_s)
    copy_end = rc_prev = rc_prev2 = fw_prev = 0.0  # rc_*: recompute end of layers l-1 and l-2
    for done in range(1, shape.num_layers + 1):
        x_end = max(copy_end, rc_prev2) + t_x
        new_copy = x_end + t_kv
        new_rc = max(fw_prev, x_end) + t_c
        new_fw = max(new_rc, new_copy) + forward_s
        step = new_copy - copy_end
        tol = 1e-12 * step
        if all(abs(d - step) <= tol for d in (new_rc - rc_prev, rc_prev - rc_prev2, new_fw - fw_prev)):
            return new_fw + step * (shape.num_layers - done)
        copy_end, rc_prev2, rc_prev, fw_prev = new_copy, rc_prev, new_rc, new_fw
    return fw_prev


def plan_split(
    shape: ModelShape,
    profile: Profile | None,
    requests: Sequence[RestoreRequest],
    *,
    ratio: float | None = None,
    max_recompute_tokens: int | None = None,
    forward_s: float = 0.0,
) -> list[int]:
    """Recompute blocks per request (a leading run of each request's restored blocks).

    ratio set: round(ratio * num_blocks) per request, clipped to what has X stored and to the
    budget; the profile is not needed. ratio None: the total that minimises `restore_time`
    (with the step's own forward, `forward_s` per layer, when it waits for the restore per layer).
    max_recompute_tokens (staging capacity) caps the total recompute tokens in both modes.
    """
    budget = math.inf if max_recompute_tokens is None else max_recompute_tokens // shape.block_size
    if budget < 0:
        raise ValueError(f"max_recompute_tokens must be >= 0, got {max_recompute_tokens}")
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        wanted = [min(math.floor(ratio * q.num_blocks + 0.5), q.max_recompute_blocks) for q in requests]
        return _fill(wanted, budget)
    if profile is None:
        raise ValueError("auto split (ratio=None) needs a Profile")
    caps = [q.max_recompute_blocks for q in requests]
    max_total = int(min(sum(caps), budget))
    if max_total == 0:
        return [0] * len(requests)
    if profile.h2d_bytes_per_s <= 0:  # nothing can stream: recompute all that is recomputable
        total = max_total if math.isfinite(profile.recompute_seconds(shape.block_size)) else 0
        return _fill(caps, total)
    if shape.act_bytes_per_token >= shape.kv_bytes_per_token:
        # Activations no smaller than K/V (GQA, fp8 caches): recompute cannot move fewer bytes.
        return [0] * len(requests)
    total = _best_total(shape, profile, sum(q.num_blocks for q in requests), max_total, forward_s)
    return _fill(caps, total)


def _fill(wanted: list[int], budget: float) -> list[int]:
    """Grant the wanted blocks in request order until the budget runs out."""
    out = []
    for w in wanted:
        take = int(min(w, budget))
        out.append(take)
        budget -= take
    return out


def _best_total(shape: ModelShape, profile: Profile, num_blocks: int, max_total: int, forward_s: float) -> int:
    """Recompute block count in [0, max_total] with the least modelled time; ties go to fewer.

    Candidates: both ends, the balance point where per-layer copy and recompute times meet (the
    closed form x* = k / (c + k - a) on the matching segment of the recompute curve), and a
    golden-section search over the whole range. 0 is a candidate, so the result is never modelled
    slower than streaming everything.
    """
    bs = shape.block_size
    memo: dict[int, float] = {}

    def cost(r: int) -> float:
        if r not in memo:
            memo[r] = restore_time(shape, profile, r * bs, (num_blocks - r) * bs, forward_s)
        return memo[r]

    balance = _balance_tokens(shape, profile, num_blocks * bs, max_total * bs) / bs
    candidates = {0, max_total, math.floor(balance), math.ceil(balance), _golden_min(cost, 0, max_total)}
    return min(candidates, key=lambda r: (cost(r), r))


def _balance_tokens(shape: ModelShape, profile: Profile, n_tokens: int, max_tokens: int) -> float:
    """Recompute tokens in [0, max_tokens] where a layer's copies and its recompute take equally long.

    Copy time falls (for MHA) and recompute time rises with the recomputed tokens, and both are
    linear between the curve's points, so the crossing is found segment by segment.
    """
    act, kv, bw = shape.act_bytes_per_token, shape.kv_bytes_per_token, profile.h2d_bytes_per_s

    def gap(t: float) -> float:
        copy = 2 * profile.copy_latency_s + (t * act + (n_tokens - t) * kv) / bw
        gather = profile.gather_seconds(round(t * shape.gather_bytes_per_token))
        return copy - profile.busy_factor * profile.recompute_seconds(t) - gather

    edges = [0] + [t for t, _ in profile.recompute_points if t < max_tokens] + [max_tokens]
    lo, g_lo = edges[0], gap(edges[0])
    for hi in edges[1:]:
        g_hi = gap(hi)
        if not math.isfinite(g_hi):
            return lo
        if g_hi <= 0:
            return lo + (hi - lo) * g_lo / (g_lo - g_hi)
        lo, g_lo = hi, g_hi
    return max_tokens


def _golden_min(f: Callable[[int], float], lo: int, hi: int) -> int:
    """Integer golden-section search: exact for unimodal f, a good guess otherwise."""
    shrink = (math.sqrt(5) - 1) / 2
    while hi - lo > 4:  # from 5 on, left < right: the bracket never skips a point
        step = round((hi - lo) * shrink)
        left, right = hi - step, lo + step
        if f(left) <= f(right):
            hi = right
        else:
            lo = left
    return min(range(lo, hi + 1), key=lambda r: (f(r), r))
