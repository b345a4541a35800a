"""``gdscache verify PATH [--repair]``: check every chunk's header and payload checksum.

Exit status 0 when every chunk is good (or every bad one was removed with ``--repair``), 1 when
bad chunks remain.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from rich.console import Console
from rich.progress import Progress

from gdscache.cli.common import out_console, print_json
from gdscache.cli.scan import ChunkFile, cache_root, iter_chunks
from gdscache.format.chunkfile import HEADER_SIZE, PAYLOAD_OFFSET, CorruptChunk, unpack_header, verify_payload


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every chunk's header and checksum; --repair removes bad ones",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="the cache directory (Config.path)")
    p.add_argument("--repair", action="store_true", help="delete the chunks that fail (they would read as misses)")
    p.add_argument("--threads", type=int, default=4, help="files checked in parallel (default 4)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def check_chunk(chunk: ChunkFile) -> str | None:
    """Why ``chunk`` is bad, or None when its header, key, namespace and payload checksum are all right."""
    try:
        with open(chunk.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            meta = unpack_header(f.read(HEADER_SIZE), size)
            if meta.key.hex() != chunk.key:
                return f"header holds key {meta.key.hex()}, file name says {chunk.key}"
            if meta.namespace.hex() != chunk.namespace:
                return f"header holds namespace {meta.namespace.hex()}, directory says {chunk.namespace}"
            f.seek(PAYLOAD_OFFSET)
            data = bytearray(f.read(meta.payload_len))
        verify_payload(meta, torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8))
    except CorruptChunk as exc:
        return str(exc)
    except FileNotFoundError:
        return None  # evicted or replaced while we looked: nothing left to check
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return None


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    root = cache_root(args.path)
    chunks = list(iter_chunks(root))
    bad: list[tuple[ChunkFile, str]] = []
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=args.json) as progress, \
            ThreadPoolExecutor(args.threads) as pool:
        task = progress.add_task("verifying", total=len(chunks))
        for chunk, why in zip(chunks, pool.map(check_chunk, chunks)):
            progress.advance(task)
            if why is not None:
                bad.append((chunk, why))
    removed = 0
    if args.repair:
        for chunk, _ in bad:
            try:
                os.unlink(chunk.path)
                removed += 1
            except FileNotFoundError:
                removed += 1
    if args.json:
        print_json({"path": root, "checked": len(chunks), "bad": [{"path": c.path, "reason": why} for c, why in bad],
                    "removed": removed})
    else:
        out = out_console()
        for chunk, why in bad:
            out.print(f"[red]BAD[/] {chunk.path}: {why}" + (" (removed)" if args.repair else ""))
        out.print(f"checked {len(chunks)} chunks in {root}: {len(chunks) - len(bad)} good, {len(bad)} bad"
                  + (f", {removed} removed" if args.repair else ""))
    return 1 if len(bad) > removed else 0
