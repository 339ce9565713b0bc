"""Store and restore throughput through the storage tier (storage.StorageIO: header, CRC-32, atomic
rename, I/O threads) against a plain sequential write and read of the same bytes in the same
directory, measured in the same run.

    python benchmarks/storage.py --dir /path/on/the/disk [--block-mib 2] [--total-mib 512]

Both sides write `total` bytes as block files and read them back; the page cache is dropped for
the files before each read pass where the kernel allows it (posix_fadvise), so reads come from the
device as far as the filesystem lets them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time

import torch

from vllm_partial_kv import storage


def _drop(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def plain(root: str, block: bytes, n: int) -> tuple[float, float]:
    """One file after another, written then read with plain write()/readinto()."""
    os.makedirs(root, exist_ok=True)
    paths = [os.path.join(root, f"{i}.bin") for i in range(n)]
    t = time.perf_counter()
    for p in paths:
        with open(p, "wb") as f:
            f.write(block)
    write = time.perf_counter() - t
    _drop(paths)
    buf = bytearray(len(block))
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            f.readinto(buf)
    read = time.perf_counter() - t
    return n * len(block) / write, n * len(block) / read


def tier(root: str, block_bytes: int, n: int, threads: int) -> tuple[float, float]:
    """The tier's writes from host slots and verified reads into host slots."""
    slots = 64
    src = torch.randint(0, 256, (slots, block_bytes), dtype=torch.uint8)
    dst = torch.empty(slots, block_bytes, dtype=torch.uint8)
    key = storage.identity_key({"benchmark": True})

    def segs(buf):
        return lambda slot, kv, act: storage.slot_segments(buf, [buf.view(slots, block_bytes)] * kv, slot)

    writer = storage.StorageIO(root, key, segs(src.view(-1)), threads)
    t = time.perf_counter()
    futures = [writer.write(i.to_bytes(32, "little"), i % slots, True, False) for i in range(n)]
    for f in futures:
        f.result()
    write = time.perf_counter() - t
    writer.close()
    _drop([storage.block_path(root, key, i.to_bytes(32, "little"), False) for i in range(n)])
    reader = storage.StorageIO(root, key, segs(dst.view(-1)), threads)
    t = time.perf_counter()
    results = [reader.read(i.to_bytes(32, "little"), i % slots, True, False) for i in range(n)]
    assert all(r.result() for r in results)
    read = time.perf_counter() - t
    reader.close()
    return n * block_bytes / write, n * block_bytes / read


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--block-mib", type=float, default=2.0)
    ap.add_argument("--total-mib", type=int, default=512)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    block = int(args.block_mib * 2**20)
    n = args.total_mib * 2**20 // block
    payload = os.urandom(block)
    rows = []
    for r in range(args.repeats):
        base = os.path.join(args.dir, f"bench-{os.getpid()}-{r}")
        pw, pr = plain(base + "-plain", payload, n)
        tw, tr = tier(base + "-tier", block, n, args.threads)
        shutil.rmtree(base + "-plain")
        shutil.rmtree(base + "-tier")
        rows.append((pw, pr, tw, tr))
    med = [sorted(c)[len(c) // 2] for c in zip(*rows)]
    pw, pr, tw, tr = med
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"dir {args.dir}; {n} blocks of {args.block_mib} MiB, {args.threads} I/O threads, median of {args.repeats}")
    print(f"write: plain {pw / 1e9:.2f} GB/s, tier {tw / 1e9:.2f} GB/s, ratio {tw / pw:.2f}")
    print(f"read:  plain {pr / 1e9:.2f} GB/s, tier {tr / 1e9:.2f} GB/s (verified), ratio {tr / pr:.2f}")


if __name__ == "__main__":
    main()
