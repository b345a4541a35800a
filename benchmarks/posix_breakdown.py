"""Where a chunk's time goes on the POSIX path: each step of store and retrieve.

Part 1 times each step alone: one Llama-8B-shaped 256-token chunk (32 MiB of bf16) per step,
repeated, single thread: host-memory steps (allocation with first touch, copies, xxh3) next to the
O_DIRECT write and read they accompany.

Part 2 runs ``GDSCache.store`` and a cold ``retrieve`` of the same chunks as ``gdscache bench`` does
(raw codec, 8 I/O threads) and times every system call and checksum inside them: milliseconds per
chunk summed over threads, next to each phase's wall time. A step on many threads at once (the
writes) overlaps; one that grows here while the wall time grows is what the sequential raw file
does not pay. Explains the gap between `gdscache bench` and its raw ceiling on a given machine.

    python benchmarks/posix_breakdown.py --path DIR [--chunks 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import types
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import gdscache.tiers.local as local_tier
import io_backends.posix as posix_module
from gdscache import GDSCache
from gdscache.bench.data import kv_buffer, synthetic_kv
from gdscache.bench.models import resolve_model
from gdscache.codecs import get_codec
from gdscache.format import checksum
from gdscache.spec import KVSpec
from io_backends.base import Part
from io_backends.buffers import aligned_empty
from io_backends.posix import PosixBackend

CHUNK = 256
TRACED = ("open", "pwrite", "pwritev", "fsync", "fdatasync", "posix_fallocate", "close", "rename", "stat",
          "utime", "preadv", "makedirs")


def _rate(fn: Callable[[int], None], n: int, nbytes: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n * nbytes / (time.perf_counter() - start) / 1e9


class _Steps:
    """Seconds spent in each traced call, summed over threads."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                with self._lock:
                    self.seconds[name] += took
                    self.calls[name] += 1
        return timed


