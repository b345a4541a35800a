"""Compression ratio vs bf16 and relative L2 error per layer, on three kinds of KV, in one run.

Inputs (SmolLM2-135M's KV shape, one 256-token chunk, bf16):
- i.i.d. normal;
- structured: AR(1) token correlation (0.8) plus outlier key channels (x6 scale, +10 mean);
- real SmolLM2-135M KV of a 256-token text prefix (skipped with --no-model).
Methods: plain per-token int8 and int4 (absmax per token and head, fp16 scale, no entropy coding),
``lossless``, and ``cachegen`` over several step_scale settings (uncalibrated default profile; on
real KV also the calibrated profile). Writes JSON and a PNG of the ratio-error curves.

    python benchmarks/bench_codecs.py
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
from benchmarks.bench_fidelity import per_token_int, through_codec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (30, 2, 256, 3, 64)


def iid_normal() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def structured() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(SHAPE, generator=g)
    x = torch.empty(SHAPE)
    x[:, :, 0] = noise[:, :, 0]
    for t in range(1, SHAPE[2]):
        x[:, :, t] = 0.8 * x[:, :, t - 1] + 0.6 * noise[:, :, t]
    x[:, 0, :, :, :2] = x[:, 0, :, :, :2] * 6 + 10
    return x.to(torch.bfloat16)


def smollm2_kv() -> torch.Tensor:
    from benchmarks.smollm2 import checkpoint, evaluation_texts
    from gdscache.calibrate import load_model, prepare_window, token_windows

    model, tok = load_model(checkpoint())
    ids = token_windows(tok, evaluation_texts(), 257, 1)[0]
    return prepare_window(model, ids, 256).prefix_kv.to(torch.bfloat16)


def per_layer_rel_l2(ref: torch.Tensor, rec: torch.Tensor) -> list[float]:
    diff = (rec.float() - ref.float()).flatten(1).norm(dim=1)
    return (diff / ref.float().flatten(1).norm(dim=1).clamp_min(1e-30)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="0.5,0.75,1,1.5,2,3", help="cachegen step_scale settings")
    ap.add_argument("--profile", default=str(Path(__file__).resolve().parents[1] / ".models/smollm2-135m.profile.json"))
    ap.add_argument("--no-model", action="store_true", help="skip the real SmolLM2 KV")
    ap.add_argument("--json", default=str(RESULTS / "codecs.json"))
    ap.add_argument("--png", default=str(RESULTS / "codecs_curve.png"))
    args = ap.parse_args()
    inputs = {"iid normal": iid_normal(), "structured": structured()}
    if not args.no_model:
        inputs["SmolLM2 real KV"] = smollm2_kv()
    scales = [float(s) for s in args.scales.split(",")]
    rows = []
    for input_name, kv in inputs.items():
        methods = {"int8 per-token": lambda kv: per_token_int(kv, 8), "int4 per-token": lambda kv: per_token_int(kv, 4),
                   "lossless": lambda kv: through_codec("lossless", kv)}
        for s in scales:
            methods[f"cachegen default s={s:g}"] = lambda kv, s=s: through_codec("cachegen", kv, step_scale=s)
        if input_name == "SmolLM2 real KV" and Path(args.profile).exists():
            for s in (0.8, 1.0, 1.25, 1.5):
                methods[f"cachegen calibrated s={s:g}"] = lambda kv, s=s: through_codec(
                    "cachegen", kv, profile=args.profile, step_scale=s)
        for method, fn in methods.items():
            rec, bits = fn(kv)
            layers = per_layer_rel_l2(kv, rec)
            k_err = per_layer_rel_l2(kv[:, 0], rec[:, 0])
            rows.append({"input": input_name, "method": method, "bits_per_value": bits, "ratio_vs_bf16": 16 / bits,
                         "rel_l2": float((rec.float() - kv.float()).norm() / kv.float().norm()),
                         "rel_l2_layer_median": sorted(layers)[len(layers) // 2], "rel_l2_layer_max": max(layers),
                         "rel_l2_per_layer": layers, "rel_l2_keys_per_layer": k_err})
            print(f"{input_name:16s} {method:28s} {16 / bits:5.2f}x  rel L2 {rows[-1]['rel_l2']:.4f}", flush=True)
    _print(rows)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}",
            "command": " ".join(sys.argv), "shape": SHAPE, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(meta, indent=1))
    _plot(rows, args.png)
    print(f"wrote {args.json} and {args.png}")


def _print(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ratio vs bf16 and relative L2 error (per layer: median / max)")
    for col in ("input", "method", "ratio", "bits/value", "rel L2", "layer median", "layer max"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["input"], r["method"], f"{r['ratio_vs_bf16']:.2f}x", f"{r['bits_per_value']:.2f}",
                      f"{r['rel_l2']:.4f}", f"{r['rel_l2_layer_median']:.4f}", f"{r['rel_l2_layer_max']:.4f}")
    Console().print(table)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs = list(dict.fromkeys(r["input"] for r in rows))
    fig, axes = plt.subplots(1, len(inputs), figsize=(5 * len(inputs), 4), squeeze=False)
    for ax, name in zip(axes[0], inputs):
        mine = [r for r in rows if r["input"] == name]
        for family, style in (("cachegen default", "o-"), ("cachegen calibrated", "s-")):
            pts = sorted((r["ratio_vs_bf16"], r["rel_l2"]) for r in mine if r["method"].startswith(family))
            if pts:
                ax.plot(*zip(*pts), style, label=family)
        colors = {"int8 per-token": "C2", "int4 per-token": "C3"}
        for r in mine:
            if r["method"] in colors:
                ax.plot(r["ratio_vs_bf16"], r["rel_l2"], "x", color=colors[r["method"]], markersize=9,
                        label=r["method"])
        ax.set_yscale("log")
        ax.set_xlabel("ratio vs bf16")
        ax.set_ylabel("relative L2 error")
        ax.set_title(name + " (lossless: %.2fx, exact)" % next(r["ratio_vs_bf16"] for r in mine
                                                            if r["method"] == "lossless"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
