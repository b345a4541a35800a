"""Retrieve latency while a store is being written (issue 3): a serving engine loads one request's KV while it saves
another's.

Each round times one page-cache-warm GPU retrieve alone, then starts an async store of a Llama-8B-shaped request
(16 chunk files of 32 MiB: ``store()`` returns with the files being written), times the same kind of retrieve right
after it, and flushes the store. The retrieves read requests of ``--shape`` (by default 16 chunks of 1 MiB) from a
second cache in the same process, so both share the native I/O library. The ratio of the two medians is the cost of
the store in flight. Reported: median and max per side, and the store's time until published. The stores take
``--rounds`` x 512 MiB of disk until the end.

    python benchmarks/gpu_read_under_store.py --json out.json

To compare two builds of ``libgdscache_io.so``, run it with ``GDSCACHE_IO_LIB`` set to each.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time

import numpy as np
import torch
from gpu_requests import TOKENS, parse_args, request_kv, write_json
from rich.console import Console
from rich.table import Table

from gdscache import GDSCache

STORED_SHAPE = "32,8,128"
"""Llama-8B: 32 layers, 8 KV heads of 128: 32 MiB chunks, 512 MiB per request."""


def main() -> None:
    args = parse_args(__doc__, ".bench/read_under_store", "16,1,64", 8,
                      lambda p: p.add_argument("--rounds", type=int, default=12))
    shutil.rmtree(args.dir, ignore_errors=True)
    kv, stored = request_kv(args.shape), request_kv(STORED_SHAPE)
    out = torch.empty_like(kv)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1 << 30, TOKENS) for _ in range(args.requests)]
    reader = GDSCache(path=os.path.join(args.dir, "read"), model_id="read-under-store", storage="gds")
    writer = GDSCache(path=os.path.join(args.dir, "write"), model_id="read-under-store", storage="gds",
                      write_mode="async")
    with reader, writer:
        for prompt in prompts:
            if reader.store(prompt, kv) != TOKENS:
                raise SystemExit("a store failed")
        for prompt in prompts:  # into the page cache, and everything allocated once
            reader.retrieve(prompt, out)

        def retrieve(k: int) -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            if reader.retrieve(prompts[k % len(prompts)], out) != TOKENS:
                raise SystemExit("a stored chunk was not retrieved")
            torch.cuda.synchronize()
            return time.perf_counter() - start

        alone, behind, stores = [], [], []
        for k in range(args.rounds):
            alone.append(retrieve(k))
            start = time.perf_counter()
            writer.store(rng.integers(0, 1 << 30, TOKENS), stored)
            behind.append(retrieve(k + 1))
            writer.flush()
            stores.append(time.perf_counter() - start)
        if writer.stats().get("chunk_write_failures", 0):
            raise SystemExit("the disk refused chunks of the store")
        exact = torch.equal(out.view(torch.int16), kv.view(torch.int16))
        io_mode, batch_reads = reader.io_mode, reader.stats()["batch_reads"]
    shutil.rmtree(args.dir, ignore_errors=True)
    result = {"alone_ms": [t * 1e3 for t in alone], "behind_ms": [t * 1e3 for t in behind],
              "store_ms": [t * 1e3 for t in stores]}
    table = Table(title=f"{torch.cuda.get_device_name()}  io_mode={io_mode}  batch_reads={batch_reads}: retrieve of "
                        f"{kv.numel() * 2 / 2**20:g} MiB ({args.shape}), {args.rounds} rounds")
    for column in ("retrieve", "median ms", "max ms"):
        table.add_column(column, justify="right" if column != "retrieve" else "left")
    table.add_row("alone", f"{statistics.median(alone) * 1e3:.2f}", f"{max(alone) * 1e3:.2f}")
    table.add_row("right after a 512 MiB async store", f"{statistics.median(behind) * 1e3:.2f}",
                  f"{max(behind) * 1e3:.2f}")
    Console().print(table)
    ratio = statistics.median(behind) / statistics.median(alone)
    print(f"behind / alone {ratio:.2f}x; store until published: median {statistics.median(stores) * 1e3:.1f} ms; "
          f"bit-exact: {exact}")
    write_json(args.json, args, io_mode, batch_reads=batch_reads, behind_over_alone=ratio, exact=exact, **result)
    if not exact:
        raise SystemExit("retrieved KV differs from what was stored")


if __name__ == "__main__":
    main()
