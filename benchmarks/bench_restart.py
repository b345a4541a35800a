"""How long a new GDSCache takes to index an existing directory of N chunks (issue 2: 100k in seconds).

Usage: python benchmarks/bench_restart.py --path DIR [--chunks 100000] [--keep]
Baseline in the same run: a bare `os.walk` + `stat` of the same tree (the floor for any index).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from gdscache import GDSCache
from gdscache.format.chunkfile import make_meta
from gdscache.spec import KVSpec


def populate(path: str, n: int) -> None:
    """Write n small valid chunks through the local tier (no fsync: this measures indexing, not writing)."""
    with GDSCache(path=path, chunk_size=1, model_id="restart-bench", storage="posix", durable=False) as cache:
        spec = KVSpec(1, 2, 1, 8, torch.float16)
        cache._bind(spec)
        payload = torch.arange(32, dtype=torch.uint8)
        for i in track(range(n), description=f"writing {n} chunks"):
            key = i.to_bytes(16, "little")
            meta = make_meta(key, cache.namespace, spec, 1, "raw", {}, payload)
            cache._local.write(cache.namespace, meta, payload)


def walk_stat(path: str) -> int:
    count = 0
    for root, _, files in os.walk(path):
        for f in files:
            os.stat(os.path.join(root, f))
            count += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--path", required=True)
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    populate(args.path, args.chunks)
    os.sync()
    t0 = time.perf_counter()
    files = walk_stat(args.path)
    t_walk = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = GDSCache(path=args.path, chunk_size=1, model_id="restart-bench", storage="posix")
    t_open = time.perf_counter() - t0
    indexed = cache.stats()["local_chunks"]
    cache.close()
    table = Table(title=f"restart over {args.chunks} chunks")
    for col in ("chunks indexed", "GDSCache() s", "os.walk+stat s", "ratio"):
        table.add_column(col)
    table.add_row(str(indexed), f"{t_open:.2f}", f"{t_walk:.2f}", f"{t_open / t_walk:.2f}x")
    Console().print(table)
    print(json.dumps({"chunks": args.chunks, "indexed": indexed, "files": files, "open_s": t_open, "walk_stat_s": t_walk}))
    if not args.keep:
        shutil.rmtree(args.path)


if __name__ == "__main__":
    main()
