"""``gdscache gc PATH --max-size SIZE``: evict least-recently-used chunks until the directory fits SIZE.

Uses the local tier's own rules: LRU by modification time (reads refresh it), dead temp files of
crashed writers removed, files shorter than a header quarantined.
"""

from __future__ import annotations

import argparse

from gdscache.cli.common import human_bytes, print_json
from gdscache.cli.scan import cache_root, summarize
from gdscache.config import parse_size
from gdscache.tiers.local import LocalTier
from io_backends import PosixBackend


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gc", help="evict least-recently-used chunks down to a size", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="the cache directory (Config.path)")
    p.add_argument("--max-size", required=True, metavar="SIZE", help="target size, e.g. 500GB, 10GiB, 0")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    max_bytes = parse_size(args.max_size, "--max-size")
    root = cache_root(args.path)
    before = summarize(root)
    if not before.namespaces:
        raise ValueError(f"{root} holds no gdscache namespace directories; refusing to collect in it")
    backend = PosixBackend(threads=1, o_direct="off")
    try:
        tier = LocalTier(root, backend, max_bytes=max_bytes)
    finally:
        backend.close()
    result = {
        "path": root, "max_bytes": max_bytes, "chunks_before": before.chunks, "bytes_before": before.bytes,
        "chunks_after": len(tier), "bytes_after": tier.used_bytes, "evicted": tier.stats.evictions,
        "temps_removed": tier.stats.temps_removed, "quarantined": tier.stats.corrupt,
    }
    if args.json:
        print_json(result)
    else:
        print(f"{root}: {before.chunks} chunks, {human_bytes(before.bytes)} -> {len(tier)} chunks, "
              f"{human_bytes(tier.used_bytes)} (limit {human_bytes(max_bytes)}); evicted {tier.stats.evictions}, "
              f"removed {tier.stats.temps_removed} dead temp files")
    return 0
