"""Fidelity of lossy KV codecs on SmolLM2-135M (offline; see benchmarks/smollm2.py).

For each text window: prefill the first ``--chunk`` tokens, store that KV as bf16 through the codec
(real payload bytes), decode it, score the next ``--score`` tokens with the decoded cache and compare
against the exact cache: perplexity change (pooled NLL), top-1 agreement and mean KL. Baselines in
the same run: bf16 storage alone and plain per-token int8 / int4 (absmax per token and head).

    python benchmarks/bench_fidelity.py --profile .models/smollm2-135m.profile.json --windows 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.smollm2 import checkpoint, evaluation_texts  # noqa: E402
from gdscache.calibrate import _score, load_model, prepare_window, token_windows  # noqa: E402
from gdscache.codecs import get_codec  # noqa: E402
from gdscache.spec import KVSpec  # noqa: E402


def per_token_int(kv: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """Plain symmetric per-(token, head) absmax quantization with an fp16 scale: (KV, bits/value)."""
    levels = 2 ** (bits - 1) - 1
    scale = kv.float().abs().amax(-1, keepdim=True).clamp_min(1e-30) / levels
    return (torch.round(kv.float() / scale) * scale).to(kv.dtype), bits + 16 / kv.shape[-1]


def through_codec(name: str, kv: torch.Tensor, **params) -> tuple[torch.Tensor, float]:
    codec = get_codec(name, **params)
    payload = codec.encode(kv)
    out = torch.empty_like(kv)
    codec.decode(payload, KVSpec.of(kv), kv.shape[2], out)
    return out, payload.numel() * 8 / kv.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=str(Path(__file__).resolve().parents[1] / ".models/smollm2-135m.profile.json"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--score", type=int, default=256)
    ap.add_argument("--scales", default="0.8,1,1.25", help="step_scale values for the calibrated curve")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "fidelity.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(checkpoint())
    ids = token_windows(tok, evaluation_texts(), args.chunk + args.score, args.windows)
    settings: dict[str, callable] = {
        "bf16 (raw codec)": lambda kv: (kv, 16.0),
        "int8 per-token": lambda kv: per_token_int(kv, 8),
        "int4 per-token": lambda kv: per_token_int(kv, 4),
        "cachegen uncalibrated default": lambda kv: through_codec("cachegen", kv),
    }
    if Path(args.profile).exists():
        for s in (float(v) for v in args.scales.split(",")):
            label = "cachegen calibrated default" if s == 1 else f"cachegen calibrated step_scale={s:g}"
            settings[label] = lambda kv, s=s: through_codec("cachegen", kv, profile=args.profile, step_scale=s)
    acc = {k: {"nll": 0.0, "agree": 0, "kl": 0.0, "bits": 0.0, "agree_w": []} for k in settings}
    ref_nll, n_tok = 0.0, 0
    t0 = time.time()
    for wi, w_ids in enumerate(ids):
        w = prepare_window(model, w_ids, args.chunk)
        targets = w.rest[0, 1:]
        ref = w.logp[:-1]
        ref_nll += float(-ref.gather(1, targets[:, None]).sum())
        n = len(targets)
        n_tok += n
        kv16 = w.prefix_kv.to(torch.bfloat16)
        for label, fn in settings.items():
            rec, bits = fn(kv16)
            logp = _score(model, rec.float(), w.rest)[:-1]
            a = acc[label]
            a["nll"] += float(-logp.gather(1, targets[:, None]).sum())
            agree = int((logp.argmax(-1) == ref.argmax(-1)).sum())
            a["agree"] += agree
            a["agree_w"].append(agree / n)
            a["kl"] += float((ref.exp() * (ref - logp)).sum())
            a["bits"] += bits / len(ids)
        print(f"window {wi + 1}/{len(ids)} done ({time.time() - t0:.0f} s)", flush=True)
    ppl_ref = math.exp(ref_nll / n_tok)
    rows = []
    for label, a in acc.items():
        p = a["agree"] / n_tok
        per_w = torch.tensor(a["agree_w"])
        rows.append({"setting": label, "bits_per_value": a["bits"], "ratio_vs_bf16": 16 / a["bits"],
                     "ppl_change_pct": 100 * (math.exp(a["nll"] / n_tok) / ppl_ref - 1), "top1_agreement": p,
                     "agreement_se": math.sqrt(p * (1 - p) / n_tok),
                     "agreement_window_min": float(per_w.min()), "mean_kl": a["kl"] / n_tok})
    _print(rows, ppl_ref, n_tok, len(ids))
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}",
           "command": " ".join(sys.argv), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32)",
           "windows": len(ids), "scored_tokens": n_tok, "ppl_exact_cache": ppl_ref, "profile": args.profile,
           "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


def _print(rows: list[dict], ppl: float, n_tok: int, windows: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SmolLM2-135M, {windows} windows, {n_tok} scored tokens, exact-cache ppl {ppl:.3f}")
    for col in ("setting", "bits/value", "ratio vs bf16", "ppl change", "top-1 agree (±se)", "worst window", "KL"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["setting"], f"{r['bits_per_value']:.2f}", f"{r['ratio_vs_bf16']:.2f}x",
                      f"{r['ppl_change_pct']:+.2f}%", f"{r['top1_agreement']:.3f} ± {r['agreement_se']:.3f}",
                      f"{r['agreement_window_min']:.3f}", f"{r['mean_kl']:.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()
