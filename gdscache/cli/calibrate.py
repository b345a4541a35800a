"""``gdscache calibrate MODEL_DIR --text FILE --out PROFILE``: measure a cachegen codec profile for a model.

Runs the model on the text, measures how sensitive the next-token distribution is to quantizing
each (layer, K/V) tensor, and writes a profile for ``Config.codec_profile``. Needs transformers
(and gguf for a GGUF checkpoint).
"""

from __future__ import annotations

import argparse
import importlib
import os

from gdscache.cli.common import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure a cachegen codec profile for a model checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a Hugging Face checkpoint directory (or the directory of a GGUF file)")
    p.add_argument("--text", action="append", required=True, metavar="FILE",
                   help="calibration text file (repeat for several)")
    p.add_argument("--out", required=True, metavar="PROFILE", help="where to write the profile (JSON)")
    p.add_argument("--gguf-file", metavar="NAME", help="GGUF file name inside MODEL_DIR")
    p.add_argument("--target-kl", type=float, help="mean next-token KL the default setting aims at")
    p.add_argument("--chunk-tokens", type=int, help="context tokens per calibration window")
    p.add_argument("--score-tokens", type=int, help="continuation tokens scored per window")
    p.add_argument("--windows", type=int, help="number of calibration windows")
    p.set_defaults(func=run)


def _load():
    try:
        module = importlib.import_module("gdscache.calibrate")
    except ImportError as exc:
        raise CLIError(
            f"calibration is unavailable: {exc}. It needs the gdscache.calibrate module and transformers "
            "(pip install transformers; plus gguf for GGUF checkpoints)", code=1
        ) from None
    fn = getattr(module, "calibrate", None)
    if not callable(fn):
        raise CLIError("gdscache.calibrate has no calibrate() function in this build", code=1)
    return fn


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.model_dir):
        raise ValueError(f"{args.model_dir}: no such model directory")
    for text in args.text:
        if not os.path.isfile(text):
            raise ValueError(f"--text {text}: no such file")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {args.out}: directory {out_dir} does not exist")
    for name in ("chunk_tokens", "score_tokens", "windows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    calibrate = _load()
    options = {k: getattr(args, k) for k in ("gguf_file", "target_kl", "chunk_tokens", "score_tokens", "windows")
               if getattr(args, k) is not None}
    calibrate(args.model_dir, args.text, args.out, **options)
    return 0
