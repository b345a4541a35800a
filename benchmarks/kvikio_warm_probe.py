"""Which condition makes page-cache-warm kvikio reads into the GPU slow: a controlled matrix.

bench_gds's raw ceiling (4 GiB written by kvikio with O_DIRECT, caches dropped, read cold by kvikio, then
one warm kvikio read) gave 19-20 GB/s where a plain probe (2 GiB written buffered, warmed by a plain read)
gave 41-45. Each cell of this matrix varies one condition:

- write: ``buffered`` (plain 64 MiB writes, no fsync), ``kvikio-direct`` (one kvikio ``pwrite`` from the GPU,
  ``auto_direct_io_write`` on, fsync: KvikioBackend with o_direct auto/on, and bench_gds), ``odirect`` (plain
  O_DIRECT 64 MiB writes, fsync), ``kvikio-buffered`` (kvikio ``pwrite`` with O_DIRECT off, fsync);
- warm-up: ``none`` (still cached after a buffered write; only for the buffered writes), or after
  ``sync; echo 3 > /proc/sys/vm/drop_caches``: ``seqread`` (one thread, sequential 64 MiB ``preadv``),
  ``kvikio`` (one kvikio ``pread`` into the GPU, 8 threads, 4 MiB tasks: as bench_gds), ``fadvise``
  (``posix_fadvise(WILLNEED)`` window by window, then wait until the file is resident: one call on the whole
  file reads only max(read_ahead_kb, max_sectors_kb) of it);
- size: 4 GiB (bench_gds) and 2 GiB (the old probe).

Per cell, three times each (all recorded; the table shows first and best): kvikio ``pread`` of the whole file
into a GPU buffer with 8 and 16 threads (4 MiB tasks), then ``os.preadv`` into pinned host memory from 8
threads (4 MiB pieces: the page-cache copy without H2D). The first kvikio read is the first touch after the
warm-up. Also per cell: resident share of the file (mincore, what util-linux fincore reads), share of sampled
resident pages inside large folios (/proc/self/pagemap + /proc/kpageflags, root only), /proc/meminfo
Cached/Dirty/Writeback before and after the warm-up and after the reads. Once: kernel, THP, NUMA, CPUs,
memory, read-ahead, mount, GPU topology. kvikio settings are scoped to each operation and restored after.

    python benchmarks/kvikio_warm_probe.py --json warm_probe.json             # the GPU machine, ~2-3 min
    python benchmarks/kvikio_warm_probe.py --host-only --sizes-mib 256 --drop file   # no GPU: host cells only

Cells stop at --deadline-s (the rest are listed as skipped); the JSON is rewritten after every cell.

Reading it: slow rows that share a column name the cause. ``k8 1st`` low but ``k8 best`` high: the first touch
after the warm-up is slow (bench_gds times exactly one such read). Low ``large %`` on the slow rows: the page
cache holds the file in 4 KiB pages (how it was filled decides it). ``preadv8`` as low as ``k8``: the
page-cache copy on the host limits, not H2D. Only the 4 GiB rows slow: size (memory, NUMA), not the write
or warm-up path.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import glob
import json
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, Self

MiB, GiB = 1 << 20, 1 << 30
BLOCK = 64 * MiB  # write and sequential-read unit; every file is this block repeated
TASK = 4 * MiB  # kvikio task size and preadv piece
PAGE = mmap.PAGESIZE
WRITES = ("buffered", "kvikio-direct", "odirect", "kvikio-buffered")
WARMS = ("none", "seqread", "kvikio", "fadvise")
NEEDS_GPU = {"kvikio-direct", "kvikio-buffered", "kvikio"}
CACHED_AFTER_WRITE = {"buffered", "kvikio-buffered"}  # only these get warm-up "none"
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_THP = 15, 16, 22


# ---------------------------------------------------------------------------------------------- page cache state
def meminfo() -> dict[str, int]:
    """The /proc/meminfo lines ``grep -E 'Cached|Dirty|Writeback|FileHuge'`` shows, in KiB."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if re.search(r"Cached|Dirty|Writeback|FileHuge", name):
                out[name] = int(rest.split()[0])
    return out


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


