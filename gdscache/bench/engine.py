"""The benchmark: store and retrieve through GDSCache against the raw ceiling of the same path.

For each (chunk size, codec) it writes ``requests`` prompts of ``tokens`` tokens through
``GDSCache.store``, reads them back with ``GDSCache.retrieve`` after dropping their pages from the
page cache (cold) and again without (warm), then times single-chunk requests one at a time for
per-chunk latency.

The raw ceiling is measured in paired rounds: the prompts are split into ``rounds`` rounds, and each
round's cache operation runs next to one sequential write (or read) of the same number of bytes in one
file through the same kind of ``FileBackend`` (same O_DIRECT mode; with kvikio, kvikio's own I/O, never
``libgdscache_io``), the order alternating from round to round.
Storage whose speed drifts within minutes (a shared disk, a network filesystem) then moves both sides
of each pair alike, and the percentage of the ceiling is total raw time over total cache time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from gdscache import GDSCache
from gdscache.bench.data import kv_buffer, synthetic_kv
from gdscache.bench.models import ModelShape
from gdscache.bench.prefill import DEFAULT_TFLOPS, Prefill, estimate_prefill, measure_prefill
from gdscache.bench.sysinfo import describe, resolve_device
from gdscache.codecs import codec_names, get_codec
from gdscache.spec import KVSpec, dtype_name
from io_backends import FileBackend, Part, make_file_backend
from io_backends.base import align_up

CHUNK_SUFFIX = ".gdc"
Progress = Callable[[str, int], None]
"""``progress(description, steps_done)``: called after each step; :func:`plan_steps` says how many come."""


@dataclass
class BenchOptions:
    """Everything ``gdscache bench`` can vary; see docs/CLI.md."""

    path: str
    model: ModelShape
    dtype: torch.dtype = torch.bfloat16
    tokens: int = 4096
    chunk_sizes: list[int] = field(default_factory=lambda: [256])
    codecs: list[str] = field(default_factory=lambda: ["raw"])
    device: str = "cpu"
    storage: str = "gds"
    o_direct: str = "auto"
    threads: int = 12
    write_mode: str = "async"
    total_bytes: int = 512 << 20
    cold: bool = True
    warm: bool = True
    latency_chunks: int = 8
    rounds: int = 4
    keep: bool = False
    prefill_tflops: float = DEFAULT_TFLOPS
    seed: int = 0
    command: str | None = None

    def validate(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"--tokens must be >= 1, got {self.tokens}")
        if not self.chunk_sizes or any(c < 1 for c in self.chunk_sizes):
            raise ValueError(f"--chunk-size must be positive integers, got {self.chunk_sizes}")
        too_big = [c for c in self.chunk_sizes if c > self.tokens]
        if too_big:
            raise ValueError(f"--chunk-size {too_big[0]} exceeds --tokens {self.tokens}: a request needs whole chunks")
        if not self.codecs:
            raise ValueError("--codecs is empty")
        unknown = [c for c in self.codecs if c not in codec_names()]
        if unknown:
            raise ValueError(f"unknown codec {unknown[0]!r}; available: {', '.join(codec_names())}")
        if self.storage not in ("gds", "posix"):
            raise ValueError(f"--storage must be 'gds' or 'posix', got {self.storage!r}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.write_mode not in ("sync", "async"):
            raise ValueError(f"--write-mode must be 'sync' or 'async', got {self.write_mode!r}")
        if self.total_bytes < 1:
            raise ValueError(f"--total-size must be > 0, got {self.total_bytes}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if self.latency_chunks < 0:
            raise ValueError(f"--latency-chunks must be >= 0, got {self.latency_chunks}")
        if not (self.cold or self.warm):
            raise ValueError("nothing to measure: both cold and warm retrieval are off")
        dtype_name(self.dtype)

    @property
    def spec(self) -> KVSpec:
        return self.model.kv_spec(self.dtype)

    def requests(self) -> int:
        """Prompts per configuration: ``total_bytes`` of KV in prompts of ``tokens`` tokens, and at least one per
        paired round."""
        return max(self.rounds, round(self.total_bytes / (self.tokens * self.spec.bytes_per_token())))


def plan_steps(opts: BenchOptions) -> int:
    """Number of progress steps :func:`run_bench` reports."""
    per_config = 1 + opts.cold + opts.warm + (1 if opts.latency_chunks else 0)
    return 1 + per_config * len(opts.codecs) * len(opts.chunk_sizes)


def run_bench(opts: BenchOptions, progress: Progress | None = None) -> dict[str, object]:
    """Run every measurement and return the JSON-able report (``meta``, ``prefill``, ``results``)."""
    opts.validate()
    device = resolve_device(opts.device)
    tick = progress or (lambda _desc, _n: None)
    os.makedirs(opts.path, exist_ok=True)
    spec = opts.spec
    n_req = opts.requests()
    req_bytes = opts.tokens * spec.bytes_per_token()
    _check_space(opts, n_req * req_bytes)
    root = tempfile.mkdtemp(prefix="gdscache-bench-", dir=opts.path)
    # the raw ceiling is kvikio's own I/O (issue 3): its writes do not go through libgdscache_io
    backend = make_file_backend(opts.storage, opts.threads, opts.o_direct, root, native=False)
    try:
        meta = describe(opts.path, device, opts.command)
        kv = synthetic_kv(spec, opts.tokens, device, opts.seed)
        out = kv_buffer(spec, opts.tokens, device)
        raw = _RawFiles(backend, kv, kv_buffer(spec, opts.tokens, device), root)
        tick("synthetic KV generated", 1)
        prefills: dict[int, Prefill] = {}
        results = []
        for chunk in opts.chunk_sizes:
            req_tokens = opts.tokens // chunk * chunk
            if req_tokens not in prefills:
                prefills[req_tokens] = _prefill(opts, req_tokens, device)
            for codec in opts.codecs:
                res = _measure_config(opts, codec, chunk, kv, out, n_req, root, raw, tick)
                _relate(res, prefills[req_tokens])
                results.append(res)
        meta.update({
            "io_mode": results[0]["io_mode"] if results else backend.io_mode,
            "batch_reads": results[0]["batch_reads"] if results else backend.batch_reads,
            "batch_writes": results[0]["batch_writes"] if results else backend.batch_writes,
            "raw_io_mode": backend.io_mode,
            "raw_batch_writes": backend.batch_writes,
            "storage": opts.storage,
            "o_direct": opts.o_direct,
            "threads": opts.threads,
            "write_mode": opts.write_mode,
            "store_method": "each round's stores and the flush() that ends them are timed: in both write modes, the "
                            "time until every chunk is published (fsynced, renamed), as the raw side's one fsync",
            "model": vars(opts.model),
            "kv_dtype": dtype_name(opts.dtype),
            "bytes_per_token": spec.bytes_per_token(),
            "tokens_per_request": opts.tokens,
            "requests": n_req,
            "rounds": opts.rounds,
            "ceiling_method": "paired rounds: each round's cache operation next to a sequential write or read of the "
                              "same bytes in one file through the same backend, order alternating; % = total raw time "
                              "over total cache time",
            "kv_bytes_per_config": n_req * req_bytes,
            "latency_chunks": opts.latency_chunks,
            "cold": opts.cold,
            "warm": opts.warm,
            "cold_method": f"{type(backend).__name__}.drop_page_cache (fsync + posix_fadvise DONTNEED) per file",
            "data": "synthetic KV: smooth random walk along tokens + noise, log-normal channel scales (gdscache.bench.data)",
            "throughput_unit": "GB/s = 1e9 bytes of uncompressed KV per second",
            "kept": root if opts.keep else None,
            "load_average_end": os.getloadavg(),
        })
        return {
            "meta": meta,
            "prefill": {str(t): p.to_json() for t, p in prefills.items()},
            "results": results,
        }
    finally:
        backend.close()
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- measurements
class _RawFiles:
    """The raw side of each pair: ``copies`` times the first ``nbytes`` of the KV tensor (as many bytes as one
    request stores) in one sequential file, written and read through the benchmark's own backend. Reads land in a
    buffer of their own, never in the cache's ``out``."""

    def __init__(self, backend: FileBackend, kv: torch.Tensor, dest: torch.Tensor, root: str) -> None:
        self.backend = backend
        self.src = kv.reshape(-1).view(torch.uint8)
        self.dest = dest.reshape(-1).view(torch.uint8).fill_(_POISON)
        self.root = root

    def path(self, label: str, round_no: int) -> str:
        return os.path.join(self.root, f"raw-{label}-round{round_no}.bin")

    def write(self, path: str, copies: int, nbytes: int) -> None:
        step = align_up(nbytes)  # copies 4 KiB apart, as O_DIRECT needs them
        self.backend.write_file(path, [Part(i * step, self.src[:nbytes]) for i in range(copies)], durable=True)

    def read(self, path: str, copies: int, nbytes: int) -> None:
        step = align_up(nbytes)
        with self.backend.open_read(path) as handle:
            for i in range(copies):
                handle.read_into(self.dest[:nbytes], i * step)

    def verify(self, path: str, nbytes: int) -> None:
        if not torch.equal(self.dest[:nbytes], self.src[:nbytes]):
            raise RuntimeError(f"raw ceiling read back different bytes from {path}: the storage path is broken")
        self.dest.fill_(_POISON)  # the next raw read must bring every byte again to pass


