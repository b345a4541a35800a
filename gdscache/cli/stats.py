"""``gdscache stats PATH``: totals for a cache directory (chunks, bytes, models, ages, leftovers, free space)."""

from __future__ import annotations

import argparse
import shutil

from rich.table import Table

from gdscache.bench.sysinfo import filesystem_of
from gdscache.cli.common import human_bytes, human_iso, iso_time, out_console, print_json
from gdscache.cli.scan import cache_root, summarize


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="totals for a cache directory", description=__doc__)
    p.add_argument("path", help="the cache directory (Config.path)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def collect(root: str) -> dict[str, object]:
    s = summarize(root)
    oldest = [ns.oldest for ns in s.namespaces if ns.oldest is not None]
    newest = [ns.newest for ns in s.namespaces if ns.newest is not None]
    models = sorted({str((ns.info or {}).get("model_id", "?")) for ns in s.namespaces})
    usage = shutil.disk_usage(root)
    return {
        "path": root,
        "chunks": s.chunks,
        "bytes": s.bytes,
        "namespaces": len(s.namespaces),
        "models": models,
        "oldest": iso_time(min(oldest)) if oldest else None,
        "newest": iso_time(max(newest)) if newest else None,
        "temp_files": s.temp_files,
        "quarantined_files": s.quarantined_files,
        "quarantined_bytes": s.quarantined_bytes,
        "filesystem": filesystem_of(root)["fstype"],
        "disk_free_bytes": usage.free,
    }


def run(args: argparse.Namespace) -> int:
    data = collect(cache_root(args.path))
    if args.json:
        print_json(data)
        return 0
    table = Table(title=f"gdscache stats {data['path']}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("chunks", f"{data['chunks']:,}")
    table.add_row("bytes", f"{human_bytes(data['bytes'])} ({data['bytes']:,})")
    table.add_row("fingerprints", str(data["namespaces"]))
    table.add_row("models", ", ".join(data["models"]) or "-")
    table.add_row("oldest chunk", human_iso(data["oldest"]))
    table.add_row("newest chunk", human_iso(data["newest"]))
    table.add_row("temp files (writes in progress or dead)", str(data["temp_files"]))
    table.add_row("quarantined", f"{data['quarantined_files']} files, {human_bytes(data['quarantined_bytes'])}")
    table.add_row("filesystem", f"{data['filesystem']}, {human_bytes(data['disk_free_bytes'])} free")
    out_console().print(table)
    return 0
