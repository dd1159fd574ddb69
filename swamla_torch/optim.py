"""Optimizers of the PyTorch trainer, defined to match optax's (so a run can change framework).

- AdamW with float32 moments is ``torch.optim.AdamW`` (fused on CUDA): it decays ``p *= 1 - lr*wd``
  before the Adam step, algebraically optax.adamw's ``p -= lr * (adam_update + wd * p)``.
- ``AdamW`` here is the same update with bfloat16 moments (``bf16_moments``, the seed's FP8AdamW).
- ``Lion`` (optax.lion; torch has none), float32 or bfloat16 moments (the seed's FP8Lion).
- ``clip_grads_`` is optax.clip_by_global_norm: ``g / norm * max_norm`` when ``norm >= max_norm``.

bfloat16 moments are updated in float32 and stored back with stochastic rounding: with round to
nearest, ``nu * beta2`` rounds back to ``nu`` once ``1 - beta2`` is below bfloat16's half spacing
(2^-9), so a 0.99+ decay would stall. The rounding noise is drawn from a generator seeded by
(seed, step), identical on every rank and on resume, so replicas stay equal and resumes exact.
Optimizer math runs on local shards (FSDP2 DTensors are elementwise-safe to update locally).
"""

from __future__ import annotations

import torch

from swamla.train_config import TrainConfig

EMBEDDING = "transformer.wte.weight"


def local(t: torch.Tensor) -> torch.Tensor:
    """The process-local tensor of a DTensor (FSDP2 shard), or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay mask: matrices only, not the embedding (nor biases, norms, DyT alpha)."""
    return p.ndim >= 2 and name != EMBEDDING


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """Two groups, decayed and not, keeping the parameters' names for checkpoints."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    groups = []
    for decay in (True, False):
        members = [(n, p) for n, p in named if decays(n, p) == decay]
        if members:
            groups.append({"params": [p for _, p in members], "names": [n for n, _ in members],
                           "weight_decay": weight_decay if decay else 0.0})
    return groups


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bfloat16 rounding up with probability equal to the dropped fraction."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # clear the 16 low bits
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the value is a bfloat16


class _MomentOptimizer(torch.optim.Optimizer):
    """The shared step (direction, decoupled weight decay, -lr) and state: moments of
    ``moment_dtype``, a per-parameter step count, the stochastic rounding back to bf16."""

    moments: tuple[str, ...] = ()

    def __init__(self, params, defaults, *, bf16_moments: bool, seed: int):
        super().__init__(params, defaults)
        self.moment_dtype = torch.bfloat16 if bf16_moments else torch.float32
        self.seed = seed

    def _gather(self, group):
        """Parameters with gradients, their local grads and float32 views of their moments."""
        ps, grads, moments, stored = [], [], {k: [] for k in self.moments}, []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                for k in self.moments:
                    state[k] = torch.zeros_like(p, dtype=self.moment_dtype,
                                                memory_format=torch.preserve_format)
            state["step"] += 1
            ps.append(local(p))
            grads.append(local(p.grad))
            stored.append(state)
            for k in self.moments:
                m = local(state[k])
                moments[k].append(m if m.dtype == torch.float32 else m.float())
        return ps, grads, moments, stored

    def _store(self, stored, moments, step: int) -> None:
        if self.moment_dtype == torch.float32:
            return  # updated in place
        gen = None
        for k, values in moments.items():
            for state, value in zip(stored, values, strict=True):
                target = local(state[k])
                if gen is None or gen.device != value.device:
                    gen = torch.Generator(device=value.device)
                    gen.manual_seed(hash((self.seed, step)) & (2**63 - 1))
                target.copy_(stochastic_round_bf16(value, gen))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step does not take a closure")
        for group in self.param_groups:
            ps, grads, moments, stored = self._gather(group)
            if not ps:
                continue
            t = int(stored[0]["step"])
            update = self._direction(group, grads, moments, t)  # moments updated in place
            if group["weight_decay"]:
                torch._foreach_add_(update, ps, alpha=group["weight_decay"])
            torch._foreach_add_(ps, update, alpha=-float(group["lr"]))
            self._store(stored, moments, t)

    def _direction(self, group, grads, moments, t: int) -> list[torch.Tensor]:
        """The update direction before weight decay and -lr; advances ``moments``."""
        raise NotImplementedError

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # casts every state tensor to the parameter's dtype
        for state in self.state.values():
            for k in self.moments:
                if k in state:
                    state[k] = state[k].to(self.moment_dtype)


class Lion(_MomentOptimizer):
    """optax.lion: ``p -= lr * (sign(b1*m + (1-b1)*g) + wd*p)``; then ``m = b2*m + (1-b2)*g``."""

    moments = ("exp_avg",)

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 *, bf16_moments: bool = False, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay),
                         bf16_moments=bf16_moments, seed=seed)

    def _direction(self, group, grads, moments, t):
        b1, b2 = group["betas"]
        m = moments["exp_avg"]
        update = torch._foreach_mul(m, b1)
        torch._foreach_add_(update, grads, alpha=1 - b1)
        torch._foreach_sign_(update)
        torch._foreach_mul_(m, b2)
        torch._foreach_add_(m, grads, alpha=1 - b2)
        return update


class AdamW(_MomentOptimizer):
    """optax.adamw written out: ``p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)``.

    The trainer uses it for bfloat16 moments; with float32 moments it is the reference the tests
    compare ``torch.optim.AdamW`` against.
    """

    moments = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, bf16_moments: bool = False, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay),
                         bf16_moments=bf16_moments, seed=seed)

    def _direction(self, group, grads, moments, t):
        b1, b2 = group["betas"]
        m, v = moments["exp_avg"], moments["exp_avg_sq"]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        update = torch._foreach_div(m, 1 - b1**t)
        denom = torch._foreach_div(v, 1 - b2**t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_div_(update, denom)
        return update


def build_optimizer(named_params, cfg: TrainConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names, over decayed / non-decayed groups (lr set per step)."""
    groups = param_groups(named_params, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer_type == "lion":
        return Lion(groups, lr=cfg.learning_rate, betas=betas, bf16_moments=cfg.bf16_moments,
                    seed=cfg.seed)
    if cfg.bf16_moments:
        return AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=1e-8, bf16_moments=True,
                     seed=cfg.seed)
    cuda = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=1e-8,
                             fused=cuda, foreach=not cuda)


@torch.no_grad()
def global_grad_norm(params, *, sharded: bool = False) -> torch.Tensor:
    """sqrt(sum of g^2) over all gradients, as a float32 device scalar (optax.global_norm).

    ``sharded``: gradients are FSDP shards; their squared sums are all-reduced.
    """
    grads = [local(p.grad) for p in params if p.grad is not None]
    squares = torch.stack([n.float() ** 2 for n in torch._foreach_norm(grads)]).sum()
    if sharded:
        torch.distributed.all_reduce(squares)
    return squares.sqrt()


@torch.no_grad()
def clip_grads_(params, norm: float, max_norm: float) -> bool:
    """optax.clip_by_global_norm given the norm: ``g = g / norm * max_norm`` if norm >= max_norm
    (not torch's clip_grad_norm_, which adds 1e-6). ``max_norm`` 0 disables. Returns whether it
    clipped."""
    if max_norm <= 0 or norm < max_norm:
        return False
    grads = [local(p.grad) for p in params if p.grad is not None]
    torch._foreach_div_(grads, norm)
    torch._foreach_mul_(grads, max_norm)
    return True