_POISON = 0x5A


RoundFn = Callable[[int, list[int]], None]
"""``fn(round_no, request_indices)``: one side of one round."""


def _paired(rounds: list[list[int]], raw_side: RoundFn, cache_side: RoundFn, device: torch.device,
            after_raw: Callable[[int], None] = lambda _r: None) -> list[tuple[float, float]]:
    """(raw seconds, cache seconds) per round; even rounds run the raw side first, odd rounds the cache side."""
    pairs = []
    for r, idx in enumerate(rounds):
        sides = [(raw_side, True), (cache_side, False)]
        took = {}
        for fn, is_raw in sides if r % 2 == 0 else sides[::-1]:
            took[is_raw] = _timed(lambda fn=fn, r=r, idx=idx: fn(r, idx), device)
            if is_raw:
                after_raw(r)
        pairs.append((took[True], took[False]))
    return pairs


def _paired_op(pairs: list[tuple[float, float]], rounds: list[list[int]], nbytes: int,
               tokens: int) -> tuple[dict[str, object], float]:
    """The cache operation's totals with its % of the raw side (both sides move the same bytes, so total raw time
    over total cache time), the % round by round, and the raw side's GB/s. ``nbytes`` and ``tokens`` are per
    request."""
    n = sum(len(idx) for idx in rounds)
    raw_s, cache_s = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    op: dict[str, object] = dict(_op([cache_s], n * nbytes, n * tokens))
    op["pct_of_raw"] = 100.0 * raw_s / cache_s
    op["pct_by_round"] = [100.0 * r / c for (r, c) in pairs]
    return op, n * nbytes / raw_s / 1e9


