"""patches/: `--kv-offload partial-recompute` on a patched copy of the installed vLLM, and each
supported release's patch applying to that release's own files without fuzz or offset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCHED = ("config/cache.py", "config/vllm.py", "engine/arg_utils.py")
RELEASES = ("0.26.0", "0.32.0", "0.33.0", "0.34.0")
needs_patch = pytest.mark.skipif(shutil.which("patch") is None, reason="needs the patch tool")


@needs_patch
@pytest.mark.once  # each release's files come from its wheel, not the installed vLLM
@pytest.mark.parametrize("release", RELEASES)
def test_patch_applies_without_fuzz_or_offset(release):
    """The release's files from its wheel (downloaded once into the wheel cache), or the installed
    vLLM when it is that release."""
    from vllm_partial_kv import compat, touchpoints

    import vllm

    installed = compat.vllm_version().release[:2] == tuple(int(p) for p in release.split(".")[:2])
    source = touchpoints.Source(Path(vllm.__file__).parent if installed else touchpoints.fetch_wheel(release))
    assert source.version[:2] == tuple(int(p) for p in release.split(".")[:2])
    patch = touchpoints.patch_for(source.version)
    assert patch is not None and patch.name == f"vllm-{release.rsplit('.', 1)[0]}.patch"
    files = {path: source.text(path) for path in touchpoints.patch_targets(patch)}
    assert sorted(files) == sorted(f"vllm/{rel}" for rel in PATCHED)
    applies, out = touchpoints.dry_run(patch, files)
    assert applies and "offset" not in out and "fuzz" not in out, out

CHECK = textwrap.dedent(
    """
    import json, sys
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", sys.argv[1], "--kv-offload", "partial-recompute",
                              "--kv-offloading-size", "0.5", "--max-model-len", "1024",
                              "--kv-cache-memory-bytes", str(32 << 20), "--block-size", "32"])
    cfg = EngineArgs.from_cli_args(args).create_engine_config()
    kv = cfg.kv_transfer_config
    print("RESULT " + json.dumps({"backend": args.kv_offloading_backend, "connector": kv.kv_connector,
          "module": kv.kv_connector_module_path, "extra": kv.kv_connector_extra_config}))
    """
)


@needs_patch
def test_patch_adds_kv_offload_flag(tmp_path, tiny_model):
    import vllm

    site = tmp_path / "site"
    # A symlink copy of the installed vLLM; only the patched files become real files.
    shutil.copytree(Path(vllm.__file__).parent, site / "vllm", symlinks=True,
                    copy_function=os.symlink, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in PATCHED:
        target = site / "vllm" / rel
        real = target.resolve()
        target.unlink()
        shutil.copyfile(real, target)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    applied = subprocess.run(["bash", str(ROOT / "patches" / "apply.sh"), sys.executable], env=env,
                             capture_output=True, text=True, timeout=300)
    minor = ".".join(vllm.__version__.split(".")[:2])
    assert applied.returncode == 0 and f"with vllm-{minor}.patch" in applied.stdout, applied.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", CHECK, str(tiny_model("llama2"))],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][7:])
    assert result["backend"] == "partial-recompute"
    assert result["connector"] == "PartialRecomputeConnector"
    assert result["module"] == "vllm_partial_kv.connector"
    assert result["extra"]["cpu_bytes"] == 1 << 29
