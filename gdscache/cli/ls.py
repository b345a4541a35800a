"""``gdscache ls PATH``: the fingerprints (models) in a cache directory, with chunk counts, bytes and ages."""

from __future__ import annotations

import argparse

from rich.table import Table

from gdscache.cli.common import human_bytes, human_time, iso_time, out_console, print_json
from gdscache.cli.scan import Namespace, cache_root, iter_chunks, summarize


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list fingerprints (models) and their chunks in a cache directory",
                       description=__doc__)
    p.add_argument("path", help="the cache directory (Config.path)")
    p.add_argument("--chunks", action="store_true", help="list every chunk file instead of one row per fingerprint")
    p.add_argument("--namespace", metavar="HEX", help="only the fingerprint whose namespace starts with HEX")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _describe(ns: Namespace) -> dict[str, object]:
    info = ns.info or {}
    kv = info.get("kv", {})
    return {
        "namespace": ns.hex,
        "model_id": info.get("model_id"),
        "dtype": kv.get("dtype"),
        "shape": [kv.get("num_layers"), kv.get("kv_planes"), kv.get("num_kv_heads"), kv.get("head_dim")] if kv else None,
        "chunk_size": info.get("chunk_size"),
        "codec": info.get("codec"),
        "codec_params": info.get("codec_params"),
        "tp": f"{info.get('tp_rank')}/{info.get('tp_size')}" if "tp_size" in info else None,
        "layout": info.get("layout"),
        "chunks": ns.chunks,
        "bytes": ns.bytes,
        "oldest": iso_time(ns.oldest),
        "newest": iso_time(ns.newest),
    }


def run(args: argparse.Namespace) -> int:
    root = cache_root(args.path)
    if args.chunks:
        chunks = list(iter_chunks(root, args.namespace))
        if args.json:
            print_json([{"namespace": c.namespace, "key": c.key, "bytes": c.size, "mtime": iso_time(c.mtime),
                         "path": c.path} for c in chunks])
            return 0
        table = Table(title=f"{len(chunks)} chunk files in {root}")
        for col in ("namespace", "key", "size", "modified"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for c in chunks:
            table.add_row(c.namespace[:12], c.key, human_bytes(c.size), human_time(c.mtime))
        out_console().print(table)
        return 0
    namespaces = [ns for ns in summarize(root).namespaces if args.namespace is None or ns.hex.startswith(args.namespace)]
    rows = [_describe(ns) for ns in namespaces]
    if args.json:
        print_json(rows)
        return 0
    table = Table(title=f"{len(rows)} fingerprint(s) in {root}")
    for col in ("namespace", "model", "dtype", "shape L,P,H,D", "chunk", "codec", "TP", "chunks", "size", "oldest",
                "newest"):
        table.add_column(col, justify="right" if col in ("chunks", "size", "chunk") else "left")
    for ns, row in zip(namespaces, rows):
        table.add_row(
            ns.hex[:12], str(row["model_id"] or "?"), str(row["dtype"] or "?"),
            ",".join(str(x) for x in row["shape"]) if row["shape"] else "?", str(row["chunk_size"] or "?"),
            str(row["codec"] or "?"), str(row["tp"] or "?"), str(ns.chunks), human_bytes(ns.bytes),
            human_time(ns.oldest), human_time(ns.newest),
        )
    out_console().print(table)
    return 0
