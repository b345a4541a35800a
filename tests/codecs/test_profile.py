"""Codec profiles: round trip, digest, validation."""

import json

import numpy as np
import pytest
import torch

from gdscache.codecs.profile import DEFAULT_KEY_STEP, DEFAULT_VALUE_STEP, CodecProfile
from gdscache.spec import KVSpec


def test_default_and_round_trip(tmp_path):
    spec = KVSpec(3, 2, 2, 4, torch.bfloat16)
    prof = CodecProfile.default(spec)
    assert prof.steps[:, 0].tolist() == [DEFAULT_KEY_STEP] * 3 and prof.steps[:, 1].tolist() == [DEFAULT_VALUE_STEP] * 3
    weights = np.ones((3, 2, 8))
    weights[1, 0] = np.linspace(0.5, 2, 8)
    prof = CodecProfile(prof.steps * 0.5, weights, "m", {"target_kl": 0.001})
    prof.save(tmp_path / "p.json")
    back = CodecProfile.load(tmp_path / "p.json")
    assert back.digest() == prof.digest() and np.array_equal(back.weights, weights) and back.model == "m"
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["format"] == "gdscache-codec-profile" and data["channel_weights"][0][0] is None
    table = back.step_table(2.0)
    assert table.dtype == np.float32 and table.shape == (3, 2, 8)
    assert table[1, 0, 0] == np.float32(DEFAULT_KEY_STEP * 0.5 * 2.0 * 0.5)


def test_digest_changes_with_content():
    spec = KVSpec(2, 2, 1, 4, torch.float16)
    a = CodecProfile.default(spec)
    b = CodecProfile(a.steps * 1.01, a.weights)
    assert a.digest() != b.digest() and len(a.digest()) == 16


def test_validation(tmp_path):
    with pytest.raises(ValueError, match="shapes disagree"):
        CodecProfile(np.ones((2, 2)), np.ones((3, 2, 4)))
    with pytest.raises(ValueError, match="> 0"):
        CodecProfile(np.zeros((1, 2)), np.ones((1, 2, 4)))
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a gdscache-codec-profile"):
        CodecProfile.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="cannot read"):
        CodecProfile.load(tmp_path / "missing.json")
    prof = CodecProfile.default(KVSpec(2, 2, 1, 4, torch.float16))
    with pytest.raises(ValueError, match="codec profile is for KV"):
        prof.check(KVSpec(3, 2, 1, 4, torch.float16))
