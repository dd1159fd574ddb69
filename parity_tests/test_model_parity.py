"""Whole-model parity: logits, loss and gradients of JAX vs PyTorch on the same weights."""

import pytest

from parity_helpers import VARIANTS, compare_model, tiny_config

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_parity(variant, seed):
    compare_model(tiny_config(**VARIANTS[variant]), seed)


def test_model_parity_third_seed():
    compare_model(tiny_config(), seed=2)


@pytest.mark.parametrize("during_training", [False, True])
def test_logit_scale_train_mode(during_training):
    """In training mode the SWA query log-scaling applies only if asked (SPEC 3.1)."""
    cfg = tiny_config(**VARIANTS["logit_scale"], apply_logit_scale_during_training=during_training)
    compare_model(cfg, seed=3, train=True)


def test_parity_with_remainder_only():
    """Fewer layers than one cycle: no scan at all, every block unrolled."""
    compare_model(tiny_config(n_layer=2), seed=0)