@contextlib.contextmanager
def _traced(steps: _Steps) -> Iterator[None]:
    """Time the ``os`` calls of the POSIX backend and the local tier, and every xxh3 pass."""
    proxy = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    for name in TRACED:
        if hasattr(os, name):
            setattr(proxy, name, steps.wrap(name, getattr(os, name)))
    hashing = "_update" if hasattr(checksum, "_update") else "xxh3_digest"
    saved = [(posix_module, "os", posix_module.os), (local_tier, "os", local_tier.os),
             (checksum, hashing, getattr(checksum, hashing))]
    posix_module.os = local_tier.os = proxy
    setattr(checksum, hashing, steps.wrap("xxh3", getattr(checksum, hashing)))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _cache_steps(path: str, kv: torch.Tensor, requests: int, threads: int) -> dict[str, dict[str, float]]:
    """ms per chunk of each traced step in store and cold retrieve through GDSCache, and each phase's wall ms per chunk."""
    tokens = kv.shape[2]
    prompts = [np.random.default_rng(i).integers(0, 1 << 31, size=tokens, dtype=np.int64) for i in range(requests)]
    out = kv_buffer(KVSpec.of(kv), tokens, kv.device)
    chunks = requests * (tokens // CHUNK)
    table: dict[str, dict[str, float]] = {}
    with GDSCache(path=path, chunk_size=CHUNK, model_id="posix-breakdown", storage="posix", codec="raw",
                  io_threads=threads) as cache:
        for phase in ("store", "retrieve cold"):
            steps = _Steps()
            if phase == "retrieve cold":
                dropper = PosixBackend(threads=1)
                for dirpath, _, names in os.walk(path):
                    for name in names:
                        if name.endswith(".gdc"):
                            dropper.drop_page_cache(os.path.join(dirpath, name))
                dropper.close()
            with _traced(steps):
                start = time.perf_counter()
                for p in prompts:
                    done = cache.store(p, kv) if phase == "store" else cache.retrieve(p, out)
                    if done != tokens:
                        raise RuntimeError(f"{phase} handled {done} of {tokens} tokens")
                wall = time.perf_counter() - start
            table[phase] = {"wall": 1e3 * wall / chunks,
                            **{name: 1e3 * sec / chunks for name, sec in sorted(steps.seconds.items())}}
    if not torch.equal(out, kv):
        raise RuntimeError("retrieve returned different bytes")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", required=True)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2, help="4096-token requests in part 2")
    ap.add_argument("--threads", type=int, default=8, help="I/O threads in part 2")
    ap.add_argument("--json")
    args = ap.parse_args()
    spec = resolve_model("llama-8b").kv_spec(torch.bfloat16)
    n = args.chunks
    kv = synthetic_kv(spec, n * CHUNK, torch.device("cpu"))
    nbytes = spec.bytes_per_token() * CHUNK
    codec = get_codec("raw")
    root = tempfile.mkdtemp(prefix="posix-breakdown-", dir=args.path)
    backend = PosixBackend(threads=1, o_direct="auto")
    try:
        payloads = [codec.encode(kv[:, :, i * CHUNK : (i + 1) * CHUNK]) for i in range(n)]
        aligned = aligned_empty(nbytes)
        aligned.copy_(payloads[0])
        reused = aligned_empty(nbytes)
        reused.fill_(0)
        out = torch.zeros_like(kv)  # touched: decode timing excludes first-touch page faults
        paths = [os.path.join(root, f"c{i}.bin") for i in range(n)]
        rows = {
            "alloc + first touch (fresh 32 MiB)": _rate(lambda i: aligned_empty(nbytes).fill_(0), n, nbytes),
            "memcpy into a touched buffer": _rate(lambda i: reused.copy_(payloads[i]), n, nbytes),
            "encode raw: strided KV slice -> new payload": _rate(
                lambda i: codec.encode(kv[:, :, i * CHUNK : (i + 1) * CHUNK]), n, nbytes),
            "checksum xxh3_64": _rate(lambda i: checksum.digest(payloads[i], checksum.XXH3_64), n, nbytes),
            "write_file, unaligned payload (bounce copy) + fsync": _rate(
                lambda i: backend.write_file(paths[i], [Part(0, payloads[i])]), n, nbytes),
        }
        for p in paths:
            os.unlink(p)
        rows["write_file, page-aligned payload + fsync"] = _rate(
            lambda i: backend.write_file(paths[i], [Part(0, aligned)]), n, nbytes)
        for p in paths:
            backend.drop_page_cache(p)

        def read_fresh(i: int) -> None:
            with backend.open_read(paths[i]) as h:
                h.read_into(aligned_empty(nbytes), 0)

        def read_reused(i: int) -> None:
            with backend.open_read(paths[i]) as h:
                h.read_into(reused, 0)

        rows["read cold into a fresh buffer"] = _rate(read_fresh, n, nbytes)
        for p in paths:
            backend.drop_page_cache(p)
        rows["read cold into a reused buffer"] = _rate(read_reused, n, nbytes)
        rows["decode raw: payload -> strided KV slice"] = _rate(
            lambda i: codec.decode(payloads[i], spec, CHUNK, out[:, :, i * CHUNK : (i + 1) * CHUNK]), n, nbytes)
        steps = _cache_steps(os.path.join(root, "cache"), synthetic_kv(spec, 4096, torch.device("cpu")),
                             args.requests, args.threads)
        meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": socket.gethostname(),
                "io_mode": backend.io_mode, "chunks": n, "chunk_bytes": nbytes, "load_average": os.getloadavg(),
                "torch_threads": torch.get_num_threads(), "cache_requests": args.requests, "cache_threads": args.threads}
    finally:
        backend.close()
        shutil.rmtree(root, ignore_errors=True)
    table = Table(title=f"one 256-token Llama-8B chunk (32 MiB), {n} times, single thread ({meta['io_mode']})")
    table.add_column("step")
    table.add_column("GB/s", justify="right")
    for name, gbps in rows.items():
        table.add_row(name, f"{gbps:.2f}")
    console = Console(width=120)
    console.print(table)
    per_chunk = Table(title=f"inside GDSCache: ms per chunk, summed over {args.threads} I/O threads "
                            f"({args.requests} x 4096 tokens)")
    per_chunk.add_column("step")
    for phase in steps:
        per_chunk.add_column(phase, justify="right")
    names = ["wall"] + sorted({name for phase in steps.values() for name in phase} - {"wall"})
    for name in names:
        per_chunk.add_row(name + (" (phase, per chunk)" if name == "wall" else ""),
                          *[f"{phase[name]:.2f}" if name in phase else "" for phase in steps.values()])
    console.print(per_chunk)
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "gbps": rows, "cache_ms_per_chunk": steps}, f, indent=2)


if __name__ == "__main__":
    main()
