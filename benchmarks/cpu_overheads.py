"""CPU cost per call of pieces of Python on every request: turning a token list into an array (the vLLM connector
passes lists), hashing a request's chunk keys (per key), packing a chunk header (once per chunk stored) and checking one (once per chunk read): one kept from
an earlier read of its key, and one past those kept (a warm working set of ``CYCLED`` chunks, more than any tree
keeps, so that every header read was let go since its last read).

    python benchmarks/cpu_overheads.py                     # this tree; a numpy array of tokens is the baseline
    python benchmarks/cpu_overheads.py --against 55f8787   # the same calls, also from that revision's modules

The calls take turns over 7 rounds; each round's figure is the best of 3 repeats, in microseconds per call, and
the median of the rounds is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from gdscache import keys
from gdscache.format import chunkfile
from gdscache.spec import KVSpec

TOKENS = 4096
CHUNK = 256
ROUNDS = 7
CYCLED = 8192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", metavar="REV", help="a git revision whose keys.py and chunkfile.py to time too")
    args = parser.parse_args()
    tokens = np.random.default_rng(0).integers(0, 128_000, TOKENS)
    as_list = tokens.tolist()
    meta = chunkfile.ChunkMeta(b"k" * 16, b"n" * 16, KVSpec(16, 2, 1, 64, torch.bfloat16), 256, "raw", {}, 1 << 20,
                               2, b"d" * 24)
    kept = chunkfile.pack_header(meta) + b"\0"  # sliced per call: a header read is a new object
    cycled = [chunkfile.pack_header(dataclasses.replace(meta, key=i.to_bytes(16, "little"), created=1.7e9 + i / 7))
              for i in range(CYCLED)]
    sides = [("this tree", keys, chunkfile)]
    if args.against:
        sides.append((args.against, _module_at(args.against, "gdscache/keys.py"),
                      _module_at(args.against, "gdscache/format/chunkfile.py")))
    calls: dict[str, tuple[Callable[[], object], int]] = {
        f"as_token_array(numpy array of {TOKENS})": (lambda: keys.as_token_array(tokens), 2000)}
    for label, keys_module, chunkfile_module in sides:
        if chunkfile_module.pack_header(meta) != chunkfile.pack_header(meta):
            raise SystemExit(f"{label}: pack_header writes other bytes than this tree")
        calls[f"as_token_array(list of {TOKENS}), {label}"] = (lambda m=keys_module: m.as_token_array(as_list), 200)
        calls[f"chunk keys of {TOKENS} tokens, per key, {label}"] = (
            lambda m=keys_module: m.chunk_keys(b"n" * 16, m.as_token_array(tokens), CHUNK), 500)
        calls[f"pack_header, {label}"] = (lambda m=chunkfile_module: m.pack_header(meta), 20000)
        calls[f"unpack_header kept, {label}"] = (
            lambda m=chunkfile_module: m.unpack_header(kept[: chunkfile.HEADER_SIZE]), 20000)
        cycle = itertools.cycle(cycled)  # one per side: each side lets go of its own headers
        calls[f"unpack_header past those kept, {label}"] = (
            lambda m=chunkfile_module, c=cycle: m.unpack_header(next(c)), 2000)
    group = np.frombuffer(b"".join(cycled[:64]), dtype=np.uint8).reshape(64, chunkfile.HEADER_SIZE)
    group_keys = [chunkfile.unpack_header(header).key for header in cycled[:64]]
    calls["unpack_headers of 64 kept (a GPU read's group), per header, this tree"] = (
        lambda: chunkfile.unpack_headers(group_keys, group, [1 << 21] * 64), 500)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_no in range(ROUNDS):  # the calls take turns, in alternating order, so that drift falls on all alike
        for name, (fn, number) in calls.items() if round_no % 2 == 0 else reversed(calls.items()):
            times[name].append(min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6)
    for name, samples in times.items():
        per = 64 if name.startswith("unpack_headers") else TOKENS // CHUNK if name.startswith("chunk keys") else 1
        print(f"{name:<45} median {np.median(samples) / per:8.2f} us  "
              f"(rounds: {' '.join(f'{t / per:.2f}' for t in samples)})")


def _module_at(rev: str, path: str) -> ModuleType:
    """``path`` as it was at git revision ``rev``, imported under a name of its own."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout
    name = f"{Path(path).stem}_{rev}"
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
