"""Offline vLLM with gdscache: run it twice; the second run loads the prompt's KV instead of recomputing it.

    python examples/vllm_offline.py MODEL_DIR [--path /mnt/weka/kv]

MODEL_DIR is any local HF Llama-family checkpoint with a tokenizer, e.g. the one
``python scripts/make_test_models.py .models/smollm2-135m --smollm2`` writes.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # CPU builds: GiB of KV cache (else 92% of RAM)

from vllm import LLM, SamplingParams

PROMPT = (
    "You are a careful assistant. Here is a long shared context that many requests reuse: "
    + " ".join(f"Fact {i}: the store on street {i} opens at {7 + i % 5} o'clock." for i in range(120))
    + "\nQuestion: when does the store on street 42 open?\nAnswer:"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--path", default="/tmp/gdscache-example", help="gdscache directory (NVMe, WEKA, ...)")
    args = parser.parse_args()
    llm = LLM(
        model=args.model,
        max_model_len=4096,
        enforce_eager=True,
        kv_transfer_config={
            "kv_connector": "GDSCacheConnector",
            "kv_connector_module_path": "gdscache.integrations.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"storage": "gds", "path": args.path, "chunk_size": 256},
        },
    )
    started = time.perf_counter()
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16))[0]
    elapsed = time.perf_counter() - started
    print(f"{len(out.prompt_token_ids)} prompt tokens, {out.num_cached_tokens} loaded from cache, {elapsed:.2f} s")
    print(repr(out.outputs[0].text))


if __name__ == "__main__":
    main()
