"""GPU-direct storage benchmark: GDSCache through kvikio against the raw ceiling, and kvikio against bare cuFile.

Needs a CUDA GPU and kvikio. For each KV shape (Llama-8B: 32 MiB chunks; a small model: 1 MiB chunks):

- ceiling: one large sequential kvikio write (with fsync) and cold read of the same bytes, same directory;
- GDSCache store (sync, durable) and cold retrieve of >= --total-gib, as a % of the ceiling;
- page-cache-warm retrieve into the GPU, and DRAM-tier hits into the GPU;
- p50/p99 latency of single-chunk stores and cold retrieves.

Then raw engines on one file: kvikio as configured, kvikio forced through cuFile (KVIKIO_COMPAT_MODE=OFF),
and bare cuFile (cuda.bindings.cufile) from 1 and N threads; each in a child process with a deadline.
Every number carries the io_mode that produced it. Usage:

    python benchmarks/bench_gds.py --dir /mnt/nvme/bench --total-gib 4 --out gds.json --png gds.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

GiB, MiB = 1 << 30, 1 << 20
SHAPES = {  # name: (layers, kv_heads, head_dim); bf16, 256-token chunks
    "llama8b": (32, 8, 128),  # 32 MiB per chunk
    "small": (16, 1, 64),  # 1 MiB per chunk
}
CHUNK = 256
WARM_PASSES = 4  # the first re-read of freshly cached pages is slower (see benchmarks/kvikio_warm_probe.py)
VARIANTS = {  # extra GDSCache settings measured per shape (store, cold and warm retrieve only)
    "llama8b": [("o_direct=on (O_DIRECT reads too)", {"o_direct": "on"}), ("io_threads=16", {"io_threads": 16}),
                ("kvikio task_size=32 MiB (one task per chunk file)", {"task_mib": 32})],
    "small": [("durable=False (no fsync per chunk)", {"durable": False}), ("io_threads=16", {"io_threads": 16})],
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- helpers
def drop_caches(root: str) -> str:
    """Cold page cache: global drop as root, else per-file fadvise. Returns the method used."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for folder, _, files in os.walk(root):
            for name in files:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "fadvise"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1e3


