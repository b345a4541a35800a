"""Calibration math that needs no model: channel weights, predicted sensitivity, windows."""

import numpy as np
import torch

from gdscache.calibrate import WEIGHT_RANGE, _sensitivity, key_weights, reconstruct, token_windows


def test_key_weights_follow_inverse_query_rms_with_unit_geometric_mean():
    rms = np.array([[1.0, 2.0, 4.0, 8.0], [1.0, 1.0, 1.0, 1000.0]])
    w = key_weights(rms)
    assert np.allclose(np.exp(np.log(w[0]).mean()), 1.0)
    assert np.allclose(w[0, :-1] / w[0, 1:], 2.0)
    assert w.min() >= WEIGHT_RANGE[0] and w.max() <= WEIGHT_RANGE[1]
    assert w[1, 3] == WEIGHT_RANGE[0]


def test_sensitivity_is_fisher_weighted_noise_power():
    fisher = torch.zeros(2, 2, 4, 1, 2)
    fisher[1, 0] = 3.0
    scale2 = torch.full_like(fisher, 4.0)
    ones = np.ones((2, 2, 2))
    sens = _sensitivity(fisher, scale2, ones, scored=8)
    expected = 0.5 / 12 / 8 * 3.0 * 4.0 * 8  # 8 elements in the tensor
    assert np.isclose(sens[1, 0], expected) and sens[0, 0] == 0 and sens[1, 1] == 0
    halved = _sensitivity(fisher, scale2, np.full((2, 2, 2), 0.5), scored=8)
    assert np.isclose(halved[1, 0], expected / 4)


def test_reconstruct_error_shrinks_with_the_step():
    kv = torch.randn(2, 2, 16, 1, 8, generator=torch.Generator().manual_seed(0))
    errs = [float((reconstruct(kv, np.full((2, 2, 8), s, np.float32)) - kv).norm()) for s in (0.2, 0.05, 0.01)]
    assert errs[0] > errs[1] > errs[2] > 0


class _Tok:
    def __call__(self, text, return_tensors):
        class R:
            input_ids = torch.arange(len(text.split())).unsqueeze(0)
        return R()


def test_token_windows_round_robin_and_disjoint():
    wins = token_windows(_Tok(), ["a " * 25, "b " * 9], length=8, count=5)
    assert len(wins) == 4 and all(w.shape == (1, 8) for w in wins)
    assert wins[0][0, 0] == 0 and wins[1][0, 0] == 0 and wins[2][0, 0] == 8
