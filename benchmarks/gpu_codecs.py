"""Codec throughput on the GPU, in GB/s of bf16 KV, against the memory-bandwidth floor.

Per chunk shape (SmolLM2-135M and a Llama-3-8B-sized chunk of 256 tokens) and codec: full
``encode`` (including its host syncs) and ``decode`` into a preallocated tensor, timed with CUDA
events over repeats after warm-up. Baseline in the same run: a device-to-device copy of the same
bytes (``out.copy_(kv)``: one read + one write, the floor for any pass over the KV). For cachegen
the encode stages are timed too, to show what limits it.

    python benchmarks/gpu_codecs.py --json $OUT/gpu_codecs.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gdscache.codecs import _cuda, cachegen, get_codec, rans  # noqa: E402
from gdscache.integrations.vllm.layout import PageFormat, PagedKV  # noqa: E402
from gdscache.spec import KVSpec  # noqa: E402

SHAPES = {"smollm2-135m": (30, 2, 256, 3, 64), "llama3-8b": (32, 2, 256, 8, 128)}


def structured_kv(shape: tuple[int, ...], device: str) -> torch.Tensor:
    """Token-correlated KV with outlier key channels (the same recipe as bench_codecs.py)."""
    layers, planes, tokens, heads, dim = shape
    g = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn(shape, generator=g, device=device)
    x = torch.empty(shape, device=device)
    x[:, :, 0] = noise[:, :, 0]
    for t in range(1, tokens):
        x[:, :, t] = 0.8 * x[:, :, t - 1] + 0.6 * noise[:, :, t]
    x[:, 0, :, :, : max(1, dim // 32)] = x[:, 0, :, :, : max(1, dim // 32)] * 6 + 10
    return x.to(torch.bfloat16)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default="gpu_codecs.json")
    ap.add_argument("--batch", type=int, default=16, help="chunks per encode_many / decode_many call (one prompt)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = []
    for shape_name, shape in SHAPES.items():
        kv = structured_kv(shape, "cuda")
        nbytes = kv.numel() * 2
        spec = KVSpec.of(kv)
        out = torch.empty_like(kv)
        copy_s = timed(lambda: out.copy_(kv), args.repeats)
        rows.append({"shape": shape_name, "codec": "d2d copy (floor)", "op": "copy", "gbps": nbytes / copy_s / 1e9,
                     "ms": copy_s * 1e3, "ratio": 1.0})
        for name, params in (("raw", {}), ("lossless", {}), ("cachegen", {})):
            codec = get_codec(name, **params)
            payload = codec.encode(kv)
            enc_s = timed(lambda: codec.encode(kv), args.repeats)
            dec_s = timed(lambda: codec.decode(payload, spec, shape[2], out), args.repeats)
            for op, sec in (("encode", enc_s), ("decode", dec_s)):
                rows.append({"shape": shape_name, "codec": name, "op": op, "gbps": nbytes / sec / 1e9,
                             "ms": sec * 1e3, "ratio": nbytes / payload.numel()})
        rows += cachegen_stages(kv, shape_name, args.repeats)
        rows += cachegen_batch(shape, shape_name, args.batch, args.repeats)
    gpu = torch.cuda.get_device_name()
    _print(rows, gpu)
    Path(args.json).write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}, {gpu}, torch {torch.__version__}", "kernels": _cuda.available(),
        "command": " ".join(sys.argv), "rows": rows}, indent=1))


def cachegen_stages(kv: torch.Tensor, shape_name: str, repeats: int) -> list[dict]:
    """Time each kernel of cachegen encode on its own (no host syncs, no payload assembly)."""
    codec = get_codec("cachegen")
    sw = codec._step_table(KVSpec.of(kv), kv.device)
    flag = torch.zeros(1, dtype=torch.int32, device=kv.device)
    base, rel = cachegen._kernel_scales(kv, flag)
    q = _cuda.cachegen_quantize(kv, base, rel, sw, cachegen.QMAX)
    nrows, _, channels = q.shape
    mu = torch.empty((nrows, channels), dtype=torch.int8, device=kv.device)
    table = torch.empty((nrows, channels), dtype=torch.uint8, device=kv.device)
    cost = cachegen._cost(kv.device, kernel=True)

    def stats() -> None:
        _cuda.cachegen_stats(q, cost, len(cachegen._FREQ), cachegen.ALPHABET, cachegen.QMAX, cachegen.OFFSET, mu,
                             table)

    stats()
    group = rans.pick_group(channels, 8)
    lengths = torch.empty(nrows * channels // group, dtype=torch.int32, device=kv.device)
    tab32, tables = table.to(torch.int32), cachegen._TABLES.on(kv.device)
    stages = {
        "scale codes + base/rel kernels": lambda: cachegen._kernel_scales(kv, flag),
        "quantize kernel": lambda: _cuda.cachegen_quantize(kv, base, rel, sw, cachegen.QMAX),
        "channel stats kernel": stats,
        "rANS encode kernel": lambda: _cuda.rans_encode_streams(q, tab32, tables, group, mu, cachegen.OFFSET, lengths),
    }
    spec, out = KVSpec.of(kv), torch.empty_like(kv)
    parsed = codec.parse(codec.encode(kv), spec, kv.shape[2])
    stages["fused decode kernel + its one sync (no header parsing)"] = lambda: codec._decode_kernels([parsed], spec, [out])
    nbytes = kv.numel() * 2
    rows = []
    for label, fn in stages.items():
        sec = timed(fn, repeats)
        rows.append({"shape": shape_name, "codec": "cachegen stage", "op": label, "gbps": nbytes / sec / 1e9,
                     "ms": sec * 1e3, "ratio": None})
    return rows


def cachegen_batch(shape: tuple[int, ...], shape_name: str, batch: int, repeats: int) -> list[dict]:
    """encode_many / decode_many of ``batch`` distinct consecutive chunks (a 4096-token prompt at 16 x 256)."""
    layers, planes, tokens, heads, dim = shape
    kv = structured_kv((layers, planes, batch * tokens, heads, dim), "cuda")
    chunks = [kv[:, :, k * tokens:(k + 1) * tokens] for k in range(batch)]
    out = torch.empty_like(kv)
    outs = [out[:, :, k * tokens:(k + 1) * tokens] for k in range(batch)]
    codec, spec = get_codec("cachegen"), KVSpec.of(kv)
    payloads = codec.encode_many(chunks)
    assert codec.decode_many(payloads, spec, tokens, outs) == [None] * batch
    nbytes = kv.numel() * 2
    ratio = nbytes / sum(p.numel() for p in payloads)
    rows = []
    # The unfused alternative cost: vLLM's paged cache (16-token blocks, K|V packed) to and from [L, 2, T, H, D].
    block = 16
    pages = torch.zeros((layers, 4 * batch * tokens // block, heads, block, 2 * dim), dtype=kv.dtype, device="cuda")
    pager = PagedKV(list(pages), PageFormat("kv_packed", heads, dim, block), pages.shape[1])
    block_ids = torch.randperm(pages.shape[1])[: batch * tokens // block].tolist()
    pager.scatter(block_ids, kv)
    # Fused: the kernels read and write the blocks in place (KVPages), the same bytes as from the chunks.
    paged = pager.pages(block_ids)
    paged_chunks = [paged.tokens(k * tokens, (k + 1) * tokens) for k in range(batch)]
    assert all(torch.equal(a, b) for a, b in zip(codec.encode_many(paged_chunks), payloads, strict=True))
    assert codec.decode_many(payloads, spec, tokens, paged_chunks) == [None] * batch
    assert torch.equal(pager.gather(block_ids), out)
    for op, fn in ((f"encode_many x{batch}", lambda: codec.encode_many(chunks)),
                   (f"decode_many x{batch}", lambda: codec.decode_many(payloads, spec, tokens, outs)),
                   (f"paged gather x{batch} (vLLM blocks -> chunks)", lambda: pager.gather(block_ids)),
                   (f"paged scatter x{batch} (chunks -> vLLM blocks)", lambda: pager.scatter(block_ids, kv)),
                   (f"encode_many x{batch} from vLLM blocks (fused)", lambda: codec.encode_many(paged_chunks)),
                   (f"decode_many x{batch} into vLLM blocks (fused)",
                    lambda: codec.decode_many(payloads, spec, tokens, paged_chunks))):
        sec = timed(fn, repeats)
        rows.append({"shape": shape_name, "codec": "cachegen" if "_many" in op else "layout", "op": op,
                     "gbps": nbytes / sec / 1e9, "ms": sec * 1e3 / batch, "ratio": ratio if "_many" in op else None})
    return rows


def _print(rows: list[dict], gpu: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"codec throughput, GB/s of bf16 KV, {gpu}")
    for col in ("chunk", "codec", "op", "GB/s", "ms per chunk", "ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["shape"], r["codec"], r["op"], f"{r['gbps']:.1f}", f"{r['ms']:.3f}",
                      "" if r["ratio"] is None else f"{r['ratio']:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