def _measure_config(opts: BenchOptions, codec: str, chunk: int, kv: torch.Tensor, out: torch.Tensor, n_req: int,
                    root: str, raw: _RawFiles, tick: Progress) -> dict[str, object]:
    req_tokens = opts.tokens // chunk * chunk
    cfg_dir = os.path.join(root, f"{codec}-chunk{chunk}")
    rng = np.random.default_rng([opts.seed, chunk])
    prompts = [_prompt(rng, req_tokens) for _ in range(n_req)]
    singles = [_prompt(rng, chunk) for _ in range(opts.latency_chunks)]
    src, dst = kv[:, :, :req_tokens], out[:, :, :req_tokens]
    label = f"{codec} chunk={chunk}"
    res: dict[str, object] = {"codec": codec, "chunk_size": chunk, "request_tokens": req_tokens, "requests": n_req}
    req_bytes = req_tokens * opts.spec.bytes_per_token()
    rounds = [idx.tolist() for idx in np.array_split(np.arange(n_req), opts.rounds)]
    raw_paths = [raw.path(f"{codec}-chunk{chunk}", r) for r in range(len(rounds))]
    ceiling: dict[str, object] = {"bytes": n_req * req_bytes, "io_mode": raw.backend.io_mode, "rounds": len(rounds)}
    res["raw"] = ceiling

    try:
        with GDSCache(path=cfg_dir, chunk_size=chunk, model_id=f"gdscache-bench/{opts.model.name}",
                      storage=opts.storage, codec=codec, io_threads=opts.threads, o_direct=opts.o_direct,
                      write_mode=opts.write_mode) as cache:

            def stores(_r: int, idx: list[int]) -> None:
                for i in idx:
                    _expect(cache.store(prompts[i], src), req_tokens, "store")
                cache.flush()

            def retrieves(_r: int, idx: list[int]) -> None:
                for i in idx:
                    _expect(cache.retrieve(prompts[i], dst), req_tokens, "retrieve")

            pairs = _paired(rounds, lambda r, idx: raw.write(raw_paths[r], len(idx), req_bytes), stores, kv.device)
            _expect_written(cache)
            res["store"], ceiling["write_gbps"] = _paired_op(pairs, rounds, req_bytes, req_tokens)
            res["stored_bytes"] = int(cache.stats().get("bytes_written", 0))
            res["ratio"] = n_req * req_bytes / res["stored_bytes"] if res["stored_bytes"] else None
            tick(f"{label}: store", 1)
            for temp, wanted in (("cold", opts.cold), ("warm", opts.warm)):
                if not wanted:
                    continue
                if temp == "cold":
                    _drop_all(raw.backend, cfg_dir)
                    for path in raw_paths:
                        raw.backend.drop_page_cache(path)
                pairs = _paired(rounds, lambda r, idx: raw.read(raw_paths[r], len(idx), req_bytes), retrieves,
                                kv.device, after_raw=lambda r: raw.verify(raw_paths[r], req_bytes))
                res[f"retrieve_{temp}"], ceiling[f"read_{temp}_gbps"] = _paired_op(pairs, rounds, req_bytes,
                                                                                   req_tokens)
                tick(f"{label}: retrieve {temp}", 1)
            res["check"] = _check(codec, src, dst)
            if singles:
                res["latency_ms"] = _latencies(opts, cache, kv, out, chunk, singles, raw.backend, cfg_dir)
                tick(f"{label}: per-chunk latency", 1)
            res["io_mode"] = cache.io_mode
            stats = cache.stats()
            res["batch_reads"], res["batch_writes"] = stats["batch_reads"], stats["batch_writes"]
    finally:
        for path in raw_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raw.backend.forget(path)
    if not opts.keep:
        shutil.rmtree(cfg_dir, ignore_errors=True)
    return res


