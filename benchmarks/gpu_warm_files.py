"""Page-cache-warm GPU retrieve against raw kvikio reads of the same bytes, on one page cache, and DRAM-tier hits
against one pinned host copy (issue 3).

Requests of 4096 tokens (16 chunks of 256; ``--tokens`` for longer prompts) are stored through GDSCache, the page
cache is dropped, and everything is read once cold and once more (the slow first re-read: benchmarks/RESULTS.md). Then, in passes that alternate
their order, the same bytes are read warm three ways, each into the GPU:

- ``raw_file``: one file holding every request's bytes, one kvikio read per request (the CLI's ceiling);
- ``chunk_files``: the cache's own chunk files, each payload read raw by kvikio, a request's 16 files in flight
  together (no header, no checksum): what the file layout alone costs;
- ``cache``: ``GDSCache.retrieve``, checked bit-exact after each pass;
- ``cache_kvikio``: the same with a request's reads left to kvikio file by file, where the cache would batch them
  into ``libgdscache_io.so`` (kvikio's POSIX path and the library built; else this side is left out);

and two ways from host memory, where no file is read:

- ``pinned_copy``: one copy per request from one pinned host buffer holding every request's bytes (the PCIe ceiling
  for DRAM-tier hits);
- ``dram``: ``GDSCache.retrieve`` from a second cache whose DRAM tier holds every chunk (all hits), checked
  bit-exact after each pass.

    python benchmarks/gpu_warm_files.py --shape 32,8,128 --requests 8    # Llama-8B: 32 MiB chunks, 4 GiB
    python benchmarks/gpu_warm_files.py --shape 16,1,64 --requests 64    # 1 MiB chunks, 1 GiB
    python benchmarks/gpu_warm_files.py --shape 16,1,64 --requests 8 --tokens 32768   # 32k-token prompts, 1 GiB
    python benchmarks/gpu_warm_files.py --shape 16,1,64 --requests 4 --tokens 131072  # 512 MiB per request, 2 GiB

To compare two versions of the code on one host, run it from each version's tree in turn.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import kvikio
import numpy as np
import torch
from gpu_requests import CHUNK, TOKENS, parse_args, request_kv, timed, write_json

from gdscache import GDSCache
from gdscache.format.chunkfile import PAYLOAD_OFFSET
from io_backends import make_file_backend
from io_backends.base import Part


def main() -> None:
    args = parse_args(__doc__, ".bench/warm_files", "32,8,128", 8, lambda parser: parser.add_argument(
        "--tokens", type=int, default=TOKENS, help="tokens per request, a multiple of 256 (default %(default)s)"))
    tokens = args.tokens
    if tokens <= 0 or tokens % CHUNK:
        raise SystemExit(f"--tokens must be a positive multiple of {CHUNK}, got {tokens}")
    kv = request_kv(args.shape, tokens)
    out = torch.empty_like(kv)
    src = kv.reshape(-1).view(torch.uint8)
    req_bytes, chunks = src.numel(), tokens // CHUNK
    total = args.requests * req_bytes
    dest = torch.empty(req_bytes, dtype=torch.uint8, device="cuda")
    dest_chunks = dest.view(chunks, -1).unbind()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    backend = make_file_backend("gds", 8, "auto", args.dir)
    raw_path = os.path.join(args.dir, "raw.bin")
    backend.write_file(raw_path, [Part(i * req_bytes, src) for i in range(args.requests)], durable=True)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 1 << 30, tokens) for _ in range(args.requests)]
    cache = GDSCache(path=os.path.join(args.dir, "cache"), chunk_size=CHUNK, model_id="warm-files", storage="gds")
    for prompt in prompts:
        assert cache.store(prompt, kv) == tokens, "store failed"
    files = [[cache._local.path_of(cache.namespace, key) for key in cache.chunk_keys(p)] for p in prompts]
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    for i in range(args.requests):
        pinned[i * req_bytes : (i + 1) * req_bytes].copy_(src)
    dram = GDSCache(path=os.path.join(args.dir, "dram"), chunk_size=CHUNK, model_id="warm-files", storage="gds",
                    cpu_cache_bytes=total)
    for prompt in prompts:
        assert dram.store(prompt, kv) == tokens, "store failed"

    def raw_file() -> None:
        with backend.open_read(raw_path) as handle:
            for i in range(args.requests):
                handle.read_into(dest, i * req_bytes)

    def chunk_files() -> None:
        for paths in files:
            handles = [kvikio.CuFile(path, "r") for path in paths]
            reads = [h.pread(d, d.numel(), PAYLOAD_OFFSET) for h, d in zip(handles, dest_chunks, strict=True)]
            assert all(r.get() == d.numel() for r, d in zip(reads, dest_chunks, strict=True)), "short read"
            for handle in handles:
                handle.close()

    def retrieve(source: GDSCache = cache) -> None:
        for prompt in prompts:
            assert source.retrieve(prompt, out) == tokens, "a stored chunk was not retrieved"

    def retrieve_through_kvikio() -> None:
        cache_backend = cache._backend
        cache_backend.native_reads = False
        try:
            retrieve()
        finally:
            cache_backend.native_reads = True

    def pinned_copy() -> None:
        for i in range(args.requests):
            dest.copy_(pinned[i * req_bytes : (i + 1) * req_bytes], non_blocking=True)

    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)
    first = {name: total / timed(fn) / 1e9 for name, fn in
             (("raw_file_cold", raw_file), ("cache_cold", retrieve), ("raw_file_first_reread", raw_file),
              ("cache_first_reread", retrieve))}
    sides: list[tuple[str, Callable[[], None]]] = [("raw_file", raw_file), ("chunk_files", chunk_files),
                                                   ("cache", retrieve), ("pinned_copy", pinned_copy),
                                                   ("dram", lambda: retrieve(dram))]
    if cache._backend.native_reads:
        sides.insert(3, ("cache_kvikio", retrieve_through_kvikio))
    rows = []
    for p in range(args.passes):
        for name, fn in sides if p % 2 == 0 else sides[::-1]:
            row = {"pass": p, "side": name, "GBps": total / timed(fn) / 1e9}
            if name in ("cache", "cache_kvikio", "dram"):
                row["exact"] = bool(torch.equal(out.view(torch.int16), kv.view(torch.int16)))
                out.zero_()
            rows.append(row)
    median = {name: float(np.median([r["GBps"] for r in rows if r["side"] == name])) for name, _ in sides}
    print(f"{torch.cuda.get_device_name()}  io_mode={cache.io_mode}  {args.shape}: {total / 2**30:.1f} GiB as "
          f"{args.requests} requests of {chunks} chunks of {req_bytes / chunks / 2**20:g} MiB")
    print("  cold / first re-read: " + "  ".join(f"{k} {v:.2f}" for k, v in first.items()))
    for name, _ in sides:
        passes = " ".join(f"{r['GBps']:.2f}" for r in rows if r["side"] == name)
        print(f"  warm {name:<12} median {median[name]:6.2f} GB/s  ({passes})")
    exact = all(r["exact"] for r in rows if "exact" in r)
    print(f"  cache / chunk_files {median['cache'] / median['chunk_files']:.0%}, cache / raw_file "
          f"{median['cache'] / median['raw_file']:.0%}, dram / pinned_copy {median['dram'] / median['pinned_copy']:.0%}"
          f" ({dram.stats()['dram_hits']} DRAM hits), bit-exact: {exact}")
    if "cache_kvikio" in median:
        print(f"  cache / cache_kvikio {median['cache'] / median['cache_kvikio']:.0%}")
    io_mode = cache.io_mode
    cache.close()
    dram.close()
    backend.close()
    shutil.rmtree(args.dir, ignore_errors=True)
    write_json(args.json, args, io_mode, cold_and_first=first, median_GBps=median, rows=rows)
    if not exact:
        raise SystemExit("retrieved KV differs from what was stored")


if __name__ == "__main__":
    main()
