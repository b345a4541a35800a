"""Measure a ``cachegen`` profile for one model: a step per (layer, K/V) tensor and key-channel weights.

Method (../shared/KV_FIDELITY.md: equal KL per tensor, key channels weighted by 1/RMS of the query):
on calibration text, prefill a chunk of context and score the next tokens. The diagonal Fisher
information of the next-token distributions with respect to every cached K/V element (squared
gradients of log-likelihoods of tokens sampled from the model itself) predicts the KL that
quantization noise of variance ``(step * weight * scale)**2 / 12`` adds: ``KL = sens * step**2``
per tensor. Steps are set so every tensor adds equal KL, key weights are kept where they lower the
predicted KL, and finally all steps are scaled together so the real quantizer costs ``target_kl``
on the whole cache (measured, not predicted).

Needs ``transformers`` (and ``gguf`` for a GGUF checkpoint); the codec itself does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gdscache.codecs.cachegen import dequantize, quantize
from gdscache.codecs.profile import CodecProfile

DEFAULT_TARGET_KL = 0.0024
WEIGHT_RANGE = (0.25, 4.0)
STEP_RANGE = (0.008, 0.5)  # beyond 0.5 of the absmax a tensor is mostly zeroed and KL stops being quadratic


@dataclass
class Window:
    """One text window: exact KV of the prefix and the log-probs of the continuation under it."""

    prefix_kv: torch.Tensor  # [L, 2, T, H, D] float32
    rest: torch.Tensor  # [1, N] token ids
    logp: torch.Tensor  # [N, vocab] exact log-probs


def load_model(model_dir: str | Path, gguf_file: str | None = None):
    """(model, tokenizer) in float32 eval mode, from an HF checkpoint dir (or a GGUF file in it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs).eval()
    model.requires_grad_(False)
    return model, tok


def token_windows(tok, texts: Sequence[str], length: int, count: int) -> list[torch.Tensor]:
    """Up to ``count`` disjoint windows of ``length`` tokens, taken round-robin from ``texts``."""
    streams = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    windows, pos = [], [0] * len(streams)
    while len(windows) < count and any(p + length <= len(s) for p, s in zip(pos, streams)):
        for i, s in enumerate(streams):
            if len(windows) < count and pos[i] + length <= len(s):
                windows.append(s[pos[i]:pos[i] + length].unsqueeze(0))
                pos[i] += length
    return windows


def _cache_from(kv: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0].permute(1, 0, 2).unsqueeze(0).contiguous(),
                     kv[layer, 1].permute(1, 0, 2).unsqueeze(0).contiguous(), layer)
    return cache


@torch.inference_mode()
def prepare_window(model, ids: torch.Tensor, prefix: int) -> Window:
    out = model(ids[:, :prefix], use_cache=True)
    cache = out.past_key_values
    kv = torch.stack([torch.stack([cache.layers[i].keys[0], cache.layers[i].values[0]]) for i in range(len(cache.layers))])
    kv = kv.permute(0, 1, 3, 2, 4).contiguous()  # [L, 2, T, H, D]
    rest = ids[:, prefix:]
    logp = _score(model, kv, rest)
    return Window(kv, rest, logp)


