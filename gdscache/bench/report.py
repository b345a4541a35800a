"""Presenting a benchmark report: rich tables, JSON, and a PNG plot."""

from __future__ import annotations

import json
import os

from rich.console import Console
from rich.table import Table

OPS = (("store", "write_gbps", "store"), ("retrieve_cold", "read_cold_gbps", "retrieve cold"),
       ("retrieve_warm", "read_warm_gbps", "retrieve warm"))


def _gbps(op: dict | None) -> str:
    if not op:
        return "-"
    pct = op.get("pct_of_raw")
    return f"{op['gbps']:.2f} ({pct:.0f}%)" if pct is not None else f"{op['gbps']:.2f}"


def _ms(lat: dict | None, op: str) -> str:
    entry = (lat or {}).get(op)
    return f"{entry['p50']:.1f} / {entry['p99']:.1f}" if entry else "-"


def _check(check: dict) -> str:
    if check.get("lossless"):
        return "bit-exact" if check["exact"] else "MISMATCH"
    return f"max rel err {check['max_rel_err']:.2e}"


def render(report: dict, console: Console) -> None:
    """Print the header facts, the raw ceiling, the throughput table and the latency/TTFT table."""
    meta = report["meta"]
    fs = meta["filesystem"]
    model = meta["model"]
    console.print(
        f"[bold]gdscache bench[/] {meta['date']} on {meta['host']} ({meta['cpu_count']} CPUs, load average "
        f"{meta['load_average_start'][0]:.1f} at start, {meta['load_average_end'][0]:.1f} at end)\n"
        f"path {meta['path']}  filesystem [bold]{fs['fstype']}[/] ({fs['source']} on {fs['mount_point']})\n"
        f"device [bold]{meta['device']}[/] ({meta['device_name']})  storage={meta['storage']}  "
        f"io_mode=[bold]{meta['io_mode']}[/]  batch_reads={meta['batch_reads']}  batch_writes={meta['batch_writes']}  "
        f"threads={meta['threads']}  write_mode={meta['write_mode']} (stores timed until published)\n"
        f"model {model['name']}: {model['num_layers']} layers, {model['num_kv_heads']} KV heads, head_dim "
        f"{model['head_dim']}, {meta['kv_dtype']} = {meta['bytes_per_token'] / 1024:.0f} KiB/token; "
        f"{meta['requests']} request(s) x {meta['tokens_per_request']} tokens = "
        f"{meta['kv_bytes_per_config'] / 2**20:.0f} MiB per configuration"
    )
    results = report["results"]
    ceiling = Table(title=f"raw ceiling: sequential files through the same backend ({meta['raw_io_mode']}, "
                          f"batch_writes={meta['raw_batch_writes']}), in "
                          f"{meta['rounds']} round(s) paired with the cache's")
    ceiling.add_column("codec")
    ceiling.add_column("chunk", justify="right")
    ops = [(op, key, name) for op, key, name in OPS if any(key in r["raw"] for r in results)]
    for _, _, name in ops:
        ceiling.add_column(f"{name.replace('store', 'write').replace('retrieve', 'read')} GB/s", justify="right")
    for _, _, name in ops:
        ceiling.add_column(f"{name} % by round", justify="right")
    for res in results:
        ceiling.add_row(res["codec"], str(res["chunk_size"]), *[f"{res['raw'][key]:.2f}" for _, key, _ in ops],
                        *[" ".join(f"{p:.0f}" for p in res[op]["pct_by_round"]) for op, _, _ in ops])
    console.print(ceiling)

    table = Table(title="throughput: GB/s of uncompressed KV (% of the raw ceiling)")
    for col in ("codec", "chunk", "ratio", "store", "retrieve cold", "retrieve warm", "tokens/s (retrieve)", "check"):
        table.add_column(col, justify="left" if col in ("codec", "check") else "right")
    for res in results:
        best = res.get("retrieve_cold") or res.get("retrieve_warm")
        table.add_row(
            res["codec"], str(res["chunk_size"]), f"{res['ratio']:.2f}x" if res.get("ratio") else "-",
            _gbps(res.get("store")), _gbps(res.get("retrieve_cold")), _gbps(res.get("retrieve_warm")),
            f"{best['tokens_per_s']:,.0f}", _check(res["check"]),
        )
    console.print(table)

    lat = Table(title="per-chunk latency p50 / p99 ms (single-chunk requests, one at a time) and TTFT")
    for col in ("codec", "chunk", "store", "retrieve cold", "retrieve warm", "prefill", "retrieve", "TTFT saved"):
        lat.add_column(col, justify="left" if col == "codec" else "right")
    for res in report["results"]:
        ttft = res["ttft"]
        saved = ttft["saved_s"] * 1e3
        lat.add_row(
            res["codec"], str(res["chunk_size"]),
            _ms(res.get("latency_ms"), "store"), _ms(res.get("latency_ms"), "retrieve_cold"),
            _ms(res.get("latency_ms"), "retrieve_warm"),
            f"{ttft['prefill_s'] * 1e3:.0f} ms ({ttft['prefill_method']})",
            f"{ttft['retrieve_s'] * 1e3:.0f} ms ({ttft['retrieve_from']})",
            f"[green]{saved:.0f} ms ({ttft['speedup']:.1f}x)[/]" if saved > 0 else f"[red]{saved:.0f} ms (slower)[/]",
        )
    console.print(lat)
    for tokens, prefill in report["prefill"].items():
        console.print(f"prefill of {tokens} tokens {prefill['method']}: {prefill['detail']}")
    if meta.get("kept"):
        console.print(f"files kept in {meta['kept']}")


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def plot(report: dict, path: str) -> None:
    """Grouped bars: one panel per operation, groups by chunk size, one bar per codec; a black line across each bar
    marks the raw ceiling paired with it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    ops = [(op, key, name) for op, key, name in OPS if any(op in r for r in results)]
    chunks = sorted({r["chunk_size"] for r in results})
    codecs = list(dict.fromkeys(r["codec"] for r in results))
    width = 0.8 / len(codecs)
    fig, axes = plt.subplots(1, len(ops), figsize=(4.5 * len(ops), 4), squeeze=False, sharey=True)
    for ax, (op, key, name) in zip(axes[0], ops):
        for i, codec in enumerate(codecs):
            found = [next((r for r in results if r["codec"] == codec and r["chunk_size"] == c), None) for c in chunks]
            xs = [x + i * width for x in range(len(chunks))]
            bars = ax.bar(xs, [r[op]["gbps"] if r else 0.0 for r in found], width, label=codec)
            ax.bar_label(bars, fmt="%.2f", fontsize="x-small")
            ceil = [(x, r["raw"][key]) for x, r in zip(xs, found) if r and key in r["raw"]]
            ax.hlines([v for _, v in ceil], [x - width / 2 for x, _ in ceil], [x + width / 2 for x, _ in ceil],
                      colors="black", label="raw ceiling (paired)" if i == 0 else None)
        ax.set_xticks([x + width * (len(codecs) - 1) / 2 for x in range(len(chunks))], [str(c) for c in chunks])
        ax.set_xlabel("chunk size (tokens)")
        ax.set_title(name)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("GB/s of uncompressed KV")
    meta = report["meta"]
    fig.suptitle(f"gdscache bench: {meta['model']['name']}, {meta['device']}, {meta['io_mode']} on "
                 f"{meta['filesystem']['fstype']} ({meta['date'][:10]})", fontsize="medium")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
