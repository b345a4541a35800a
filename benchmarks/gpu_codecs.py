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
    gpu = torch.cuda.get_device_name()
    _print(rows, gpu)
    Path(args.json).write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}, {gpu}, torch {torch.__version__}", "kernels": _cuda.available(),
        "command": " ".join(sys.argv), "rows": rows}, indent=1))


def cachegen_stages(kv: torch.Tensor, shape_name: str, repeats: int) -> list[dict]:
    """Time each kernel stage of cachegen encode on its own."""
    codec = get_codec("cachegen")
    sw = codec._step_table(KVSpec.of(kv), kv.device)
    base, rel = cachegen._base_rel(_cuda.cachegen_codes(kv))
    code = cachegen._full_code(base, rel).contiguous()
    q = _cuda.cachegen_quantize(kv, code, sw, cachegen.QMAX)
    cost = cachegen._cost(kv.device, kernel=True)
    mu, table = _cuda.cachegen_stats(q.view(-1, kv.shape[2], q.shape[-1]), cost, cachegen.QMAX, cachegen.OFFSET)
    q3 = q.view(-1, kv.shape[2], q.shape[-1])
    group = rans.pick_group(q3.shape[2], 8)
    stages = {
        "scale codes kernel + base/rel (torch)": lambda: cachegen._base_rel(_cuda.cachegen_codes(kv)),
        "quantize kernel": lambda: _cuda.cachegen_quantize(kv, code, sw, cachegen.QMAX),
        "channel stats kernel": lambda: _cuda.cachegen_stats(q3, cost, cachegen.QMAX, cachegen.OFFSET),
        "rANS encode + compact (1 sync)": lambda: rans.encode(q3, table, cachegen._TABLES, group, mu=mu,
                                                              offset=cachegen.OFFSET),
    }
    nbytes = kv.numel() * 2
    rows = []
    for label, fn in stages.items():
        sec = timed(fn, repeats)
        rows.append({"shape": shape_name, "codec": "cachegen stage", "op": label, "gbps": nbytes / sec / 1e9,
                     "ms": sec * 1e3, "ratio": None})
    return rows


def _print(rows: list[dict], gpu: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"codec throughput, GB/s of bf16 KV, {gpu}")
    for col in ("chunk", "codec", "op", "GB/s", "ms/chunk", "ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["shape"], r["codec"], r["op"], f"{r['gbps']:.1f}", f"{r['ms']:.3f}",
                      "" if r["ratio"] is None else f"{r['ratio']:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