def random_bytes(nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")


def machine() -> dict[str, Any]:
    import kvikio

    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "kvikio": kvikio.__version__,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    try:
        import kvikio.cufile_driver as drv

        info["cufile_version"] = drv.libcufile_version()
        info["gds_available"] = bool(drv.properties.is_gds_available)
    except Exception as exc:  # the driver is optional: record why it is not there
        info["cufile_driver"] = f"unavailable: {exc}"
    return info


# ---------------------------------------------------------------------------------------------- raw engines
def raw_kvikio(path: str, nbytes: int, threads: int, o_direct: str = "auto", task_mib: int = 4) -> dict[str, Any]:
    """One sequential write (with fsync), cold read and warm read of ``nbytes`` through kvikio."""
    import kvikio

    from io_backends.kvikio_backend import KvikioBackend

    # the same kvikio settings GDSCache uses (defaults: o_direct auto, 4 MiB tasks)
    backend = KvikioBackend(threads=threads, o_direct=o_direct, task_size=task_mib * MiB)  # type: ignore[arg-type]
    src, dst = random_bytes(nbytes), torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def write() -> None:
        with kvikio.CuFile(path, "w") as f:
            assert f.pwrite(src).get() == nbytes
            os.fsync(f.fileno())

    def read() -> None:
        with kvikio.CuFile(path, "r") as f:
            assert f.pread(dst).get() == nbytes

    t_write, _ = timed(write)
    drop_caches(os.path.dirname(path))
    t_cold, _ = timed(read)
    exact = bool(torch.equal(src, dst))
    warm = [gbps(nbytes, timed(read)[0]) for _ in range(WARM_PASSES)]
    backend.close()
    return {"engine": "kvikio", "io_mode": backend.io_mode, "threads": threads,
            "kvikio_threads": kvikio.defaults.get("num_threads"), "o_direct": o_direct,
            "task_MiB": task_mib, "bytes": nbytes, "exact": exact,
            "write_GBps": gbps(nbytes, t_write), "cold_read_GBps": gbps(nbytes, t_cold),
            "warm_first_read_GBps": warm[0], "warm_read_GBps": float(np.median(warm[1:])), "warm_passes_GBps": warm}


def raw_cufile(path: str, nbytes: int, threads: int) -> dict[str, Any]:
    """Bare cuFile (cuda.bindings.cufile): registered GPU buffer, O_DIRECT fd, ``threads`` slices in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from cuda.bindings import cufile

    src, dst = random_bytes(nbytes), torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    cufile.driver_open()
    props = _cufile_props(cufile)
    slices = [(i * nbytes // threads, (i + 1) * nbytes // threads) for i in range(threads)]
    for buf in (src, dst):
        cufile.buf_register(buf.data_ptr(), nbytes, 0)
    pool = ThreadPoolExecutor(threads, initializer=_bind_device, initargs=(src.device.index or 0,))

    def run(op: Callable[..., int], handle: int, buf: torch.Tensor) -> None:
        def one(span: tuple[int, int]) -> int:
            return op(handle, buf.data_ptr(), span[1] - span[0], span[0], span[0])

        done = sum(pool.map(one, slices))
        if done != nbytes:
            raise OSError(f"cuFile moved {done} of {nbytes} bytes")

    def with_handle(flags: int, fn: Callable[[int], None]) -> None:
        fd = os.open(path, flags | os.O_DIRECT, 0o644)
        descr = cufile.Descr()
        descr.type = cufile.FileHandleType.OPAQUE_FD
        descr.handle.fd = fd
        descr.fs_ops = 0
        handle = cufile.handle_register(descr.ptr)
        try:
            fn(handle)
            if flags & os.O_WRONLY:
                os.fsync(fd)
        finally:
            cufile.handle_deregister(handle)
            os.close(fd)

    t_write, _ = timed(lambda: with_handle(os.O_WRONLY | os.O_CREAT | os.O_TRUNC, lambda h: run(cufile.write, h, src)))
    drop_caches(os.path.dirname(path))
    t_cold, _ = timed(lambda: with_handle(os.O_RDONLY, lambda h: run(cufile.read, h, dst)))
    exact = bool(torch.equal(src, dst))
    t_warm, _ = timed(lambda: with_handle(os.O_RDONLY, lambda h: run(cufile.read, h, dst)))
    for buf in (src, dst):
        cufile.buf_deregister(buf.data_ptr())
    mode = "gds" if props.get("nvfs_version", "0.0") != "0.0" else "cufile-compat"
    return {"engine": "cufile", "io_mode": mode, "threads": threads, "bytes": nbytes, "exact": exact,
            "write_GBps": gbps(nbytes, t_write), "cold_read_GBps": gbps(nbytes, t_cold),
            "warm_read_GBps": gbps(nbytes, t_warm), "driver": props}


def _bind_device(index: int) -> None:
    """cuFile calls from a worker thread need the device's primary context current there."""
    from cuda.bindings import runtime

    runtime.cudaSetDevice(index)


def _cufile_props(cufile: Any) -> dict[str, Any]:
    """What the cuFile driver says about itself (nvidia-fs version: 0.0 means no nvidia-fs, so compat mode)."""
    out: dict[str, Any] = {"version": cufile.get_version()}
    try:
        props = cufile.DriverProperties() if hasattr(cufile, "DriverProperties") else cufile.DrvProps()
        cufile.driver_get_properties(props.ptr)
        nvfs = props.nvfs
        out["nvfs_version"] = f"{nvfs.major_version}.{nvfs.minor_version}"
    except Exception as exc:  # names differ across cuda-bindings releases: record, don't fail
        out["props_error"] = repr(exc)
    return out


def raw_child(args: argparse.Namespace) -> None:
    if args.engine == "cufile":
        row = raw_cufile(args.path, args.nbytes, args.threads)
    else:
        row = raw_kvikio(args.path, args.nbytes, args.threads, args.o_direct, args.task_mib)
    print("RESULT " + json.dumps(row))


def forced_compat_json(folder: str) -> dict[str, str]:
    """A copy of /etc/cufile.json with force_compat_mode on, as CUFILE_ENV_PATH_JSON (run 1: cuFile refused
    to register file handles on the lent VM, no nvidia-fs and no /run/udev)."""
    try:
        text = open("/etc/cufile.json").read()
    except OSError:
        return {}
    if '"force_compat_mode"' not in text:
        text = text.replace('"allow_compat_mode"', '"force_compat_mode": true,\n"allow_compat_mode"', 1)
    path = os.path.join(folder, "cufile-force-compat.json")
    with open(path, "w") as f:
        f.write(text)
    return {"CUFILE_ENV_PATH_JSON": path}


def run_raw_variants(folder: str, nbytes: int, threads: int, deadline_s: float) -> list[dict[str, Any]]:
    forced = forced_compat_json(folder)
    variants = [  # engine, threads (kvikio: backend and kvikio pool), extra args, environment
        ("kvikio", threads, [], {}),
        ("kvikio", threads // 2, [], {}),
        ("kvikio", 2 * threads, [], {}),
        ("kvikio", threads, ["--o-direct", "on"], {}),
        ("kvikio", threads, ["--task-mib", "16"], {}),
        # through cuFile (GPU machine only; on a driverless machine this hangs): cuFile's own compat mode
        ("kvikio", threads, [], {"KVIKIO_COMPAT_MODE": "OFF", **forced}),
        ("cufile", 1, [], forced),
        ("cufile", 2 * threads, [], forced),
    ]
    rows = []
    for engine, n, extra, env in variants:
        path = os.path.join(folder, f"raw-{engine}.bin")
        cmd = [sys.executable, os.path.abspath(__file__), "raw", "--engine", engine, "--path", path,
               "--nbytes", str(nbytes), "--threads", str(n), *extra]
        label = " ".join([f"{engine} x{n}", *extra, *(f"{k}={os.path.basename(v)}" for k, v in env.items())])
        try:
            child_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
            proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=deadline_s)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            failed = {"error": proc.stderr.strip()[-600:] or f"rc={proc.returncode}"}
            row = json.loads(lines[-1][7:]) if lines else failed
        except subprocess.TimeoutExpired:
            row = {"error": f"no result within {deadline_s:.0f} s"}
        row["variant"] = label
        rows.append(row)
        if os.path.exists(path):
            os.unlink(path)
        print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- GDSCache
def cache_shape(name: str, folder: str, total: int, threads: int, latency_n: int) -> dict[str, Any]:
    from gdscache import GDSCache

    layers, heads, dim = SHAPES[name]
    chunk_bytes = layers * 2 * CHUNK * heads * dim * 2
    n_chunks = -(-total // chunk_bytes)
    per_req = max(1, min(n_chunks, (1 * GiB) // chunk_bytes, 128))
    n_chunks = -(-n_chunks // per_req) * per_req
    nbytes = n_chunks * chunk_bytes
    kv = torch.randn(layers, 2, n_chunks * CHUNK, heads, dim, dtype=torch.bfloat16, device="cuda")
    span = per_req * CHUNK
    reqs = [(np.arange(r * span, (r + 1) * span, dtype=np.int64) + 7, slice(r * span, (r + 1) * span))
            for r in range(n_chunks // per_req)]
    row: dict[str, Any] = {"shape": name, "chunk_MiB": chunk_bytes / MiB, "chunks": n_chunks, "bytes": nbytes,
                           "chunks_per_request": per_req}
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)

    # ceiling: the same bytes as one sequential kvikio write and read, same directory and settings
    row["ceiling"] = raw_kvikio(os.path.join(folder, "ceiling.bin"), nbytes, threads)
    os.unlink(os.path.join(folder, "ceiling.bin"))
    torch.cuda.empty_cache()

    path = os.path.join(folder, "cache")
    cache = GDSCache(path=path, chunk_size=CHUNK, model_id=name, storage="gds", io_threads=threads)
    out = torch.full_like(kv, float("nan"))
    row.update(store_retrieve(cache, kv, out, reqs, folder))
    row["store_pct_of_ceiling"] = 100 * row["store_GBps"] / row["ceiling"]["write_GBps"]
    row["retrieve_pct_of_ceiling"] = 100 * row["retrieve_cold_GBps"] / row["ceiling"]["cold_read_GBps"]
    row.update(latencies(cache, kv, folder, latency_n, base=10**9))
    cache.close()
    shutil.rmtree(path, ignore_errors=True)

    row["variants"] = []
    for label, extra in VARIANTS.get(name, []):
        settings = {"path": path, "chunk_size": CHUNK, "model_id": name, "storage": "gds", "io_threads": threads}
        task_mib = extra.get("task_mib")
        settings.update({k: v for k, v in extra.items() if k != "task_mib"})
        cache = GDSCache(**settings)
        if task_mib:  # not a Config field: set on kvikio after the backend applied its defaults
            import kvikio.defaults

            kvikio.defaults.set({"task_size": task_mib * MiB})
        variant = {"variant": label, **store_retrieve(cache, kv, out, reqs, folder)}
        variant["store_pct_of_ceiling"] = 100 * variant["store_GBps"] / row["ceiling"]["write_GBps"]
        variant["retrieve_pct_of_ceiling"] = 100 * variant["retrieve_cold_GBps"] / row["ceiling"]["cold_read_GBps"]
        row["variants"].append(variant)
        cache.close()
        shutil.rmtree(path, ignore_errors=True)

    # DRAM tier: payloads held in pinned host memory, hits copied into the GPU
    dram_path = os.path.join(folder, "dram")
    cache = GDSCache(path=dram_path, chunk_size=CHUNK, model_id=name, storage="gds", io_threads=threads,
                     cpu_cache_bytes=nbytes + GiB)
    for tok, sl in reqs:
        cache.store(tok, kv[:, :, sl])
    passes = []
    for _ in range(3):
        out.fill_(float("nan"))
        t, got = timed(lambda: sum(cache.retrieve(tok, out[:, :, sl]) for tok, sl in reqs))
        passes.append(gbps(nbytes, t))
    stats = cache.stats()
    row["dram_GBps"] = float(np.median(passes))
    row["dram_passes_GBps"] = passes
    row["dram_hits"] = stats.get("dram_hits")
    row["dram_exact"] = bool(got == n_chunks * CHUNK and torch.equal(out.view(torch.int16), kv.view(torch.int16)))
    cache.close()
    shutil.rmtree(folder, ignore_errors=True)
    return row


def store_retrieve(cache: Any, kv: torch.Tensor, out: torch.Tensor, reqs: list, folder: str) -> dict[str, Any]:
    """Store every request (sync, durable unless configured), retrieve all cold, then warm ``WARM_PASSES`` times
    (the first re-read reported apart, the median of the rest as warm); check bits after every pass."""
    nbytes = kv.numel() * kv.element_size()
    row: dict[str, Any] = {"io_mode": cache.io_mode}
    t_store, row["stored_tokens"] = timed(lambda: sum(cache.store(tok, kv[:, :, sl]) for tok, sl in reqs))
    row["store_GBps"] = gbps(nbytes, t_store)
    row["drop"] = drop_caches(folder)
    passes, exact = [], []
    for _ in range(1 + WARM_PASSES):
        out.fill_(float("nan"))
        t, hits = timed(lambda: sum(cache.retrieve(tok, out[:, :, sl]) for tok, sl in reqs))
        passes.append(gbps(nbytes, t))
        exact.append(bool(hits == kv.shape[2] and torch.equal(out.view(torch.int16), kv.view(torch.int16))))
    row.update({"retrieve_cold_GBps": passes[0], "retrieve_cold_exact": exact[0],
                "retrieve_warm_first_GBps": passes[1], "retrieve_warm_GBps": float(np.median(passes[2:])),
                "retrieve_warm_passes_GBps": passes[1:], "retrieve_warm_exact": all(exact[1:])})
    return row


def latencies(cache: Any, kv: torch.Tensor, folder: str, n: int, base: int) -> dict[str, float]:
    """p50/p99 of single-chunk stores (sync, durable) and cold/warm single-chunk retrieves."""
    n = min(n, kv.shape[2] // CHUNK)
    toks = [np.arange(CHUNK, dtype=np.int64) + base + i * CHUNK for i in range(n)]
    store_s, cold_s, warm_s = [], [], []
    for i, tok in enumerate(toks):
        t, _ = timed(lambda tok=tok, i=i: cache.store(tok, kv[:, :, i * CHUNK : (i + 1) * CHUNK]))
        store_s.append(t)
    drop_caches(folder)
    out = torch.empty_like(kv[:, :, :CHUNK])
    for series in (cold_s, warm_s):
        for tok in toks:
            t, got = timed(lambda tok=tok: cache.retrieve(tok, out))
            assert got == CHUNK, "a stored chunk was not retrieved"
            series.append(t)
    return {"latency_n": n, "store_p50_ms": pct(store_s, 50), "store_p99_ms": pct(store_s, 99),
            "retrieve_cold_p50_ms": pct(cold_s, 50), "retrieve_cold_p99_ms": pct(cold_s, 99),
            "retrieve_warm_p50_ms": pct(warm_s, 50), "retrieve_warm_p99_ms": pct(warm_s, 99)}


# ---------------------------------------------------------------------------------------------- breakdown
def breakdown(name: str, folder: str, threads: int, n_chunks: int) -> dict[str, Any]:
    """Where a page-cache-warm chunk retrieve spends its time: each step alone (median ms, one thread),
    then the backend alone, backend + checksum, and GDSCache.retrieve with ``threads`` in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from gdscache import GDSCache
    from gdscache.format.chunkfile import HEADER_SIZE, PAYLOAD_OFFSET, unpack_header, verify_payload
    from io_backends.kvikio_backend import KvikioBackend

    layers, heads, dim = SHAPES[name]
    shape = (layers, 2, CHUNK, heads, dim)
    kv = torch.randn(layers, 2, n_chunks * CHUNK, heads, dim, dtype=torch.bfloat16, device="cuda")
    tokens = np.arange(n_chunks * CHUNK, dtype=np.int64) + 3
    shutil.rmtree(folder, ignore_errors=True)
    cache = GDSCache(path=folder, chunk_size=CHUNK, model_id=name, storage="gds", io_threads=threads)
    cache.store(tokens, kv)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".gdc"))
    backend = KvikioBackend(threads=threads)
    steps: dict[str, list[float]] = {"open+header": [], "read_into GPU": [], "verify (halfsum3)": [], "decode copy": []}
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")

    def read(path: str, verify: bool) -> int:
        with backend.open_read(path) as h:
            meta = unpack_header(h.read_bytes(0, HEADER_SIZE), h.size)
            payload = torch.empty(meta.payload_len, dtype=torch.uint8, device="cuda")
            h.read_into(payload, PAYLOAD_OFFSET)
        if verify:
            verify_payload(meta, payload)
        return meta.payload_len

    for path in files * 2:  # the first pass warms the page cache
        t0 = time.perf_counter()
        h = backend.open_read(path)
        meta = unpack_header(h.read_bytes(0, HEADER_SIZE), h.size)
        t1 = time.perf_counter()
        payload = torch.empty(meta.payload_len, dtype=torch.uint8, device="cuda")
        h.read_into(payload, PAYLOAD_OFFSET)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        h.close()
        verify_payload(meta, payload)
        t3 = time.perf_counter()
        out.copy_(payload.view(torch.bfloat16).view(shape))
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        for key, dt_s in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            steps[key].append(dt_s)
    row: dict[str, Any] = {"shape": name, "chunks": len(files), "io_mode": backend.io_mode,
                           "step_ms": {k: pct(v[len(files):], 50) for k, v in steps.items()}}
    nbytes = sum(os.path.getsize(p) - PAYLOAD_OFFSET for p in files)
    with ThreadPoolExecutor(threads) as pool:
        for label, verify in (("backend_GBps", False), ("backend+verify_GBps", True)):
            t, _ = timed(lambda verify=verify: list(pool.map(lambda p: read(p, verify), files)))
            row[label] = gbps(nbytes, t)
    whole = torch.empty_like(kv)
    t, got = timed(lambda: cache.retrieve(tokens, whole))
    row["gdscache_retrieve_GBps"] = gbps(nbytes, t)
    row["gdscache_exact"] = bool(got == len(tokens) and torch.equal(whole.view(torch.int16), kv.view(torch.int16)))
    backend.close()
    cache.close()
    shutil.rmtree(folder, ignore_errors=True)
    return row


# ---------------------------------------------------------------------------------------------- report
def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    meta = result["meta"]
    console.print(f"[bold]bench_gds[/] {meta['date']} on {meta['card']} | {meta['command']}")
    t = Table(title="GDSCache vs raw kvikio ceiling (GB/s; cold = page cache dropped)")
    for col in ("shape", "io_mode", "ceil W", "store", "%", "ceil R", "retrieve", "%", "ceil warm R (1st)",
                "warm R (1st)", "DRAM hit",
                "store p50/p99 ms", "cold R p50/p99 ms", "exact"):
        t.add_column(col)
    for r in result["cache"]:
        if "error" in r:
            t.add_row(r["shape"], "-", r["error"][:60])
            continue
        c = r["ceiling"]
        t.add_row(r["shape"], r["io_mode"], f"{c['write_GBps']:.2f}", f"{r['store_GBps']:.2f}",
                  f"{r['store_pct_of_ceiling']:.0f}", f"{c['cold_read_GBps']:.2f}", f"{r['retrieve_cold_GBps']:.2f}",
                  f"{r['retrieve_pct_of_ceiling']:.0f}",
                  f"{c['warm_read_GBps']:.1f} ({c['warm_first_read_GBps']:.1f})",
                  f"{r['retrieve_warm_GBps']:.1f} ({r['retrieve_warm_first_GBps']:.1f})", f"{r['dram_GBps']:.1f}",
                  f"{r['store_p50_ms']:.1f}/{r['store_p99_ms']:.1f}",
                  f"{r['retrieve_cold_p50_ms']:.1f}/{r['retrieve_cold_p99_ms']:.1f}",
                  str(r["retrieve_cold_exact"] and r["retrieve_warm_exact"] and r["dram_exact"]))
        for v in r.get("variants", []):
            t.add_row(f"  {v['variant']}", v["io_mode"], "", f"{v['store_GBps']:.2f}",
                      f"{v['store_pct_of_ceiling']:.0f}",
                      "", f"{v['retrieve_cold_GBps']:.2f}", f"{v['retrieve_pct_of_ceiling']:.0f}", "",
                      f"{v['retrieve_warm_GBps']:.1f} ({v['retrieve_warm_first_GBps']:.1f})", "", "", "",
                      str(v["retrieve_cold_exact"] and v["retrieve_warm_exact"]))
    console.print(t)
    if result.get("breakdown"):
        t = Table(title="page-cache-warm retrieve: median ms per step (1 thread), then GB/s with threads")
        for col in ("shape", "io_mode", *result["breakdown"][0]["step_ms"], "backend", "+verify", "GDSCache", "exact"):
            t.add_column(col)
        for r in result["breakdown"]:
            t.add_row(r["shape"], r["io_mode"], *(f"{v:.3f}" for v in r["step_ms"].values()),
                      f"{r['backend_GBps']:.1f}",
                      f"{r['backend+verify_GBps']:.1f}", f"{r['gdscache_retrieve_GBps']:.1f}", str(r["gdscache_exact"]))
        console.print(t)
    t = Table(title="raw engines, one file (GB/s; xN: N threads)")
    for col in ("variant", "io_mode", "write", "cold read", "warm read", "exact / error"):
        t.add_column(col)
    for r in result["raw"]:
        if "error" in r:
            t.add_row(r["variant"], "-", "-", "-", "-", r["error"][-90:].replace("\n", " "))
        else:
            t.add_row(r["variant"], r["io_mode"], f"{r['write_GBps']:.2f}", f"{r['cold_read_GBps']:.2f}",
                      f"{r['warm_read_GBps']:.2f}", str(r["exact"]))
    console.print(t)


def plot(result: dict[str, Any], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["cache"] if "error" not in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = ["ceiling W", "store", "ceiling R", "retrieve cold", "retrieve warm", "DRAM hit"]
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        vals = [r["ceiling"]["write_GBps"], r["store_GBps"], r["ceiling"]["cold_read_GBps"], r["retrieve_cold_GBps"],
                r["retrieve_warm_GBps"], r["dram_GBps"]]
        axes[0].bar(np.arange(len(labels)) + i * width, vals, width, label=f"{r['shape']} ({r['io_mode']})")
    axes[0].set_xticks(np.arange(len(labels)) + width * (len(rows) - 1) / 2, labels, rotation=20)
    axes[0].set_ylabel("GB/s")
    axes[0].set_title("GDSCache vs raw kvikio")
    axes[0].legend()
    raw = [r for r in result["raw"] if "error" not in r]
    x = np.arange(3)
    width = 0.8 / max(1, len(raw))
    for i, r in enumerate(raw):
        axes[1].bar(x + i * width, [r["write_GBps"], r["cold_read_GBps"], r["warm_read_GBps"]], width,
                    label=f"{r['variant']} ({r['io_mode']})")
    axes[1].set_xticks(x + width * (len(raw) - 1) / 2, ["write", "cold read", "warm read"])
    axes[1].set_title("raw engines")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{result['meta']['card']}, {result['meta']['date']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    raw = sub.add_parser("raw", help="one raw engine measurement (used internally, in a child process)")
    raw.add_argument("--engine", choices=["kvikio", "cufile"], required=True)
    raw.add_argument("--path", required=True)
    raw.add_argument("--nbytes", type=int, required=True)
    raw.add_argument("--threads", type=int, default=8)
    raw.add_argument("--o-direct", choices=["auto", "on", "off"], default="auto")
    raw.add_argument("--task-mib", type=int, default=4)
    parser.add_argument("--dir", default=os.path.join(REPO, ".bench", "gds"), help="directory on the storage to test")
    parser.add_argument("--total-gib", type=float, default=4.0, help="bytes per shape for store/retrieve")
    parser.add_argument("--raw-gib", type=float, default=2.0, help="file size for the raw engine comparison")
    parser.add_argument("--threads", type=int, default=8, help="io_threads and kvikio threads")
    parser.add_argument("--shapes", default="llama8b,small")
    parser.add_argument("--latency-n", type=int, default=64, help="single-chunk requests for p50/p99")
    parser.add_argument("--skip-raw", action="store_true")
    parser.add_argument("--skip-cache", action="store_true", help="skip the store/retrieve vs ceiling section")
    parser.add_argument("--breakdown", action="store_true", help="time each step of a warm chunk retrieve")
    parser.add_argument("--out", default="gds.json")
    parser.add_argument("--png", default=None)
    args = parser.parse_args()
    if args.cmd == "raw":
        raw_child(args)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_gds needs a CUDA device")
    os.makedirs(args.dir, exist_ok=True)
    result: dict[str, Any] = {"meta": machine(), "args": vars(args), "cache": [], "raw": []}
    result["meta"]["fs"] = subprocess.run(["df", "-T", args.dir], capture_output=True, text=True).stdout.strip()
    for name in args.shapes.split(",") if not args.skip_cache else []:
        try:
            result["cache"].append(cache_shape(name, os.path.join(args.dir, name), int(args.total_gib * GiB),
                                               args.threads, args.latency_n))
        except Exception as exc:  # keep the other shapes' numbers
            result["cache"].append({"shape": name, "error": repr(exc)})
        print(json.dumps(result["cache"][-1]), flush=True)
    if args.breakdown:
        result["breakdown"] = []
        for name in args.shapes.split(","):
            n = max(8, min(256, (2 * GiB) // (SHAPES[name][0] * 4 * CHUNK * SHAPES[name][1] * SHAPES[name][2])))
            result["breakdown"].append(breakdown(name, os.path.join(args.dir, f"bd-{name}"), args.threads, n))
            print(json.dumps(result["breakdown"][-1]), flush=True)
    if not args.skip_raw:
        result["raw"] = run_raw_variants(args.dir, int(args.raw_gib * GiB), args.threads, deadline_s=90)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if args.png:
        plot(result, args.png)
    report(result)


if __name__ == "__main__":
    main()
