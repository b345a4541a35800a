"""gdscache bench --path DIR: does gdscache fit this storage and this GPU?

Stores and retrieves model-shaped KV through GDSCache for each codec and chunk size, cold (page
cache dropped per file) and warm, and compares each throughput with the raw ceiling of the same
path measured in the same run: sequential writes and reads of the same bytes through the same I/O
backend, in rounds interleaved with the cache's (--rounds). Reports per-chunk latency, the I/O mode
that ran, the device, the filesystem, and the time to first token saved against prefill. Files go to
a fresh subdirectory of DIR, removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gdscache.bench import BenchOptions, plan_steps, resolve_model, run_bench
from gdscache.bench.models import ALIASES, PRESETS
from gdscache.bench.prefill import DEFAULT_TFLOPS
from gdscache.bench.report import plot, render, write_json
from gdscache.cli.common import out_console
from gdscache.codecs import codec_names
from gdscache.config import parse_size
from gdscache.spec import parse_dtype

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "float8_e4m3fn"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure store/retrieve throughput on a path against its raw ceiling",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default=".", help="directory on the storage to test (default: the current directory)")
    g = p.add_argument_group("model shape")
    g.add_argument("--model", default="llama-8b", metavar="PRESET",
                   help=f"one of {', '.join([*PRESETS, *ALIASES])} (default llama-8b)")
    g.add_argument("--layers", type=int, help="override the number of layers")
    g.add_argument("--kv-heads", type=int, help="override the number of KV heads")
    g.add_argument("--head-dim", type=int, help="override the head dimension")
    g.add_argument("--q-heads", type=int, help="query heads (for prefill; default keeps the preset's group size)")
    g.add_argument("--hidden-size", type=int, help="hidden size (for prefill; default q-heads x head-dim)")
    g.add_argument("--intermediate-size", type=int, help="MLP width (for prefill; default keeps the preset's ratio)")
    g.add_argument("--dtype", default="bf16", help=f"KV dtype: {', '.join(DTYPES)} (default bf16)")
    w = p.add_argument_group("workload")
    w.add_argument("--tokens", type=int, default=4096, help="tokens per request (default 4096)")
    w.add_argument("--chunk-size", default="256", metavar="N[,N...]", help="tokens per chunk, a comma list (default 256)")
    w.add_argument("--codecs", metavar="NAME[,NAME...]",
                   help=f"comma list of {', '.join(codec_names())} (default: all on CUDA; raw on CPU, where the "
                        "other codecs run their slow reference implementations)")
    w.add_argument("--total-size", default="512MiB", metavar="SIZE",
                   help="KV bytes per configuration, at least one request per round (default 512MiB; raise it "
                        "on fast storage)")
    w.add_argument("--rounds", type=int, default=4,
                   help="paired rounds: the requests are split into this many, each timed next to a raw write or "
                        "read of as many bytes (default 4)")
    w.add_argument("--latency-chunks", type=int, default=8, help="single-chunk requests timed for latency (default 8)")
    t = w.add_mutually_exclusive_group()
    t.add_argument("--cold", action="store_true", help="only cold retrieval (page cache dropped per file)")
    t.add_argument("--warm", action="store_true", help="only warm retrieval")
    w.add_argument("--seed", type=int, default=0, help="seed of the synthetic KV and token ids")
    s = p.add_argument_group("system")
    s.add_argument("--device", default="auto", help="cuda, cpu, or auto: cuda when available (default)")
    s.add_argument("--storage", choices=("gds", "posix"),
                   help="gds: kvikio/cuFile (GPUDirect or its compat mode); posix: pread/pwrite "
                        "(default gds on CUDA, posix on CPU)")
    s.add_argument("--o-direct", default="auto", choices=("auto", "on", "off"), help="POSIX O_DIRECT (default auto)")
    s.add_argument("--threads", type=int, default=12, help="parallel file operations (default 12)")
    s.add_argument("--write-mode", default="async", choices=("sync", "async"),
                   help="the cache's write_mode: async returns from store() before the files are published, sync "
                        "after; each round's flush() is timed, so both measure until published (default async)")
    s.add_argument("--prefill-tflops", type=float, default=DEFAULT_TFLOPS,
                   help=f"assumed TFLOP/s for the prefill estimate when not on CUDA (default {DEFAULT_TFLOPS:g})")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    o.add_argument("--plot", metavar="FILE.png", help="write a PNG: throughput by codec and chunk size")
    o.add_argument("--keep", action="store_true", help="keep the chunk files (their directory is printed)")
    p.set_defaults(func=run)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


def options_from(args: argparse.Namespace, argv: list[str] | None = None) -> BenchOptions:
    model = resolve_model(args.model, layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
                          q_heads=args.q_heads, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device.startswith("cuda")
    if args.codecs is not None:
        codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    else:
        codecs = codec_names() if on_gpu else ["raw"]
    argv = sys.argv[1:] if argv is None else argv
    return BenchOptions(
        path=args.path, model=model, dtype=parse_dtype(DTYPES.get(args.dtype, args.dtype)), tokens=args.tokens,
        chunk_sizes=_ints(args.chunk_size, "--chunk-size"), codecs=codecs, device=device,
        storage=args.storage or ("gds" if on_gpu else "posix"),
        o_direct=args.o_direct, threads=args.threads, write_mode=args.write_mode,
        total_bytes=parse_size(args.total_size, "--total-size") or 0,
        cold=not args.warm, warm=not args.cold, latency_chunks=args.latency_chunks, rounds=args.rounds,
        keep=args.keep,
        prefill_tflops=args.prefill_tflops, seed=args.seed, command=shlex.join(["gdscache", *argv]),
    )


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before a long run, not after it: output directories must exist, --plot needs matplotlib."""
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{flag} {path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'gdscache[plot]'") from None


def run(args: argparse.Namespace) -> int:
    opts = options_from(args, getattr(args, "argv", None))
    opts.validate()
    _check_outputs(args)
    err = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("starting", total=plan_steps(opts))
        report = run_bench(opts, lambda desc, n: progress.update(task, advance=n, description=desc))
    render(report, out_console())
    if args.json:
        write_json(report, args.json)
        err.print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        err.print(f"wrote {args.plot}")
    return 0
