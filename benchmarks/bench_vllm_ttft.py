"""TTFT of vLLM (CPU) with and without a gdscache hit, in one run, with LMCache as the baseline.

    .venv-vllm/bin/python benchmarks/bench_vllm_ttft.py [--tokens 2064 4112] [--prompts 1] [--out FILE]

Each scenario is a fresh engine process (in-process vLLM, one per subprocess) on the same
random 12-layer Llama (hidden 1024, 4 KV heads of 128; scripts/make_test_models.py --preset bench):

- ``no connector``: plain vLLM; every prompt is new, so this is full prefill;
- ``gdscache miss``: the connector on an empty path (prefill plus saving);
- ``gdscache hit``: a new engine process on the path the miss run filled;
- ``lmcache miss`` / ``lmcache hit``: the same with LMCache 0.5.6 (vLLM's LMCacheConnectorV1 plus
  benchmarks/lmcache_cpu_baseline.py), its ``fs://`` tier shared across processes, chunk = block
  = 32 as its CPU copier needs. Skipped, with the reason printed, when lmcache is not installed.

Prompt lengths default to whole 256-token chunks plus a 16-token question, the shape of a
reused context; the hit covers the context, the question is computed.

TTFT is the wall time of ``generate(max_tokens=1)`` for one prompt, after a short warm-up
prompt. Prints a rich table and writes JSON with the date, machine and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
CHUNK = 256
ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "4",
}


def engine_main(spec: dict) -> None:
    """Child process: one engine, TTFT per prompt, then ``RESULT {json}``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs: dict = {
        "model": spec["model"], "skip_tokenizer_init": True, "enforce_eager": True, "dtype": "float32",
        "max_model_len": spec["max_model_len"], "block_size": BLOCK, "max_num_batched_tokens": spec["max_model_len"],
        "distributed_executor_backend": "uni", "seed": 0,
    }
    if spec["connector"] is not None:
        kwargs["kv_transfer_config"] = spec["connector"]
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=spec["warmup"])], params, use_tqdm=False)
    ttft, firsts, cached = [], [], []
    for prompt in spec["prompts"]:
        started = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        ttft.append(time.perf_counter() - started)
        firsts.append(out.outputs[0].token_ids[0])
        cached.append(out.num_cached_tokens)
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if has_kv_transfer_group():
        get_kv_transfer_group().shutdown()  # gdscache: flush queued saves before the next engine reads them
    if "LMCACHE_CONFIG_FILE" in os.environ:
        time.sleep(5)  # LMCache's connector does not forward shutdown(): let its fs:// writes land
    print("RESULT " + json.dumps({"ttft_s": ttft, "first_tokens": firsts, "num_cached_tokens": cached}), flush=True)
    os._exit(0)


def run_engine(spec: dict, extra_env: dict | None = None) -> dict:
    env = {**os.environ, **ENV, **(extra_env or {})}
    proc = subprocess.run([sys.executable, __file__, "--engine", json.dumps(spec)], capture_output=True, text=True, check=False,
                          env=env, cwd=ROOT, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"engine failed (rc={proc.returncode}):\n{proc.stderr[-5000:]}")


def lmcache_connector() -> dict:
    return {"kv_connector": "LMCacheCPUBaseline", "kv_connector_module_path": "lmcache_cpu_baseline",
            "kv_role": "kv_both"}


def lmcache_env(path: str) -> dict:
    """LMCache settings (a YAML file) for one run; keys are stable across processes with a fixed hash seed."""
    store = Path(path) / "lmcache-store"
    store.mkdir(exist_ok=True)
    cfg = Path(path) / "lmcache.yaml"
    cfg.write_text(f"chunk_size: {BLOCK}\nlocal_cpu: false\nmax_local_cpu_size: 1.0\nremote_url: fs://localhost:0{store}\n"
                   "remote_serde: naive\nsave_unfull_chunk: false\npre_caching_hash_algorithm: sha256_cbor\n")
    return {"LMCACHE_CONFIG_FILE": str(cfg), "PYTHONHASHSEED": "0"}


def gdscache_connector(path: str) -> dict:
    return {"kv_connector": "GDSCacheConnector", "kv_connector_module_path": "gdscache.integrations.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": {"path": path, "chunk_size": CHUNK, "storage": "gds"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2064, 4112], help="prompt lengths")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per length")
    parser.add_argument("--model", type=Path, default=ROOT / ".models" / "bench-llama")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm_ttft.json")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        engine_main(json.loads(args.engine))
        return

    from rich.console import Console
    from rich.table import Table

    if not (args.model / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_models.py"), str(args.model),
                        "--preset", "bench"], check=True)
    rng = random.Random(0)
    lengths = [n for n in args.tokens for _ in range(args.prompts)]
    prompts = [[rng.randrange(10, 8000) for _ in range(n)] for n in lengths]
    base = {"model": str(args.model), "max_model_len": max(lengths) + 64, "prompts": prompts,
            "warmup": [rng.randrange(10, 8000) for _ in range(64)]}
    results: dict[str, dict] = {}
    lmcache_note = None
    with tempfile.TemporaryDirectory(prefix="gdscache-bench-") as path:
        runs: list[tuple[str, dict | None, dict | None]] = [
            ("no connector", None, None), ("gdscache miss", gdscache_connector(path), None),
            ("gdscache hit", gdscache_connector(path), None)]
        if importlib.util.find_spec("lmcache") is not None:
            env = lmcache_env(path)
            runs += [("lmcache miss", lmcache_connector(), env), ("lmcache hit", lmcache_connector(), env)]
        else:
            lmcache_note = "lmcache not installed: pip install --no-deps lmcache==0.5.6 sortedcontainers aiofile aiofiles caio"
            print(lmcache_note, file=sys.stderr)
        for name, connector, extra_env in runs:
            results[name] = run_engine({**base, "connector": connector}, extra_env)
            print(f"{name}: {results[name]['ttft_s']}", file=sys.stderr)

    table = Table(title="vLLM CPU TTFT (s), random 12-layer Llama, hidden 1024, fp32")
    hits = [name for name in results if name.endswith(" hit")]
    for col in ["prompt tokens", *results, *(f"{h} tokens" for h in hits), *(f"speed-up {h}" for h in hits),
                "same first token"]:
        table.add_column(col, justify="right")
    rows = []
    for i, n in enumerate(lengths):
        plain = results["no connector"]["ttft_s"][i]
        same = all(results[name]["first_tokens"][i] == results["no connector"]["first_tokens"][i] for name in results)
        row = {"prompt_tokens": n, "ttft_s": {k: v["ttft_s"][i] for k, v in results.items()},
               "hit_tokens": {h: results[h]["num_cached_tokens"][i] for h in hits},
               "speedup": {h: plain / results[h]["ttft_s"][i] for h in hits}, "same_first_token": same}
        rows.append(row)
        table.add_row(str(n), *(f"{v['ttft_s'][i]:.3f}" for v in results.values()),
                      *(str(row["hit_tokens"][h]) for h in hits), *(f"{row['speedup'][h]:.1f}x" for h in hits),
                      str(same))
    Console(width=200).print(table)
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "env": ENV, "block_size": BLOCK, "gdscache_chunk_size": CHUNK, "lmcache_chunk_size": BLOCK,
        "load_average": os.getloadavg(), "lmcache": lmcache_note or "lmcache 0.5.6, fs:// tier", "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
