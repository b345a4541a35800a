"""Page-cache-warm reads into GPU memory, outside gdscache: what kvikio and a plain pinned pipeline reach.

Writes a 2 GiB file under ``.bench/`` with plain buffered writes, warms the page cache with plain reads,
then times (best of 3): one kvikio ``pread`` into a GPU buffer for several thread counts and task sizes,
a pinned host-to-device copy, parallel ``preadv`` into pinned memory, and ``preadv`` -> pinned -> H2D
pipelined over CUDA streams. Explains the warm-retrieve ceiling of ``bench_gds.py`` on a given machine.

    python benchmarks/kvikio_warm_probe.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import kvikio
import kvikio.defaults
import torch

MiB, GiB = 1 << 20, 1 << 30
SIZE = 2 * GiB
PIECE = 8 * MiB


def best_gbps(fn: Callable[[], None], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return SIZE / min(times) / 1e9


def main() -> None:
    path = os.path.abspath(os.path.join(".bench", "warm.bin"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path) or os.path.getsize(path) != SIZE:
        with open(path, "wb") as f:
            block = os.urandom(64 * MiB)
            f.writelines(block for _ in range(SIZE // len(block)))
    fd = os.open(path, os.O_RDONLY)
    warm = bytearray(64 * MiB)
    for off in range(0, SIZE, len(warm)):
        os.preadv(fd, [warm], off)
    dev = torch.empty(SIZE, dtype=torch.uint8, device="cuda")
    for threads in (8, 16, 32):
        for task in (4 * MiB, 16 * MiB):
            kvikio.defaults.set({"num_threads": threads, "task_size": task})
            f = kvikio.CuFile(path, "r")
            gbps = best_gbps(lambda f=f: f.pread(dev, SIZE).get())
            print(f"kvikio pread threads={threads} task={task >> 20}MiB: {gbps:.1f} GB/s", flush=True)
            f.close()
    pinned = torch.empty(SIZE, dtype=torch.uint8).pin_memory()
    print(f"pinned H2D one copy: {best_gbps(lambda: dev.copy_(pinned, non_blocking=True)):.1f} GB/s", flush=True)
    host = memoryview(pinned.numpy())
    for threads in (8, 16):
        with ThreadPoolExecutor(threads) as pool:
            streams = [torch.cuda.Stream() for _ in range(threads)]

            def read_piece(i: int) -> None:
                os.preadv(fd, [host[i * PIECE:(i + 1) * PIECE]], i * PIECE)

            def pipelined(i: int, streams: list = streams) -> None:
                read_piece(i)
                with torch.cuda.stream(streams[i % len(streams)]):
                    dev[i * PIECE:(i + 1) * PIECE].copy_(pinned[i * PIECE:(i + 1) * PIECE], non_blocking=True)

            gbps = best_gbps(lambda pool=pool: list(pool.map(read_piece, range(SIZE // PIECE))))
            print(f"host pread -> pinned threads={threads}: {gbps:.1f} GB/s", flush=True)

            def run_pipeline(pool: ThreadPoolExecutor = pool, streams: list = streams) -> None:
                list(pool.map(pipelined, range(SIZE // PIECE)))
                for s in streams:
                    s.synchronize()

            print(f"pread -> pinned -> H2D pipeline threads={threads} piece=8MiB: {best_gbps(run_pipeline):.1f} GB/s",
                  flush=True)
    os.close(fd)


if __name__ == "__main__":
    main()
