"""The learning-rate schedule both trainers use: linear warmup, then cosine decay to a floor.

``lr_at(step, cfg)`` is pure: Python ints give a float, numpy arrays an array, and the JAX trainer
passes ``xp=jax.numpy`` to trace it inside ``jit`` (optax wraps it as a schedule); the PyTorch
trainer wraps ``lr_multiplier`` in ``LambdaLR``. ``step`` counts optimizer updates from 0.
"""

from __future__ import annotations

import math

import numpy as np


def lr_at(step, cfg, xp=np):
    """Learning rate of optimizer update ``step``.

    ``cfg`` needs ``learning_rate``, ``min_lr``, ``warmup_iters`` and ``max_iters`` (a TrainConfig):
    0 at step 0 rising linearly to ``learning_rate`` at ``warmup_iters``, then half a cosine down
    to ``min_lr`` at ``max_iters``, and ``min_lr`` from there on.
    """
    peak, floor = cfg.learning_rate, cfg.min_lr
    warmup, decay = cfg.warmup_iters, max(cfg.max_iters - cfg.warmup_iters, 1)
    s = xp.asarray(step) * 1.0  # float, in whatever float dtype the namespace defaults to
    warm = peak * s / warmup if warmup > 0 else s * 0.0 + peak
    progress = xp.clip((s - warmup) / decay, 0.0, 1.0)
    cosine = floor + 0.5 * (peak - floor) * (1.0 + xp.cos(math.pi * progress))
    lr = xp.where(s < warmup, warm, cosine)
    if xp is np and np.ndim(lr) == 0:
        return float(lr)
    return lr


def lr_multiplier(step, cfg) -> float:
    """``lr_at / learning_rate``: the factor ``torch.optim.lr_scheduler.LambdaLR`` expects."""
    return lr_at(step, cfg) / cfg.learning_rate
