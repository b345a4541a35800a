"""GPU stores against raw kvikio writes of the same bytes on one disk: what one file per chunk and one durable
publication per request cost before the cache does anything (issue 3).

Requests of 4096 tokens (16 chunks of 256) go from one GPU tensor to disk five ways, in passes that alternate their
order, every side timed until its bytes are written (and fsynced where it says so):

- ``raw_file``: one file holding every request's bytes, fsynced once at the end (the CLI's ceiling);
- ``chunk_files``: per request, 16 files of a 4 KiB header slot and one chunk's bytes, written through kvikio all in
  flight, then fsynced together, closed and renamed into place: the least that durable publication of each request
  needs, with no checksum and no header packed;
- ``chunk_files_nosync``: the same without the fsyncs;
- ``cache``: ``GDSCache.store`` with its default ``durable: true``;
- ``cache_nosync``: ``GDSCache.store`` with ``durable: false`` (chunks are checksummed either way: a file torn by a
  crash reads as a miss).

    python benchmarks/gpu_store_files.py --shape 16,1,64 --requests 64    # 1 MiB chunks, 1 GiB per side
    python benchmarks/gpu_store_files.py --shape 32,8,128 --requests 4    # Llama-8B: 32 MiB chunks, 2 GiB
"""

from __future__ import annotations

import os
import shutil
import time

import kvikio
import numpy as np
import torch
from gpu_requests import CHUNK, TOKENS, parse_args, request_kv, timed, write_json

from gdscache import GDSCache
from gdscache.format.chunkfile import PAYLOAD_OFFSET
from io_backends import make_file_backend
from io_backends.base import Part, fsync_all
from io_backends.posix import temp_path_for

SIDES = ("raw_file", "chunk_files", "chunk_files_nosync", "cache", "cache_nosync")


def main() -> None:
    args = parse_args(__doc__, ".bench/store_files", "16,1,64", 64)

    kv = request_kv(args.shape)
    src = kv.reshape(-1).view(torch.uint8)
    req_bytes, chunks = src.numel(), TOKENS // CHUNK
    chunk_bytes = req_bytes // chunks
    total = args.requests * req_bytes
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    backend = make_file_backend("gds", 8, "auto", args.dir)
    fsync_ms: list[float] = []

    def raw_file(where: str) -> None:
        backend.write_file(os.path.join(where, "raw.bin"), [Part(i * req_bytes, src) for i in range(args.requests)],
                           durable=True)

    def chunk_files(where: str, durable: bool) -> None:
        for r in range(args.requests):
            files = []
            for c in range(chunks):
                final = os.path.join(where, f"{r:04d}-{c:02d}.bin")
                tmp = temp_path_for(final)
                handle = kvikio.CuFile(tmp, "w")
                files.append((handle, tmp, final, handle.pwrite(src[c * chunk_bytes : (c + 1) * chunk_bytes],
                                                                chunk_bytes, PAYLOAD_OFFSET)))
            assert all(write.get() == chunk_bytes for *_, write in files), "short write"
            if durable:
                started = time.perf_counter()
                errors = fsync_all([handle.fileno() for handle, *_ in files])
                fsync_ms.append((time.perf_counter() - started) * 1e3)
                assert not any(errors), errors
            for handle, tmp, final, _ in files:
                handle.close()
                os.rename(tmp, final)

    def cache_store(cache: GDSCache, prompts: list[np.ndarray]) -> None:
        for prompt in prompts:
            assert cache.store(prompt, kv) == TOKENS, "store failed"

    rng = np.random.default_rng(1)
    rows = []
    for p in range(args.passes):
        order = SIDES if p % 2 == 0 else SIDES[::-1]
        for name in order:
            where = os.path.join(args.dir, f"{name}-{p}")
            os.makedirs(where)
            prompts = [rng.integers(0, 1 << 30, TOKENS) for _ in range(args.requests)]
            if name.startswith("cache"):  # opened, bound to its KV (one request stored) and closed outside the timing
                with GDSCache(path=where, chunk_size=CHUNK, model_id="store-files", storage="gds",
                              durable=name == "cache") as cache:
                    cache_store(cache, [rng.integers(0, 1 << 30, TOKENS)])
                    took = timed(lambda c=cache, pr=prompts: cache_store(c, pr))
            else:
                took = timed({"raw_file": lambda w=where: raw_file(w),
                               "chunk_files": lambda w=where: chunk_files(w, True),
                               "chunk_files_nosync": lambda w=where: chunk_files(w, False)}[name])
            rows.append({"pass": p, "side": name, "GBps": total / took / 1e9})
            shutil.rmtree(where, ignore_errors=True)
    for row in rows:  # % of the raw file written in the same pass
        raw = next(r["GBps"] for r in rows if r["pass"] == row["pass"] and r["side"] == "raw_file")
        row["pct_of_raw_file"] = 100.0 * row["GBps"] / raw
    median = {name: float(np.median([r["pct_of_raw_file"] for r in rows if r["side"] == name])) for name in SIDES}
    print(f"{torch.cuda.get_device_name()}  io_mode={backend.io_mode}  {args.shape}: {total / 2**30:.2f} GiB per side "
          f"as {args.requests} requests of {chunks} chunks of {chunk_bytes / 2**20:g} MiB")
    for name in SIDES:
        passes = "  ".join(f"{r['GBps']:.2f} ({r['pct_of_raw_file']:.0f}%)" for r in rows if r["side"] == name)
        print(f"  {name:<19} median {median[name]:5.1f}% of raw_file   GB/s by pass: {passes}")
    print(f"  fsync of one request's {chunks} files: median {np.median(fsync_ms):.2f} ms, "
          f"p90 {np.percentile(fsync_ms, 90):.2f} ms")
    io_mode = backend.io_mode
    backend.close()
    shutil.rmtree(args.dir, ignore_errors=True)
    write_json(args.json, args, io_mode, median_pct_of_raw_file=median, fsync_ms=fsync_ms, rows=rows)


if __name__ == "__main__":
    main()
