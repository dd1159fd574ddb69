"""The learning-rate schedule both trainers use: linear warmup, then cosine decay to a floor.

``lr_at(step, cfg)`` is pure: Python ints give a float, numpy arrays an array, and the JAX trainer
passes ``xp=jax.numpy`` to trace it inside ``jit`` (optax wraps it as a schedule); the PyTorch
trainer wraps ``lr_multiplier`` in ``LambdaLR``. ``step`` counts optimizer updates from 0.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


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


def warn_short_run(cfg) -> None:
    """Say once, at the start of a run, when it ends before its warmup does and what the learning
    rate will do instead (the trainers call this on their main process)."""
    if cfg.warmup_iters <= cfg.max_iters:
        return
    last = float(lr_at(cfg.max_iters - 1, cfg))
    log.warning("warmup_iters (%d) > max_iters (%d): the learning rate rises linearly for the "
                "whole run and its last update uses %.3g, not learning_rate %.3g; set "
                "--warmup_iters %d or less to reach it", cfg.warmup_iters, cfg.max_iters, last,
                cfg.learning_rate, cfg.max_iters)
