"""A child process for the multi-process tests: `python kv_worker.py MODE PATH [ARGS...]`.

KV values are a pure function of (seed, token ids), so any process can check any chunk.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from gdscache import GDSCache

CHUNK = 16
SHAPE = dict(layers=2, heads=2, dim=8)


def kv_for(tokens: list[int]) -> torch.Tensor:
    """Deterministic KV whose values depend on each token's whole prefix."""
    out = torch.empty(SHAPE["layers"], 2, len(tokens), SHAPE["heads"], SHAPE["dim"], dtype=torch.bfloat16)
    for c in range(0, len(tokens), CHUNK):
        seed = sum((i + 1) * t for i, t in enumerate(tokens[: c + CHUNK])) % (2**31)
        g = torch.Generator().manual_seed(seed)
        out[:, :, c : c + CHUNK] = torch.randn(out[:, :, c : c + CHUNK].shape, generator=g).to(torch.bfloat16)
    return out


def prompt(i: int, n_chunks: int) -> list[int]:
    """Prompt i: chunks shared with other prompts for the first i % 3 chunks."""
    shared = i % 3
    return [7] * (shared * CHUNK) + [i * 1000 + t for t in range((n_chunks - shared) * CHUNK)]


def meet(barrier: str, tag: str, parties: int) -> None:
    """Wait until ``parties`` workers have reached ``tag`` (a file each in the folder ``barrier``)."""
    open(os.path.join(barrier, f"{tag}.{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 120
    while sum(name.startswith(f"{tag}.") for name in os.listdir(barrier)) < parties:
        if time.monotonic() > deadline:
            raise SystemExit(f"the other workers never reached {tag}")
        time.sleep(0.005)


def main() -> None:
    mode, path, *args = sys.argv[1:]
    cache = GDSCache(path=path, chunk_size=CHUNK, model_id="worker", **json.loads(args[0]) if args else {})
    if mode == "store-forever":  # the crash test kills this process at a random moment
        i = 0
        while True:
            toks = prompt(i, 4)
            cache.store(toks, kv_for(toks))
            print(i, flush=True)
            i += 1
    elif mode == "mixed":  # store and retrieve overlapping prompts, report any wrong value
        # ARGS: config JSON, rounds, a folder and a count: every round starts once that many workers reach it there
        rounds, barrier, parties = int(args[1]), args[2], int(args[3])
        bad = 0
        hits = 0
        for round_ in range(rounds):
            meet(barrier, f"round{round_}", parties)  # so the workers' rounds overlap, whatever the scheduler does
            for i in range(6):
                toks = prompt(i, 3)
                ref = kv_for(toks)
                cache.store(toks, ref)
                out = torch.zeros_like(ref)
                n = cache.retrieve(toks, out)
                hits += n
                bad += int(not torch.equal(out[:, :, :n], ref[:, :, :n]))
        print(json.dumps({"bad": bad, "hits": hits}))
    cache.close()


if __name__ == "__main__":
    main()
