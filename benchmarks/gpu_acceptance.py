"""The GPU acceptance run (issue 13): one command that spends a lent GPU's window on measurement.

    source benchmarks/device_env.sh; python3 benchmarks/gpu_acceptance.py     # device call, after the bundle
    python benchmarks/gpu_acceptance.py --smoke                               # CPU build: same code, tiny shapes
    python benchmarks/gpu_acceptance.py --results-md acceptance.json          # its tables again, for RESULTS.md

Three parts in priority order, each in child processes and time-boxed (a part still running at the
end of its budget is stopped and keeps the checks it finished; time a part leaves unused goes to the
next; all stop by --total-s):
  1 correctness  `acceptance_checks.py`: restored K/V equal to the originals (r = 0, n/2, n) under vLLM's
                 defaults for a multi-head (llama2) and a Qwen3 tiny model, prompts shorter and longer than
                 the piecewise CUDA-graph sizes, an fp8 cache, and vLLM's own KV-cache sizing (no
                 kv_cache_memory_bytes); the same greedy tokens as vLLM without the plugin, under forced
                 eviction with asynchronous restores. Engines run side by side.
  2 restore      `restore.py`: vLLM's native OffloadingConnector against the plugin (auto and a sweep of
                 fixed splits) on random-weight MHA-7B and GQA-8B, every block of the prompts pushed to
                 the host; restore time, bytes moved per token, split chosen.
  3 kernel       `kernel.py`: one-pass kernel, cuBLAS + epilogue and the bare GEMM, MHA-7B, T = 4096, 16384.
After every finished check, OUT/acceptance.json and OUT/acceptance.md are rewritten (OUT: --out,
else $OUT, else ./acceptance-out), so a device call cut off at its limit returns what finished. Logs
of every child are in OUT/logs. The verdicts are the targets of issue 13.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
PARTS = ("correctness", "restore", "kernel")
BUDGET_S = {"correctness": 150, "restore": 330, "kernel": 90}
TOTAL_S = 585  # one device call of 600 s, with room to write the report
# The smoke checks that everything runs, on a CPU that may be shared: bounds, not a time box to meet.
SMOKE_BUDGET_S, SMOKE_TOTAL_S = {"correctness": 600, "restore": 600, "kernel": 300}, 1500
GPU_ENGINES = ["llama2:auto:plugin", "llama2:auto:baseline", "qwen3:auto:plugin", "qwen3:auto:baseline",
               "llama2:fp8:plugin", "llama2:auto:plugin-vllm-sized"]
# One process: 2 CPU cores. The vLLM-sized engine runs eager there (the compiled ordering of vLLM 0.34
# is tests/test_capture_order.py's).
SMOKE_ENGINES = ["llama2:auto:plugin,llama2:auto:baseline,llama2:fp8:plugin,llama2:auto:plugin-vllm-sized"]
RATIOS = "auto,0,1,0.5,0.25,0.75"
NATIVE_TARGET = {"mha7b": 0.55, "gqa8b": 1.03}  # plugin auto restore time / native's
SPLIT_SLACK = 1.10  # auto within 10% of the sweep's best
KERNEL_TOKENS = (4096, 16384)
GEMM_SHARE = 0.85  # cuBLAS + epilogue throughput / bare GEMM's
NO_NATIVE_ON_CPU = ("vLLM's native offloading refuses the CPU platform (\"CPU Offloading is currently only "
                    "supported on CUDA-alike and XPU GPUs\"): the plugin's sweep only")


@dataclass
class Job:
    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)


def run_jobs(jobs: list[Job], budget_s: float, parallel: int, logs: Path, progress: Callable[[], None]) -> dict:
    """Runs the jobs, at most `parallel` at a time, each in its own process group (its engines and
    their children go with it); stops all at the deadline. Job name -> how it ended."""
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    pending, running, ended = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            out, err = (open(logs / f"{job.name}.{ext}", "w") for ext in ("out", "err"))
            proc = subprocess.Popen(job.cmd, stdout=out, stderr=err, cwd=ROOT, env={**os.environ, **job.env},
                                    start_new_session=True)
            running[job.name] = (proc, out, err)
        time.sleep(0.5)
        for name, (proc, out, err) in list(running.items()):
            if proc.poll() is not None:
                ended[name] = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
                out.close(), err.close()
                del running[name]
                progress()
        if time.monotonic() > deadline:
            for name, (proc, out, err) in running.items():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                out.close(), err.close()
                ended[name] = "stopped at the time budget"
            ended.update({job.name: "not started: time budget spent" for job in pending})
            pending, running = [], {}
    progress()
    return ended


def result_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln[7:]) for ln in path.read_text(errors="replace").splitlines() if ln.startswith("RESULT ")]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return None


# ------------------------------------------------------------------------------------------ parts
def correctness_summary(results: list[dict], engines: list[str]) -> dict:
    """Checks per engine; the plugin's conversation tokens against the baseline engine's."""
    checks, tokens = [], {}
    for r in results:
        if r["check"] == "eviction":
            tokens[r["engine"]] = r.pop("tokens")
        checks.append(r)
    for r in checks:
        arch, kv_dtype, role = r["engine"].split(":")
        if r["check"] == "eviction" and role.startswith("plugin"):
            base = tokens.get(f"{arch}:{kv_dtype}:baseline")
            mine = tokens[r["engine"]]
            r["same_tokens_as_baseline"] = None if base is None else mine == base
            r["turns_equal"] = None if base is None else f"{sum(a == b for a, b in zip(mine, base))}/{len(base)}"
            r["ok"] = None if base is None else bool(r.get("ok")) and mine == base  # None: baseline not done
    finished = {r["engine"] for r in checks if r["check"] in ("eviction", "skipped", "error")} | {
        r["engine"] for r in checks if r["check"] == "kv_detects_corruption" and ":fp8:" in r["engine"]}
    failed = [r for r in checks if r.get("ok") is False]
    missing = [e for e in engines if e not in finished]
    status = "fail" if failed else "incomplete" if missing else "pass"
    return {"status": status, "checks": checks, "unfinished_engines": missing}


def restore_summary(data: dict | None, smoke: bool) -> dict:
    """Per shape and system: host-hit turn, restore time (host hit minus GPU hit), bytes per restored
    token, split; verdicts against native offloading and against the sweep's best split."""
    rows, verdicts, notes = [], [], [NO_NATIVE_ON_CPU] if smoke else []
    results = (data or {}).get("results", [])
    for shape in dict.fromkeys(r["shape"] for r in results):
        native = next((r for r in results if r["shape"] == shape and r["system"] == "native"), None)
        partial = next((r for r in results if r["shape"] == shape and r["system"] == "partial"), None)
        base = None
        if native:
            restore = native["cpu_hit_s"] - native["gpu_hit_s"]
            base = restore if restore > 0 else None  # a restore faster than a GPU hit is noise: no ratio
            rows.append({"shape": shape, "system": "native", "split": "-", "turn_s": native["cpu_hit_s"],
                         "gpu_hit_s": native["gpu_hit_s"], "restore_s": restore, "vs_native": 1.0,
                         "bytes_per_token": native["kv_bytes_per_token"], "recomputed": 0.0})
        sweep = (partial or {}).get("sweep", [])
        for e in sweep:
            restore = e["cpu_hit_s"] - partial["gpu_hit_s"]
            rows.append({"shape": shape, "system": "plugin", "split": e["ratio"], "turn_s": e["cpu_hit_s"],
                         "gpu_hit_s": partial["gpu_hit_s"], "restore_s": restore,
                         "vs_native": restore / base if base else None,
                         "bytes_per_token": e.get("bytes_per_token"), "recomputed": e["recompute_fraction"]})
        auto = next((r for r in rows if r["shape"] == shape and r["split"] == "auto"), None)
        fixed = [r["restore_s"] for r in rows
                 if r["shape"] == shape and r["system"] == "plugin" and r["split"] != "auto"]
        if shape in NATIVE_TARGET:
            limit = NATIVE_TARGET[shape]
            value = auto and auto["vs_native"]
            verdicts.append(_verdict(f"{shape}: plugin (auto) restore time / native's", value, f"<= {limit}",
                                     value is not None and value <= limit))
        if auto and fixed and min(fixed) > 0:
            value = auto["restore_s"] / min(fixed)
            verdicts.append(_verdict(f"{shape}: planner's split (r/n = {auto['recomputed']:.2f}) restore time / "
                                     "the sweep's best", value, f"<= {SPLIT_SLACK}", value <= SPLIT_SLACK))
    return {"rows": rows, "verdicts": verdicts, "notes": notes, "device": (data or {}).get("device")}