def _latencies(opts: BenchOptions, cache: GDSCache, kv: torch.Tensor, out: torch.Tensor, chunk: int,
               singles: list[np.ndarray], backend: FileBackend, cfg_dir: str) -> dict[str, dict[str, float]]:
    """p50/p99 of single-chunk requests, one at a time: store (until published: ``flush()`` included), then
    retrieve cold and warm."""
    one, one_out = kv[:, :, :chunk], out[:, :, :chunk]

    def store(prompt: np.ndarray) -> None:
        _expect(cache.store(prompt, one), chunk, "store")
        cache.flush()

    lat = {"store": [_timed(lambda p=p: store(p), kv.device) for p in singles]}
    _expect_written(cache)
    for temp, wanted in (("cold", opts.cold), ("warm", opts.warm)):
        if wanted:
            if temp == "cold":
                _drop_all(backend, cfg_dir)
            lat[f"retrieve_{temp}"] = [
                _timed(lambda p=p: _expect(cache.retrieve(p, one_out), chunk, "retrieve"), kv.device) for p in singles
            ]
    return {op: _percentiles(v) for op, v in lat.items()}


def _relate(res: dict, prefill: Prefill) -> None:
    """Add the TTFT comparison: retrieving one prompt against prefilling it."""
    op = res.get("retrieve_cold") or res.get("retrieve_warm")
    retrieve_s = op["seconds"] / res["requests"]
    res["ttft"] = {
        "tokens": res["request_tokens"],
        "prefill_s": prefill.seconds,
        "prefill_method": prefill.method,
        "retrieve_s": retrieve_s,
        "retrieve_from": "cold" if "retrieve_cold" in res else "warm",
        "saved_s": prefill.seconds - retrieve_s,
        "speedup": prefill.seconds / retrieve_s if retrieve_s > 0 else None,
    }


