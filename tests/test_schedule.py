"""The learning-rate schedule: warmup from 0, cosine to min_lr at max_iters, min_lr after."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from swamla.schedule import lr_at, lr_multiplier

CFG = SimpleNamespace(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=1100)


@pytest.mark.parametrize("step,expected", [
    (0, 0.0),
    (1, 1e-5),
    (50, 5e-4),
    (100, 1e-3),                      # peak at the end of warmup
    (600, (1e-3 + 1e-4) / 2),         # half way through the decay: cosine at pi/2
    (350, 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4))),
    (1100, 1e-4),                     # floor at max_iters
    (5000, 1e-4),                     # and after
])
def test_values(step, expected):
    assert lr_at(step, CFG) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert isinstance(lr_at(step, CFG), float)


def test_shape_monotone_and_continuous():
    lrs = np.array([lr_at(s, CFG) for s in range(1300)])
    assert np.all(np.diff(lrs[:101]) > 0) and np.all(np.diff(lrs[100:1101]) < 0)
    assert np.all(lrs[1100:] == CFG.min_lr)
    assert np.max(np.abs(np.diff(lrs))) <= CFG.learning_rate / CFG.warmup_iters + 1e-15


def test_vectorized_matches_scalar():
    steps = np.arange(0, 1300, 7)
    out = lr_at(steps, CFG)
    assert out.shape == steps.shape
    np.testing.assert_allclose(out, [lr_at(int(s), CFG) for s in steps], rtol=1e-12)


def test_no_warmup_starts_at_peak():
    cfg = SimpleNamespace(learning_rate=1e-3, min_lr=0.0, warmup_iters=0, max_iters=10)
    assert lr_at(0, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(0.0, abs=1e-18)


def test_multiplier_for_lambdalr():
    assert lr_multiplier(100, CFG) == pytest.approx(1.0)
    assert lr_multiplier(1100, CFG) == pytest.approx(0.1)


def test_with_the_train_config_defaults():
    from swamla.train_config import train_fields

    cfg = SimpleNamespace(**{f.name: f.default for f in train_fields()})
    assert lr_at(0, cfg) == 0.0 and lr_at(400, cfg) == pytest.approx(1e-4)
    assert lr_at(100000, cfg) == pytest.approx(1e-5)
