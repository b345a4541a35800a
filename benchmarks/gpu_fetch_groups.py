"""How many chunks one I/O task should store and fetch on the GPU (issue 3): group size x I/O threads.

For each group size (``gdscache.api.GROUP_BYTES`` set to that many chunks) the same bytes are stored through
GDSCache (durable, the files of a group written and synced together), then retrieved page-cache-warm a few
times with 1, 4, 8 ... I/O threads. Reported per cell: GB/s (median of the passes) and the time spent inside the
fetch tasks, summed over threads, which shows how much of a retrieve is waiting between tasks.

    python benchmarks/gpu_fetch_groups.py --shape 16,1,64 --groups 1,8,128 --threads 1,8   # 1 MiB chunks
    python benchmarks/gpu_fetch_groups.py --shape 32,8,128 --groups 1,2,4,8 --threads 8,16  # 32 MiB chunks
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gdscache import GDSCache, api

CHUNK = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=".bench/fetch_groups")
    parser.add_argument("--shape", default="16,1,64", help="layers,kv_heads,head_dim (bf16, 256-token chunks)")
    parser.add_argument("--request-chunks", type=int, default=128, help="chunks per store/retrieve call")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--groups", default="1,8,32,128", help="chunks per I/O task")
    parser.add_argument("--threads", default="1,4,8", help="io_threads values")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    layers, heads, dim = (int(x) for x in args.shape.split(","))
    per_req = args.request_chunks * CHUNK
    kv = torch.randn(layers, 2, args.requests * per_req, heads, dim, dtype=torch.bfloat16, device="cuda")
    tokens = np.arange(kv.shape[2], dtype=np.int64) + 5
    nbytes = kv.numel() * kv.element_size()
    chunk_bytes = nbytes // (args.requests * args.request_chunks)
    requests = [(tokens[r * per_req : (r + 1) * per_req], slice(r * per_req, (r + 1) * per_req))
                for r in range(args.requests)]
    inside = _time_fetch_tasks()
    out = torch.empty_like(kv)
    rows: list[dict[str, Any]] = []
    for group in (int(g) for g in args.groups.split(",")):
        api.GROUP_CHUNKS, api.GROUP_BYTES = group, group * chunk_bytes
        shutil.rmtree(args.dir, ignore_errors=True)
        with GDSCache(path=args.dir, chunk_size=CHUNK, model_id="groups", storage="gds", io_threads=8) as cache:
            start = time.perf_counter()
            stored = sum(cache.store(tok, kv[:, :, sl]) for tok, sl in requests)
            store_gbps = nbytes / (time.perf_counter() - start) / 1e9
            assert stored == kv.shape[2], "not every chunk was stored"
        for threads in (int(t) for t in args.threads.split(",")):
            with GDSCache(path=args.dir, chunk_size=CHUNK, model_id="groups", storage="gds",
                          io_threads=threads) as cache:
                retrieve = lambda c=cache: [c.retrieve(tok, out[:, :, sl]) for tok, sl in requests]
                retrieve()  # warms the page cache and the allocator
                passes, busy = [], []
                for _ in range(args.passes):
                    inside.clear()
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    got = retrieve()
                    torch.cuda.synchronize()
                    passes.append(time.perf_counter() - start)
                    busy.append(inside.total())
                    assert got == [per_req] * args.requests, "a stored chunk was not retrieved"
                assert torch.equal(out.view(torch.int16), kv.view(torch.int16)), "retrieved KV differs"
            row = {"group": group, "io_threads": threads, "chunk_MiB": chunk_bytes / (1 << 20),
                   "store_GBps": store_gbps, "warm_GBps": nbytes / float(np.median(passes)) / 1e9,
                   "wall_ms": 1e3 * float(np.median(passes)), "in_fetch_tasks_ms": 1e3 * float(np.median(busy))}
            rows.append(row)
            print(f"group={group:4d} io_threads={threads:3d}  store {store_gbps:6.2f} GB/s (8 threads)  warm "
                  f"{row['warm_GBps']:6.2f} GB/s  wall {row['wall_ms']:6.0f} ms  in fetch tasks "
                  f"{row['in_fetch_tasks_ms']:6.0f} ms", flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


class _Busy:
    """Seconds spent inside ``GDSCache._fetch_group`` calls, summed over threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds += seconds

    def clear(self) -> None:
        with self._lock:
            self._seconds = 0.0

    def total(self) -> float:
        return self._seconds


def _time_fetch_tasks() -> _Busy:
    busy = _Busy()
    fetch: Callable[..., Any] = GDSCache._fetch_group

    def timed(self: GDSCache, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fetch(self, *args)
        finally:
            busy.add(time.perf_counter() - start)

    GDSCache._fetch_group = timed  # type: ignore[method-assign]
    return busy


if __name__ == "__main__":
    main()
