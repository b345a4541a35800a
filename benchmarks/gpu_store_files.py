"""GPU stores against raw kvikio writes of the same bytes on one disk: what one file per chunk and one durable
publication per request cost before the cache does anything (issue 3).

Requests of 4096 tokens (16 chunks of 256) go from one GPU tensor to disk in up to five ways. The ways take turns
request by request (their order rotating), so that the disk's drift, large on shared virtual disks, falls on every
way alike. Each request is timed until its bytes are written (and fsynced where it says so):

- ``raw_file``: the pass's requests one after another into one file, fsynced once at the end (that fsync is
  counted): one large sequential write, cut at request boundaries;
- ``chunk_files``: per request, 16 files of a 4 KiB header slot and one chunk's bytes, written through kvikio all in
  flight, then fsynced together, closed and renamed into place: the least that durable publication of each request
  needs, with no checksum and no header packed;
- ``chunk_files_nosync``: the same without the fsyncs;
- ``cache``: ``GDSCache.store`` with its default ``durable: true``;
- ``cache_kvikio``: the same with each batch of files left to kvikio file by file, where the cache would write and
  publish it in one call into ``libgdscache_io.so`` (absent where the cache does not);
- ``cache_nosync``: ``GDSCache.store`` with ``durable: false`` (chunks are checksummed either way: a file torn by a
  crash reads as a miss).

Each pass reports every way's GB/s and its % of ``raw_file`` in that pass; per request, the median and p10/p90 ms.

    python benchmarks/gpu_store_files.py --shape 16,1,64 --requests 64    # 1 MiB chunks, 1 GiB per way and pass
    python benchmarks/gpu_store_files.py --shape 32,8,128 --requests 4    # Llama-8B: 32 MiB chunks, 2 GiB
    python benchmarks/gpu_store_files.py --sides chunk_files,cache         # raw_file always runs: the ruler
"""

from __future__ import annotations

import argparse
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
from io_backends.base import fsync_all
from io_backends.posix import temp_path_for

SIDES = ("raw_file", "chunk_files", "chunk_files_nosync", "cache", "cache_kvikio", "cache_nosync")


def main() -> None:
    args = parse_args(__doc__, ".bench/store_files", "16,1,64", 64, lambda parser: parser.add_argument(
        "--sides", type=_sides, default=SIDES, help=f"comma-separated, of {','.join(SIDES)}"))
    sides: tuple[str, ...] = args.sides
    kv = request_kv(args.shape)
    src = kv.reshape(-1).view(torch.uint8)
    req_bytes, chunks = src.numel(), TOKENS // CHUNK
    chunk_bytes = req_bytes // chunks
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    backend = make_file_backend("gds", 8, "auto", args.dir)  # sets kvikio's pool as the cache does
    if not getattr(backend, "native_writes", False):  # the cache writes through kvikio already
        sides = tuple(name for name in sides if name != "cache_kvikio")
    fsync_ms: list[float] = []

    def chunk_files(where: str, request: int, durable: bool) -> None:
        files = []
        for c in range(chunks):
            final = os.path.join(where, f"{request:04d}-{c:02d}.bin")
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

    def one_pass(p: int) -> dict[str, float]:
        """Seconds each way spent on this pass's requests, taking turns."""
        dirs = {name: os.path.join(args.dir, f"{name}-{p}") for name in sides}
        for where in dirs.values():
            os.makedirs(where)
        raw = kvikio.CuFile(os.path.join(dirs["raw_file"], "raw.bin"), "w")
        caches = {name: GDSCache(path=dirs[name], chunk_size=CHUNK, model_id="store-files", storage="gds",
                                 durable=name != "cache_nosync") for name in sides if name.startswith("cache")}
        if "cache_kvikio" in caches:
            caches["cache_kvikio"]._backend.native_writes = False
        for cache in caches.values():  # bound to the KV by one untimed request
            assert cache.store(rng.integers(0, 1 << 30, TOKENS), kv) == TOKENS, "store failed"
        prompts = {name: [rng.integers(0, 1 << 30, TOKENS) for _ in range(args.requests)] for name in caches}

        def one_request(name: str, r: int) -> None:
            if name == "raw_file":
                assert raw.pwrite(src, req_bytes, r * req_bytes).get() == req_bytes, "short write"
            elif name.startswith("chunk_files"):
                chunk_files(dirs[name], r, durable=name == "chunk_files")
            else:
                assert caches[name].store(prompts[name][r], kv) == TOKENS, "store failed"

        spent = dict.fromkeys(sides, 0.0)
        for r in range(args.requests):
            turn = (r + p) % len(sides)
            for name in sides[turn:] + sides[:turn]:
                took = timed(lambda name=name, r=r: one_request(name, r))
                spent[name] += took
                request_ms[name].append(took * 1e3)
        spent["raw_file"] += timed(lambda: os.fsync(raw.fileno()))
        raw.close()
        for cache in caches.values():
            cache.close()
        for where in dirs.values():
            shutil.rmtree(where, ignore_errors=True)
        return spent

    rng = np.random.default_rng(1)
    request_ms: dict[str, list[float]] = {name: [] for name in sides}
    rows: list[dict[str, object]] = []
    for p in range(args.passes):
        spent = one_pass(p)
        rows += [{"pass": p, "side": name, "GBps": args.requests * req_bytes / spent[name] / 1e9,
                  "pct_of_raw_file": 100.0 * spent["raw_file"] / spent[name]} for name in sides]
    median = {name: float(np.median([r["pct_of_raw_file"] for r in rows if r["side"] == name])) for name in sides}
    print(f"{torch.cuda.get_device_name()}  io_mode={backend.io_mode}  {args.shape}: {args.passes} passes of "
          f"{args.requests} requests of {chunks} chunks of {chunk_bytes / 2**20:g} MiB per way, taking turns")
    for name in sides:
        ms = request_ms[name]
        passes = "  ".join(f"{r['GBps']:.2f} ({r['pct_of_raw_file']:.0f}%)" for r in rows if r["side"] == name)
        print(f"  {name:<19} median {median[name]:5.1f}% of raw_file   ms per request: median {np.median(ms):6.2f}, "
              f"p10 {np.percentile(ms, 10):6.2f}, p90 {np.percentile(ms, 90):6.2f}   GB/s by pass: {passes}")
    if fsync_ms:
        print(f"  fsync of one request's {chunks} files: median {np.median(fsync_ms):.2f} ms, "
              f"p90 {np.percentile(fsync_ms, 90):.2f} ms")
    io_mode = backend.io_mode
    backend.close()
    shutil.rmtree(args.dir, ignore_errors=True)
    write_json(args.json, args, io_mode, median_pct_of_raw_file=median, fsync_ms=fsync_ms, rows=rows,
               request_ms=request_ms)


def _sides(text: str) -> tuple[str, ...]:
    """``--sides``: the named ways in the order of ``SIDES``, ``raw_file`` among them."""
    named = {name.strip() for name in text.split(",") if name.strip()}
    unknown = named - set(SIDES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown side(s) {', '.join(sorted(unknown))}; choose from {', '.join(SIDES)}")
    return tuple(name for name in SIDES if name in named | {"raw_file"})


if __name__ == "__main__":
    main()
