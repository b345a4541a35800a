"""Where one page-cache-warm GPU chunk read spends its time, step by step, as the local tier does it.

Stores 512 chunks of 1 MiB and 64 of 32 MiB (bf16, 256 tokens) through ``storage: gds``, retrieves them four
times with 8 I/O threads (GB/s per pass), then times each step of a single-threaded read of every chunk
(median ms): open, buffers, header+payload read into the GPU, header parse, checksum, close.

    python benchmarks/gpu_read_steps.py          # on a machine with a GPU (benchmarks/gpu_check.sh step read_steps)
"""

from __future__ import annotations

import os
import shutil
import statistics
import time

import numpy as np
import torch

from gdscache import GDSCache
from gdscache.format import checksum
from gdscache.format.chunkfile import HEADER_SIZE, PAYLOAD_OFFSET, unpack_header
from gdscache.tiers.local import thread_stream
from io_backends.buffers import host_pool

SHAPES = {"1 MiB chunks": ((16, 1, 64), 512), "32 MiB chunks": ((32, 8, 128), 64)}  # (layers, heads, dim), count


def main() -> None:
    device = torch.device("cuda")
    for label, ((layers, heads, dim), n) in SHAPES.items():
        folder = os.path.join(".bench", "read_steps")
        shutil.rmtree(folder, ignore_errors=True)
        kv = torch.randn(layers, 2, 256 * n, heads, dim, dtype=torch.bfloat16, device=device)
        tokens = np.arange(256 * n) + 1
        cache = GDSCache(path=folder, chunk_size=256, model_id="steps", storage="gds", io_threads=8)
        cache.store(tokens, kv)
        out = torch.empty_like(kv)
        passes = []
        for _ in range(4):
            torch.cuda.synchronize()
            start = time.perf_counter()
            got = cache.retrieve(tokens, out)
            torch.cuda.synchronize()
            passes.append(kv.numel() * 2 / (time.perf_counter() - start) / 1e9)
            assert got == kv.shape[2] and torch.equal(out, kv)
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".gdc"))
        steps: dict[str, list[float]] = {k: [] for k in ("open", "buffers", "read", "parse", "checksum", "close")}
        for path in files:
            marks = [time.perf_counter()]
            handle = cache._backend.open_read(path)
            marks.append(time.perf_counter())
            with torch.cuda.stream(thread_stream(device)):
                header = host_pool.acquire(HEADER_SIZE)
                payload = torch.empty(handle.size - PAYLOAD_OFFSET, dtype=torch.uint8, device=device)
                marks.append(time.perf_counter())
                handle.read_into_runs([header, payload], 0)
                marks.append(time.perf_counter())
                meta = unpack_header(header.numpy().tobytes(), handle.size)
                host_pool.release(header)
                marks.append(time.perf_counter())
                checksum.digest(payload, meta.checksum_alg)
                marks.append(time.perf_counter())
            handle.close()
            marks.append(time.perf_counter())
            for key, a, b in zip(steps, marks, marks[1:], strict=False):
                steps[key].append(b - a)
        cache.close()
        shutil.rmtree(folder, ignore_errors=True)
        print(f"{label} on {torch.cuda.get_device_name()} ({cache.io_mode}): retrieve passes GB/s",
              " ".join(f"{p:.1f}" for p in passes))
        print("  median ms per step, one thread:", {k: round(statistics.median(v) * 1e3, 3) for k, v in steps.items()})


if __name__ == "__main__":
    main()