@torch.inference_mode()
def _score(model, kv: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Log-probs of the positions after the prefix: the last prefix token's prediction is dropped
    (it was computed with the exact cache), the continuation is scored under ``kv``."""
    logits = model(rest, past_key_values=_cache_from(kv), use_cache=True).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Mean per-token KL(ref || test) of two log-prob tables."""
    return float((ref.exp() * (ref - test)).sum(-1).mean())


def reconstruct(kv: torch.Tensor, sw: np.ndarray) -> torch.Tensor:
    """KV after the cachegen quantizer (entropy coding is lossless and skipped here)."""
    q, base, rel = quantize(kv, torch.from_numpy(sw))
    out = torch.empty_like(kv)
    dequantize(q, base, rel, torch.from_numpy(sw), out)
    return out


def query_channel_rms(model, windows: Sequence[torch.Tensor]) -> np.ndarray:
    """``[L, H_kv * D]`` RMS of the (pre-RoPE) query per channel, pooled over RoPE pairs and the
    query heads sharing each KV head."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    sums = [torch.zeros(heads, dim, dtype=torch.float64) for _ in model.model.layers]
    count = [0]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(_m, _inp, out, i=i):
            q = out[0].double().view(-1, heads, dim)
            sums[i] += (q * q).sum(0)
            if i == 0:
                count[0] += q.shape[0]
        hooks.append(layer.self_attn.q_proj.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for ids in windows:
                model(ids)
    finally:
        for h in hooks:
            h.remove()
    rms = []
    for s in sums:
        ms = s / count[0]
        pair = (ms[:, : dim // 2] + ms[:, dim // 2:]) / 2
        ms = torch.cat([pair, pair], dim=1).view(kv_heads, heads // kv_heads, dim).mean(1)
        rms.append(ms.sqrt().reshape(-1).numpy())
    return np.stack(rms)


def key_weights(rms: np.ndarray) -> np.ndarray:
    """Channel weights ∝ 1/RMS(query), geometric mean 1, clipped to ``WEIGHT_RANGE``."""
    w = 1.0 / np.maximum(rms, 1e-6 * rms.max())
    w = w / np.exp(np.log(w).mean(axis=-1, keepdims=True))
    return np.clip(w, *WEIGHT_RANGE)


def fisher_diagonal(model, w: Window, samples: int) -> torch.Tensor:
    """``[L, 2, T, H, D]`` sum over scored positions of E[(d log p(y) / d kv)**2], y ~ model."""
    kv = w.prefix_kv.clone().requires_grad_(True)
    logits = model(w.rest.clone(), past_key_values=_cache_from(kv), use_cache=True).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros_like(kv)
    for i in range(samples):
        y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
        (grad,) = torch.autograd.grad(logp.gather(1, y).sum(), kv, retain_graph=i < samples - 1)
        total += grad * grad
    return total / samples


def _scale_squared(kv: torch.Tensor) -> torch.Tensor:
    """Per (layer, plane, token, head) squared absmax, broadcast over head_dim."""
    return kv.abs().amax(-1, keepdim=True).pow(2).expand_as(kv)


def _sensitivity(fisher: torch.Tensor, scale2: torch.Tensor, weights: np.ndarray, scored: int) -> np.ndarray:
    """Predicted mean KL per unit step**2, per (layer, plane): 0.5 * sum F * (w * scale)**2 / 12 / N."""
    layers, planes, _, heads, dim = fisher.shape
    w2 = torch.from_numpy(weights).float().view(layers, planes, 1, heads, dim).pow(2)
    return (0.5 / 12 / scored * (fisher * scale2 * w2).sum(dim=(2, 3, 4))).double().numpy()


def _sw(steps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return CodecProfile(steps, weights).step_table(1.0)


def calibrate(model_dir: str | Path, text_files: Sequence[str | Path], out_path: str | Path, *,
              gguf_file: str | None = None, target_kl: float = DEFAULT_TARGET_KL, chunk_tokens: int = 256,
              score_tokens: int = 256, windows: int = 4, samples: int = 4, log=print) -> CodecProfile:
    """Measure a profile for the model at ``model_dir`` on ``text_files`` and save it to ``out_path``.

    ``target_kl`` is the mean next-token KL the default setting (``step_scale=1``) aims at. Top-1
    agreement 0.97 sits near KL 0.002-0.003 (../shared/KV_FIDELITY.md); on SmolLM2-135M a target of
    0.0015 gave 0.981 agreement at 3.87x, and steps 1.25x coarser (~KL 0.0023) 0.979 at 4.18x
    (benchmarks/results/codecs.md). Returns the profile.
    """
    if target_kl <= 0:
        raise ValueError(f"target_kl must be > 0, got {target_kl}")
    texts = [Path(f).read_text(errors="replace") for f in text_files]
    model, tok = load_model(model_dir, gguf_file)
    ids = token_windows(tok, texts, chunk_tokens + score_tokens, windows)
    if not ids:
        raise ValueError(f"calibration text holds fewer than {chunk_tokens + score_tokens} tokens")
    data = [prepare_window(model, w, chunk_tokens) for w in ids]
    layers, planes, _, heads, dim = data[0].prefix_kv.shape
    log(f"calibrating {layers} layers x {planes} planes on {len(data)} windows")
    weights_k = key_weights(query_channel_rms(model, ids))

    def mean_kl(steps: np.ndarray, weights: np.ndarray) -> float:
        sw = _sw(steps, weights)
        return sum(kl(w.logp, _score(model, reconstruct(w.prefix_kv, sw), w.rest)) for w in data) / len(data)

    fisher = sum(fisher_diagonal(model, w, samples) for w in data) / len(data)
    scale2 = sum(_scale_squared(w.prefix_kv) for w in data) / len(data)
    ones = np.ones((layers, planes, heads * dim))
    weights = ones.copy()
    sens = _sensitivity(fisher, scale2, ones, score_tokens)
    with_w = _sensitivity(fisher, scale2, np.concatenate([weights_k[:, None], ones[:, 1:]], axis=1), score_tokens)
    use = with_w[:, 0] < sens[:, 0]
    weights[use, 0] = weights_k[use]
    sens[use, 0] = with_w[use, 0]
    log(f"key channel weights kept on {int(use.sum())}/{layers} layers; most sensitive tensors: "
        + ", ".join(f"L{i // planes}{'KV'[i % planes]}" for i in np.argsort(-sens.ravel())[:4]))
    steps = np.clip(np.sqrt((target_kl / sens.size) / sens), *STEP_RANGE)
    for _ in range(2):  # KL is not quite additive: rescale all steps to hit the target on the whole cache
        measured = mean_kl(steps, weights)
        steps = np.clip(steps * math.sqrt(target_kl / max(measured, 1e-12)), *STEP_RANGE)
        log(f"whole-cache KL {measured:.5f} (target {target_kl}) -> rescale steps")
    profile = CodecProfile(steps, weights, str(model_dir) + (f"/{gguf_file}" if gguf_file else ""),
                           {"target_kl": target_kl, "windows": len(data), "chunk_tokens": chunk_tokens,
                            "score_tokens": score_tokens, "fisher_samples": samples,
                            "sensitivity": sens.tolist(), "text_files": [Path(f).name for f in text_files]})
    profile.save(out_path)
    log(f"wrote {out_path}: profile {profile.digest()}")
    return profile