def kernel_summary(data: dict | None) -> dict:
    rows = [{k: r[k] for k in ("shape", "T", "fused_ms", "mode", "one_pass_ms", "split_ms", "gemm_ms", "config")}
            for r in (data or {}).get("rows", [])]
    verdicts = []
    for r in rows:
        r["epilogue_share_of_gemm"] = r["gemm_ms"] / r["split_ms"]
        r["one_pass_share_of_gemm"] = r["gemm_ms"] / r["one_pass_ms"]
        if r["T"] >= 4096:
            verdicts.append(_verdict(f"{r['shape']} T={r['T']}: cuBLAS + epilogue throughput / bare GEMM's",
                                     r["epilogue_share_of_gemm"], f">= {GEMM_SHARE}",
                                     r["epilogue_share_of_gemm"] >= GEMM_SHARE))
    return {"rows": rows, "verdicts": verdicts, "device": (data or {}).get("meta", {}).get("device")}


def _verdict(target: str, value: float | None, limit: str, ok: bool) -> dict:
    return {"target": target, "value": None if value is None else round(value, 3), "limit": limit,
            "pass": bool(ok) if value is not None else None}


# ----------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    """The tables for benchmarks/RESULTS.md."""
    lines = [f"Command: `{report['command']}`", "",
             f"Machine: {report['device']}; torch {report['torch']}, Triton {report['triton']}, vLLM {report['vllm']}; "
             f"{report['started']}" + (" (smoke run on the CPU: not a measurement)" if report["smoke"] else ""), "",
             "| part | status | budget s | wall s |", "|---|---|---:|---:|"]
    parts = report["parts"]
    for name in PARTS:
        if name in parts:
            p = parts[name]
            lines.append(f"| {name} | {p['status']} | {p['budget_s']} | {p.get('wall_s', '-')} |")
    verdicts = [v for name in PARTS for v in parts.get(name, {}).get("verdicts", [])]
    if verdicts:
        lines += ["", "| target | value | limit | verdict |", "|---|---:|---|---|"]
        lines += [f"| {v['target']} | {_num(v['value'])} | {v['limit']} | "
                  f"{ {True: 'pass', False: '**miss**', None: 'not measured'}[v['pass']] } |" for v in verdicts]
    if "correctness" in parts:
        p = parts["correctness"]
        lines += ["", "Correctness (r = recomputed share; K/V error relative to the originals):", "",
                  "| engine | check | detail | ok |", "|---|---|---|---|"]
        for c in p.get("checks", []):
            lines.append(f"| {c['engine']} | {c['check']} | {_detail(c)} | {c.get('ok', '-')} |")
        if p.get("unfinished_engines"):
            lines.append(f"\nUnfinished: {', '.join(p['unfinished_engines'])}")
    if "restore" in parts:
        p = parts["restore"]
        lines += ["", "Restore of every prompt block from the host (restore = host-hit turn minus GPU-hit turn):", "",
                  "| shape | system | split | host-hit turn s | GPU-hit turn s | restore s | vs native | "
                  "bytes/token | recomputed |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in p.get("rows", []):
            lines.append(f"| {r['shape']} | {r['system']} | {r['split']} | {r['turn_s']:.3f} | {r['gpu_hit_s']:.3f} | "
                         f"{r['restore_s']:.3f} | {_num(r['vs_native'], 'x')} | {_num(r['bytes_per_token'], '', 0)} | "
                         f"{r['recomputed']:.2f} |")
        lines += [f"\n{n}" for n in p.get("notes", [])]
    if "kernel" in parts:
        lines += ["", "| shape | T | pick ms | way | one-pass ms | cuBLAS+epilogue ms | GEMM ms | epilogue way / GEMM "
                  "| one-pass / GEMM | tile |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in parts["kernel"].get("rows", []):
            lines.append(f"| {r['shape']} | {r['T']} | {r['fused_ms']:.3f} | {r['mode']} | {r['one_pass_ms']:.3f} | "
                         f"{r['split_ms']:.3f} | {r['gemm_ms']:.3f} | {r['epilogue_share_of_gemm']:.2f} | "
                         f"{r['one_pass_share_of_gemm']:.2f} | {r['config']} |")
    for name in PARTS:
        if parts.get(name, {}).get("jobs"):
            failed = {j: e for j, e in parts[name]["jobs"].items() if e != "ok"}
            if failed:
                lines.append(f"\n{name}: " + "; ".join(f"{j}: {e}" for j, e in failed.items()) + " (logs in OUT/logs)")
    return "\n".join(lines) + "\n"


def _num(value: float | None, unit: str = "", digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _detail(c: dict) -> str:
    if c["check"] == "kv":
        where = "above" if c["above_capture"] else "within"
        return (f"{c['prompt']} prompt ({c['tokens']} tokens, {where} graph sizes),"
                f" r = {c['recomputed_blocks']}/{c['blocks']}, error {c['rel_err']:.1e} (tol {c['tol']}),"
                f" same tokens {c['same_tokens']}, async {c['asynchronous']}")
    if c["check"] == "engine":
        sized = ("KV cache sized by vLLM" + (" (extensible)" if c.get("extensible_kv_cache") else "")
                 if c.get("sized_by_vllm") else "KV cache set")
        return (f"{c['dtype']}, cache {c['kv_cache_dtype']}, block {c['block_size']}, eager {c['enforce_eager']}, "
                f"graphs {c['cudagraph_mode']} up to {c['max_capture_size']}, {sized}: {c.get('num_gpu_blocks')} "
                f"blocks, start {c['startup_s']} s")
    if c["check"] == "eviction":
        moved = (f", {c['tokens_recomputed']}/{c['tokens_loaded']} restored tokens recomputed"
                 if "tokens_loaded" in c else "")
        same = f", turns equal to baseline {c['turns_equal']}" if "turns_equal" in c else ""
        return f"{c['seconds']} s{moved}{same}"
    return ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("engine", "check", "ok"))


def save(out: Path, report: dict) -> None:
    """Both files, replaced whole: a device call cut off mid-write still returns the previous ones."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("acceptance.json", json.dumps(report, indent=1)), ("acceptance.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def environment(smoke: bool) -> dict:
    import torch

    def version(module: str) -> str:
        try:
            return __import__(module).__version__
        except Exception as exc:  # e.g. Triton absent from a CPU venv
            return f"not importable ({type(exc).__name__})"

    device = f"CPU {platform.machine()}"
    if torch.cuda.is_available():  # nvidia-smi: the engines get the whole GPU (no CUDA context here)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        device = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "a CUDA GPU"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"device": device, "torch": torch.__version__, "triton": version("triton"), "vllm": version("vllm"),
            "plugin_commit": commit.stdout.strip() or "unknown", "smoke": smoke,
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def results_name(report: dict) -> str:
    """benchmarks/results/acceptance-<gpu>-<date>.json"""
    gpu = re.search(r"\b([A-Z]\d{2,4})\b", report["device"])
    return f"acceptance-{gpu.group(1).lower() if gpu else 'cpu'}-{report['started'][:10]}.json"


# ------------------------------------------------------------------------------------------- plans
# Each part: the jobs it runs, how many at once, and how to read their results so far.
Plan = tuple[list[Job], int, Callable[[], dict]]


@dataclass
class Run:
    args: argparse.Namespace
    env: dict[str, str]  # of every child
    out: Path
    logs: Path
    scratch: Path  # compile caches: not under OUT, which travels back
    tiny: Callable[[str], Path]  # a tiny model by arch, built once


def plan_correctness(run: Run, budget: float) -> Plan:
    import torch

    engines = SMOKE_ENGINES if run.args.smoke else GPU_ENGINES
    names = [e for spec in engines for e in spec.split(",")]
    for arch in sorted({e.split(":")[0] for e in names}):
        run.tiny(arch)
    models = run.tiny("llama2").parent
    jobs = [Job(spec.replace(":", "-").replace(",", "+"),
                [sys.executable, str(HERE / "acceptance_checks.py"), "--models-dir", str(models), "--engines", spec]
                + (["--conversations", "3", "--turns", "2"] if run.args.smoke else []),
                {**run.env, "VLLM_CACHE_ROOT": str(run.scratch / spec.replace(":", "-")),  # no graph of another engine
                 "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 1) // len(engines)))})
            for spec in engines]
    parallel = run.args.jobs or (len(jobs) if torch.cuda.is_available() else 1)
    return jobs, parallel, lambda: correctness_summary(
        [r for job in jobs for r in result_lines(run.logs / f"{job.name}.out")], names)


def plan_restore(run: Run, budget: float) -> Plan:
    result = run.out / "restore.json"
    cmd = [sys.executable, str(HERE / "restore.py"), "--out", str(result), "--ratios", RATIOS,
           "--budget-s", str(budget - 10)]
    if run.args.smoke:
        print(f"   native offloading skipped: {NO_NATIVE_ON_CPU}", flush=True)
        cmd += ["--smoke", "--eager", "--model", str(run.tiny("llama2"))]
    else:
        cmd += ["--shapes", "mha7b,gqa8b", "--seqs", str(run.args.restore_seqs),
                "--tokens", str(run.args.restore_tokens)]
        cmd += [] if run.args.restore_compiled else ["--eager"]
    return [Job("restore", cmd, run.env)], 1, lambda: restore_summary(read_json(result), run.args.smoke)


def plan_kernel(run: Run, budget: float) -> Plan:
    result = run.out / "kernel.json"
    cmd = [sys.executable, str(HERE / "kernel.py"), "--out", str(result)] + (
        ["--smoke"] if run.args.smoke else ["--shapes", "MHA-7B", "--tokens", *map(str, KERNEL_TOKENS)])
    return [Job("kernel", cmd, run.env)], 1, lambda: kernel_summary(read_json(result))


PLANS = {"correctness": plan_correctness, "restore": plan_restore, "kernel": plan_kernel}


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "acceptance-out"))
    p.add_argument("--parts", default=",".join(PARTS), help="e.g. restore,kernel to re-run what failed")
    for name, seconds in BUDGET_S.items():
        p.add_argument(f"--budget-{name}", type=float,
                       help=f"seconds (default {seconds}; with --smoke {SMOKE_BUDGET_S[name]})")
    p.add_argument("--total-s", type=float,
                   help=f"all parts together, a part gets at most what is left (default {TOTAL_S}; "
                        f"with --smoke {SMOKE_TOTAL_S})")
    p.add_argument("--jobs", type=int, help="correctness engines side by side (default: all on a GPU, 1 on a CPU)")
    p.add_argument("--restore-seqs", type=int, default=4, help="requests of --restore-tokens each")
    p.add_argument("--restore-tokens", type=int, default=8192)
    p.add_argument("--restore-compiled", action="store_true",
                   help="restore engines with torch.compile and CUDA graphs (about 30 s more start-up each)")
    p.add_argument("--models-dir", type=Path, help="tiny models by arch (built where missing)")
    p.add_argument("--smoke", action="store_true", help="CPU build, tiny shapes: that the run works, not numbers")
    p.add_argument("--results-md", type=Path, metavar="JSON", help="print the tables of a saved acceptance.json")
    args = p.parse_args()
    started = time.monotonic()
    for name in PARTS:
        if getattr(args, f"budget_{name}") is None:
            setattr(args, f"budget_{name}", (SMOKE_BUDGET_S if args.smoke else BUDGET_S)[name])
    args.total_s = args.total_s or (SMOKE_TOTAL_S if args.smoke else TOTAL_S)
    if args.results_md:
        print(markdown(json.loads(args.results_md.read_text())), end="")
        return

    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("error: the acceptance run needs a GPU; --smoke runs the same code on the CPU")
    parts = [x for x in args.parts.split(",") if x]
    if unknown := set(parts) - set(PARTS):
        sys.exit(f"error: unknown --parts {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    out, logs = args.out.resolve(), args.out.resolve() / "logs"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if args.smoke:  # Triton runs in its interpreter without a GPU; one OpenMP thread (conftest's reasons)
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    report = {"command": " ".join(["python3", "benchmarks/gpu_acceptance.py", *sys.argv[1:]]),
              **environment(args.smoke), "parts": {}}
    save(out, report)
    models = args.models_dir or Path(tempfile.mkdtemp(prefix="acceptance-models-"))

    def tiny(arch: str) -> Path:
        if not (models / arch).exists():
            from vllm_partial_kv.tiny_models import make_tiny_model

            make_tiny_model(models / arch, arch)
        return models / arch

    run = Run(args, env, out, logs, Path(tempfile.mkdtemp(prefix="acceptance-")), tiny)
    print(f"acceptance run on {report['device']}: parts {', '.join(parts)}; writing {out}/acceptance.json", flush=True)
    spare = 0.0  # time an earlier part left unused goes to the next one
    for i, name in enumerate(parts):
        later = sum(getattr(args, f"budget_{n}") for n in parts[i + 1:])
        budget = min(getattr(args, f"budget_{name}") + spare, args.total_s - (time.monotonic() - started) - later)
        if budget < 10:
            report["parts"][name] = {"status": "not run: --total-s spent", "budget_s": 0}
            save(out, report)
            print(f"== {name}: not run, --total-s spent", flush=True)
            continue
        print(f"== {name}: budget {budget:.0f} s", flush=True)
        t0 = time.monotonic()
        part = report["parts"][name] = {"status": "running", "budget_s": budget}
        jobs, parallel, summarize = PLANS[name](run, budget)

        def progress() -> None:
            part.update(summarize())
            save(out, report)

        part["jobs"] = run_jobs(jobs, budget - (time.monotonic() - t0), parallel, logs, progress)
        part["wall_s"] = round(time.monotonic() - t0, 1)
        spare = max(0.0, budget - part["wall_s"])
        crashed = any(e.startswith("exit") for e in part["jobs"].values())
        if name == "correctness":
            part["status"] = "fail" if part["status"] == "incomplete" and crashed else part["status"]
        else:  # a smoke run's timings are no measurement: its verdicts only show that they compute
            verdicts = [] if args.smoke else [v["pass"] for v in part.get("verdicts", [])]
            part["status"] = ("fail" if False in verdicts or crashed else "no result" if not part.get("rows") else
                              "incomplete" if None in verdicts or set(part["jobs"].values()) != {"ok"} else "pass")
        save(out, report)
        print(f"== {name}: {part['status']} in {part['wall_s']} s ({json.dumps(part['jobs'])})", flush=True)
    print(markdown(report))
    print(f"wrote {out}/acceptance.json and acceptance.md; keep it as benchmarks/results/{results_name(report)}")


if __name__ == "__main__":
    main()
