"""Where a chunk's time goes on the POSIX path: each step of store and retrieve, timed alone.

One Llama-8B-shaped 256-token chunk (32 MiB of bf16) per step, repeated, in one process:
host-memory steps (allocation with first touch, copies, xxh3) next to the O_DIRECT write and read
they accompany. Explains the gap between `gdscache bench` and its raw ceiling on a given machine.

    python benchmarks/posix_breakdown.py --path DIR [--chunks 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from gdscache.bench.data import synthetic_kv
from gdscache.bench.models import resolve_model
from gdscache.codecs import get_codec
from gdscache.format import checksum
from io_backends.base import Part
from io_backends.buffers import aligned_empty
from io_backends.posix import PosixBackend

CHUNK = 256


def _rate(fn: Callable[[int], None], n: int, nbytes: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n * nbytes / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", required=True)
    ap.add_argument("--chunks", type=int, default=16)
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
        meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": socket.gethostname(),
                "io_mode": backend.io_mode, "chunks": n, "chunk_bytes": nbytes, "load_average": os.getloadavg(),
                "torch_threads": torch.get_num_threads()}
    finally:
        backend.close()
        shutil.rmtree(root, ignore_errors=True)
    table = Table(title=f"one 256-token Llama-8B chunk (32 MiB), {n} times, single thread ({meta['io_mode']})")
    table.add_column("step")
    table.add_column("GB/s", justify="right")
    for name, gbps in rows.items():
        table.add_row(name, f"{gbps:.2f}")
    Console(width=120).print(table)
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "gbps": rows}, f, indent=2)


if __name__ == "__main__":
    main()