def _prefill(opts: BenchOptions, tokens: int, device: torch.device) -> Prefill:
    if device.type != "cuda":
        return estimate_prefill(opts.model, tokens, opts.prefill_tflops)
    try:
        return measure_prefill(opts.model, tokens, device, opts.dtype)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        est = estimate_prefill(opts.model, tokens, opts.prefill_tflops)
        return Prefill(est.seconds, est.method, "forward pass ran out of GPU memory; " + est.detail)


# ---------------------------------------------------------------------- helpers
def _check_space(opts: BenchOptions, per_config: int) -> None:
    """Refuse to start when the filesystem cannot hold what the run writes at its peak."""
    configs = len(opts.codecs) * len(opts.chunk_sizes)
    singles = opts.latency_chunks * max(opts.chunk_sizes) * opts.spec.bytes_per_token()
    need = (per_config + singles) * (configs if opts.keep else 1) + per_config  # + the raw ceiling's file
    free = shutil.disk_usage(opts.path).free
    if need > free * 0.9:
        raise ValueError(
            f"{opts.path} has {free / 1e9:.2f} GB free but the benchmark needs ~{need / 1e9:.2f} GB; "
            "lower --total-size or --tokens"
        )


def _prompt(rng: np.random.Generator, tokens: int) -> np.ndarray:
    return rng.integers(0, 1 << 31, size=tokens, dtype=np.int64)


def _expect(got: int, want: int, op: str) -> None:
    if got != want:
        raise RuntimeError(f"{op} handled {got} of {want} tokens: the cache missed or failed (see warnings above)")


def _expect_written(cache: GDSCache) -> None:
    """Every chunk stored so far was published (in async mode ``store()`` counts the chunks it accepted)."""
    failed = cache.stats().get("chunk_write_failures", 0)
    if failed:
        raise RuntimeError(f"{failed} chunk write(s) failed (see warnings above): the storage path is broken")


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    start = _now(device)
    fn()
    return _now(device) - start


def _op(times: list[float], nbytes: int, tokens: int) -> dict[str, float]:
    total = sum(times)
    return {"seconds": total, "gbps": nbytes / total / 1e9, "tokens_per_s": tokens / total}


def _percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1e3
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "n": len(samples)}


def _chunk_files(root: str) -> Iterator[str]:
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(CHUNK_SUFFIX):
                yield os.path.join(dirpath, name)


def _drop_all(backend: FileBackend, root: str) -> None:
    for path in _chunk_files(root):
        backend.drop_page_cache(path)


def _check(codec: str, src: torch.Tensor, got: torch.Tensor) -> dict[str, object]:
    """Bit-exactness for lossless codecs; max error relative to the largest |value| for lossy ones."""
    if get_codec(codec).lossless:
        return {"lossless": True, "exact": bool(torch.equal(src, got))}
    worst = peak = 0.0
    for layer in range(src.shape[0]):
        a, b = src[layer].float(), got[layer].float()
        worst = max(worst, float((a - b).abs().max()))
        peak = max(peak, float(a.abs().max()))
    return {"lossless": False, "max_abs_err": worst, "max_rel_err": worst / peak if peak else 0.0}