class Mapping:
    """A read-only shared mapping of a whole file (mapping faults nothing in) and its mincore vector."""

    def __init__(self, path: str) -> None:
        self.libc = _libc()
        self.size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = self.libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        self.addr: int = addr

    def resident(self) -> bytes:
        """One byte per page, bit 0 set where the page is in the page cache."""
        vec = (ctypes.c_ubyte * (-(-self.size // PAGE)))()
        if self.libc.mincore(self.addr, self.size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return bytes(vec)

    def close(self) -> None:
        self.libc.munmap(self.addr, self.size)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resident_share(path: str) -> float:
    """Share of the file's pages in the page cache (0..1)."""
    with Mapping(path) as m:
        vec = m.resident()
    return (len(vec) - vec.count(0)) / len(vec) if vec else 1.0


def folio_share(path: str, samples: int = 1024) -> dict[str, Any] | None:
    """Of up to ``samples`` resident pages spread over the file: the share in large folios (compound pages)
    and in THPs. Touches only resident pages (minor faults), so it changes nothing in the cache. None when
    /proc/kpageflags or page frame numbers are not readable (not root)."""
    try:
        kf = os.open("/proc/kpageflags", os.O_RDONLY)
    except OSError:
        return None
    try:
        with Mapping(path) as m:
            vec = m.resident()
            picks = [i for i in range(0, len(vec), max(1, len(vec) // samples)) if vec[i] & 1]
            pm = os.open("/proc/self/pagemap", os.O_RDONLY)
            try:
                large = thp = 0
                for i in picks:
                    ctypes.string_at(m.addr + i * PAGE, 1)  # map the page (a minor fault)
                    entry = int.from_bytes(os.pread(pm, 8, (m.addr // PAGE + i) * 8), "little")
                    pfn = entry & ((1 << 55) - 1)
                    if not entry >> 63 or pfn == 0:
                        return None
                    flags = int.from_bytes(os.pread(kf, 8, pfn * 8), "little")
                    large += bool(flags >> KPF_COMPOUND_HEAD & 1 or flags >> KPF_COMPOUND_TAIL & 1)
                    thp += flags >> KPF_THP & 1
            finally:
                os.close(pm)
    finally:
        os.close(kf)
    n = len(picks)
    return {"sampled": n, "large_folio_share": large / n if n else None, "thp_share": thp / n if n else None}


def drop(path: str, how: str) -> str:
    """Empty the page cache: ``global`` (sync; echo 3 > drop_caches, root) or ``file`` (fadvise DONTNEED)."""
    os.sync()
    if how == "global":
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return "fadvise_dontneed"


# ---------------------------------------------------------------------------------------------- host I/O
def aligned_block() -> mmap.mmap:
    """BLOCK random bytes in page-aligned memory (usable for O_DIRECT)."""
    buf = mmap.mmap(-1, BLOCK)
    buf.write(os.urandom(BLOCK))
    return buf


def write_buffered(path: str, size: int, block: memoryview) -> None:
    """Plain buffered writes, no fsync: the pages stay in the cache (dirty until writeback)."""
    with open(path, "wb") as f:
        f.writelines(block for _ in range(size // BLOCK))


def write_odirect(path: str, size: int, block: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for off in range(0, size, BLOCK):
            if os.pwrite(fd, block, off) != BLOCK:
                raise OSError(f"short O_DIRECT write at {off}")
        os.fsync(fd)
    finally:
        os.close(fd)


def warm_seqread(path: str) -> None:
    """One thread reads the file front to back in BLOCK pieces (the kernel's sequential read-ahead)."""
    buf = bytearray(BLOCK)
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while n := os.preadv(fd, [buf], off):
            off += n
    finally:
        os.close(fd)


def queue_dir(path: str) -> str | None:
    """The sysfs queue folder of the block device holding ``path`` (None for non-block file systems)."""
    st = os.stat(path)
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    return next((q for q in (f"{dev}/queue", f"{dev}/../queue") if os.path.isdir(q)), None)


def willneed_window(path: str) -> int:
    """Bytes one WILLNEED call reads at most: the kernel caps it at max(read_ahead_kb, max_sectors_kb)."""
    queue = queue_dir(path)
    if queue is None:
        return 128 << 10
    kib = []
    for name in ("read_ahead_kb", "max_sectors_kb"):
        with open(f"{queue}/{name}") as f:
            kib.append(int(f.read()))
    return max(max(kib), 4) << 10


def warm_fadvise(path: str, timeout_s: float = 15.0) -> dict[str, Any]:
    """posix_fadvise(WILLNEED) window by window over the file (one call on the whole file reads only its first
    window), then poll mincore until the file is resident or ``timeout_s`` passed."""
    window, size = willneed_window(path), os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, size, window):
            os.posix_fadvise(fd, off, min(window, size - off), os.POSIX_FADV_WILLNEED)
        issued = time.perf_counter()
        while (share := resident_share(path)) < 1.0 and time.perf_counter() - issued < timeout_s:
            time.sleep(0.02)
    finally:
        os.close(fd)
    return {"fadvise_window": window, "fadvise_resident_after_wait": share}


def preadv_times(path: str, size: int, host: memoryview, threads: int, repeats: int) -> list[float]:
    """Seconds per whole-file read by ``threads`` threads, TASK pieces, ``os.preadv`` into ``host``."""
    fd = os.open(path, os.O_RDONLY)

    def piece(off: int) -> None:
        if os.preadv(fd, [host[off:off + TASK]], off) != TASK:
            raise OSError(f"short read at {off}")

    try:
        with ThreadPoolExecutor(threads) as pool:
            return timed(lambda: list(pool.map(piece, range(0, size, TASK))), repeats)
    finally:
        os.close(fd)


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    out = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


# ---------------------------------------------------------------------------------------------- GPU side
class Gpu:
    """A GPU buffer and a pinned host buffer of the largest size, and kvikio operations on them."""

    def __init__(self, max_size: int, block: memoryview) -> None:
        import kvikio
        import kvikio.defaults
        import torch

        self.torch, self.kvikio = torch, kvikio
        self.dst = torch.empty(max_size, dtype=torch.uint8, device="cuda")
        self.pinned = torch.empty(max_size, dtype=torch.uint8, pin_memory=True)
        self.block = torch.frombuffer(block, dtype=torch.uint8).to("cuda")

    def host(self) -> memoryview:
        return memoryview(self.pinned.numpy())

    def info(self) -> dict[str, Any]:
        d = self.kvikio.defaults
        out = {"card": self.torch.cuda.get_device_name(), "torch": self.torch.__version__,
               "kvikio": self.kvikio.__version__, "compat_preferred": d.is_compat_mode_preferred()}
        for key in ("compat_mode", "num_threads", "task_size", "bounce_buffer_size", "auto_direct_io_read",
                    "auto_direct_io_write"):
            out[key] = str(d.get(key))
        return out

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def settings(self, threads: int, direct_write: bool = True) -> AbstractContextManager[None]:
        """kvikio settings for the ``with`` block, restored after it: ``threads`` threads, 4 MiB tasks, buffered
        reads and (``direct_write``) O_DIRECT writes, as KvikioBackend with o_direct auto."""
        return self.kvikio.defaults.set({"num_threads": threads, "task_size": TASK, "auto_direct_io_read": False,
                                         "auto_direct_io_write": direct_write})

    def write(self, path: str, size: int, direct: bool) -> None:
        """As KvikioBackend/bench_gds: one kvikio pwrite from the GPU, 8 threads, then fsync."""
        self.dst[:size].view(-1, BLOCK).copy_(self.block.expand(size // BLOCK, BLOCK))
        self.sync()
        with self.settings(8, direct_write=direct), self.kvikio.CuFile(path, "w") as f:
            if f.pwrite(self.dst[:size]).get() != size:
                raise OSError("short kvikio write")
            os.fsync(f.fileno())

    def read(self, path: str, size: int) -> None:
        """One kvikio pread of the whole file into the GPU buffer, with the current settings."""
        with self.kvikio.CuFile(path, "r") as f:
            if f.pread(self.dst[:size]).get() != size:
                raise OSError("short kvikio read")

    def prime(self, folder: str) -> None:
        """First use of kvikio (driver, thread pools, bounce buffers) outside any timed cell."""
        path = os.path.join(folder, "prime.bin")
        self.write(path, BLOCK, direct=True)
        for threads in (16, 8):
            with self.settings(threads):
                self.read(path, BLOCK)
        os.unlink(path)

    def exact(self, size: int) -> bool:
        return bool((self.dst[:size].view(-1, BLOCK) == self.block).all())


# ---------------------------------------------------------------------------------------------- the matrix
def plan(sizes: list[int], writes: list[str], warms: list[str]) -> Iterator[tuple[int, str, list[str]]]:
    """(size, write, warm-ups) in run order; ``none`` first and only where the write leaves pages cached."""
    for size in sizes:
        for write in writes:
            yield size, write, [w for w in WARMS if w in warms and (w != "none" or write in CACHED_AFTER_WRITE)]


def gbps(size: int, seconds: list[float]) -> dict[str, float]:
    return {"first": size / seconds[0] / 1e9, "best": size / min(seconds) / 1e9}


def run_cell(path: str, size: int, warm: str, args: argparse.Namespace, gpu: Gpu | None,
             host: memoryview) -> dict[str, Any]:
    cell: dict[str, Any] = {"warm": warm}
    if warm != "none":
        cell["drop"] = drop(path, args.drop)
    cell["resident_before_warm"] = resident_share(path)
    cell["meminfo_before_warm"] = meminfo()
    start = time.perf_counter()
    if warm == "seqread":
        warm_seqread(path)
    elif warm == "fadvise":
        cell.update(warm_fadvise(path))
    elif warm == "kvikio":
        assert gpu is not None
        with gpu.settings(8):
            gpu.read(path, size)
    cell["warm_s"] = time.perf_counter() - start
    cell["meminfo_after_warm"] = meminfo()
    cell["resident_after_warm"] = resident_share(path)
    if gpu is not None:
        gpu.dst.zero_()
        for threads in (8, 16):
            with gpu.settings(threads):
                t = timed(lambda: gpu.read(path, size), args.repeats, gpu.sync)
            cell[f"kvikio{threads}_s"], cell[f"kvikio{threads}_GBps"] = t, gbps(size, t)
            if threads == 8:
                cell["exact"] = gpu.exact(size)
    t = preadv_times(path, size, host, 8, args.repeats)
    cell["preadv8_s"], cell["preadv8_GBps"] = t, gbps(size, t)
    cell["meminfo_after_reads"] = meminfo()
    cell["resident_after_reads"] = resident_share(path)
    cell["folios"] = folio_share(path)
    return cell


def write_file(path: str, size: int, write: str, block: mmap.mmap, gpu: Gpu | None) -> dict[str, Any]:
    start = time.perf_counter()
    if write == "buffered":
        write_buffered(path, size, memoryview(block))
    elif write == "odirect":
        write_odirect(path, size, memoryview(block))
    else:
        assert gpu is not None
        gpu.write(path, size, direct=write == "kvikio-direct")
    seconds = time.perf_counter() - start
    return {"write_s": seconds, "write_GBps": size / seconds / 1e9, "resident_after_write": resident_share(path),
            "meminfo_after_write": meminfo()}


def environment(folder: str) -> dict[str, Any]:
    def sh(*cmd: str) -> str:
        if shutil.which(cmd[0]) is None:
            return "absent"
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        return (done.stdout + done.stderr).strip()

    def cat(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            return f"unreadable: {exc.strerror}"

    queue = queue_dir(folder)
    nodes = {os.path.basename(n): {"cpulist": cat(f"{n}/cpulist"), "meminfo": cat(f"{n}/meminfo").splitlines()[:2]}
             for n in sorted(glob.glob("/sys/devices/system/node/node*"))}
    return {"kernel": platform.release(), "thp_enabled": cat("/sys/kernel/mm/transparent_hugepage/enabled"),
            "thp_defrag": cat("/sys/kernel/mm/transparent_hugepage/defrag"),
            "lru_gen": cat("/sys/kernel/mm/lru_gen/enabled"), "numactl": sh("numactl", "-H"), "nodes": nodes,
            "nproc": sh("nproc"), "affinity_cpus": len(os.sched_getaffinity(0)), "free_g": sh("free", "-g"),
            "mount": sh("findmnt", "-T", folder),
            "queue": {k: cat(f"{queue}/{k}") for k in ("read_ahead_kb", "max_sectors_kb", "scheduler")} if queue else None,
            "gpu_topology": sh("nvidia-smi", "topo", "-m"), "meminfo": meminfo()}


def _fmt(value: Any, spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def summary(result: dict[str, Any]) -> None:
    cols = ["GiB", "write", "write GB/s", "warm", "warm s", "res %", "large %", "k8 1st", "k8 best",
            "k16 1st", "k16 best", "preadv8 1st", "preadv8 best", "Dirty MiB", "exact"]
    rows = []
    for c in result["cells"]:
        rate = {key: c.get(key, {}) for key in ("kvikio8_GBps", "kvikio16_GBps", "preadv8_GBps")}
        rows.append([f"{c['size'] / GiB:g}", c["write"], _fmt(c.get("write_GBps"), ".2f"), c["warm"],
                     "skipped" if c.get("skipped") else _fmt(c["warm_s"], ".2f"),
                     _fmt(c.get("resident_after_warm"), ".1f", 100),
                     _fmt((c.get("folios") or {}).get("large_folio_share"), ".0f", 100),
                     *(_fmt(rate[key].get(which)) for key in rate for which in ("first", "best")),
                     _fmt(c.get("meminfo_after_warm", {}).get("Dirty"), ".0f", 1 / 1024),
                     str(c.get("exact", "-"))])
    title = f"warm reads, GB/s (first and best of {result['repeats']}); kernel {result['env']['kernel']}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(x) for x in col) for col in zip(cols, *rows)]
        for row in [cols, *rows]:
            print("  ".join(x.rjust(w) for x, w in zip(row, widths)))
        return
    table = Table(title=title)
    for col in cols:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here (rewritten after every cell)")
    ap.add_argument("--dir", default=os.path.join(".bench", "warm_probe"), help="scratch folder (removed after)")
    ap.add_argument("--sizes-mib", default="4096,2048", help="file sizes in MiB, multiples of 64, in run order")
    ap.add_argument("--writes", default=",".join(WRITES), help=f"subset of {','.join(WRITES)}")
    ap.add_argument("--warms", default=",".join(WARMS), help=f"subset of {','.join(WARMS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--drop", choices=("global", "file"), default="global",
                    help="global: sync + drop_caches (root); file: fadvise DONTNEED on the file only")
    ap.add_argument("--deadline-s", type=float, default=210.0, help="start no cell after this many seconds")
    ap.add_argument("--host-only", action="store_true", help="no GPU: host writes, warm-ups and preadv only")
    args = ap.parse_args()
    sizes = [int(s) * MiB for s in args.sizes_mib.split(",")]
    writes, warms = args.writes.split(","), args.warms.split(",")
    if any(s <= 0 or s % BLOCK for s in sizes) or not set(writes) <= set(WRITES) or not set(warms) <= set(WARMS):
        ap.error("bad --sizes-mib, --writes or --warms")
    if args.host_only:
        writes, warms = [w for w in writes if w not in NEEDS_GPU], [w for w in warms if w not in NEEDS_GPU]

    t0 = time.perf_counter()
    folder = os.path.abspath(args.dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "warm.bin")
    block = aligned_block()
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "host": platform.node(),
        "repeats": args.repeats, "loadavg_start": os.getloadavg(), "env": environment(folder), "cells": []}

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    try:
        gpu = None if args.host_only else Gpu(max(sizes), memoryview(block))
        if gpu:
            gpu.prime(folder)
        result["gpu"] = gpu.info() if gpu else None
        host = gpu.host() if gpu else memoryview(mmap.mmap(-1, max(sizes)))
        for size, write, cell_warms in plan(sizes, writes, warms):
            if time.perf_counter() - t0 > args.deadline_s:
                result["cells"] += [{"size": size, "write": write, "warm": w, "skipped": True} for w in cell_warms]
                continue
            written = write_file(path, size, write, block, gpu)
            for warm in cell_warms:
                cell: dict[str, Any] = {"size": size, "write": write, **written}
                if time.perf_counter() - t0 > args.deadline_s:
                    cell.update(warm=warm, skipped=True)
                else:
                    cell.update(run_cell(path, size, warm, args, gpu, host))
                    k8, p8 = cell.get("kvikio8_GBps", {}), cell["preadv8_GBps"]
                    print(f"{size >> 20} MiB {write:>15} {warm:>8}: kvikio8 first/best {_fmt(k8.get('first'))}/"
                          f"{_fmt(k8.get('best'))}, preadv8 {_fmt(p8['first'])}/{_fmt(p8['best'])} GB/s, "
                          f"resident {cell['resident_after_warm']:.3f}", flush=True)
                result["cells"].append(cell)
                save()
            os.unlink(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        result["loadavg_end"] = os.getloadavg()
        result["elapsed_s"] = time.perf_counter() - t0
        save()
    summary(result)


if __name__ == "__main__":
    main()
