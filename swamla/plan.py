"""How a model runs, as opposed to what it computes: the compute plan.

A :class:`ComputePlan` holds every kernel and precision choice (compute dtype, attention kernel,
SwiGLU backward, FP8, fused projections, remat, scanned layers, loss chunk) in concrete form.
:func:`resolve_plan` is the one place ``auto`` becomes a concrete choice and incompatible
choices are refused; both backends call it with the facts of their device, and their layers read
the plan they are given. The default plan is the exact float32 reference, the SPEC itself.
"""

from __future__ import annotations

import dataclasses

from swamla.config import ConfigError

COMPUTE_DTYPES = ("bfloat16", "float32")
# "auto": each backend's flash kernel on GPU in 16-bit without dropout (cuDNN in JAX,
# FlexAttention/SDPA in PyTorch), the exact reference path elsewhere.
ATTENTION_IMPLS = ("auto", "reference", "cudnn", "flex")
# SwiGLU's backward kernel (JAX): XLA's fusion, or one Pallas kernel.
MLP_IMPLS = ("auto", "xla", "pallas")
# What the backward pass may keep (JAX: jax.checkpoint_policies; PyTorch recomputes whole blocks
# for any policy other than "none").
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
BACKENDS = ("jax", "torch")
FAST_ATTENTION = {"jax": "cudnn", "torch": "flex"}


@dataclasses.dataclass(frozen=True)
class ComputePlan:
    """Concrete kernel and precision choices; no field is ``auto``."""

    compute_dtype: str = "float32"
    attention_impl: str = "reference"  # reference, or the backend's FAST_ATTENTION
    mlp_impl: str = "xla"  # xla or pallas (JAX)
    fp8: bool = False  # block projections as FP8 GEMMs
    fuse_projections: bool = False  # projections sharing an input as one GEMM (JAX)
    remat_policy: str = "none"
    scan_layers: bool = False  # the cycle repeats as one looped scan (JAX)
    loss_chunk: int = 0  # cross entropy over chunks of this many positions; 0: whole rows

    def __post_init__(self):
        _choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _choice("attention_impl", self.attention_impl, ("reference", "cudnn", "flex"))
        _choice("mlp_impl", self.mlp_impl, ("xla", "pallas"))
        _choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_loss_chunk(self.loss_chunk)
        if self.fp8 and self.compute_dtype != "bfloat16":
            raise ConfigError(f"use_fp8 needs compute_dtype 'bfloat16', got {self.compute_dtype!r}")

    @property
    def is_16bit(self) -> bool:
        return self.compute_dtype != "float32"


def resolve_plan(backend: str, *, on_gpu: bool, compute_dtype: str = "float32",
                 attention_impl: str = "auto", mlp_impl: str = "auto", fp8: bool = False,
                 fuse_projections: bool = False, remat_policy: str = "none",
                 scan_layers: bool = False, loss_chunk: int = 0, dropout: float = 0.0,
                 tensor_parallel: bool = False) -> ComputePlan:
    """The requested choices with ``auto`` resolved for ``backend`` on this device.

    ``on_gpu``: the backend computes on a CUDA GPU. ``dropout``: the model's dropout rate (the
    flash kernels have none). ``tensor_parallel``: heads are split over devices, which fused
    projections would interleave. Raises ConfigError naming the flag and the fix.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    _choice("attention_impl", attention_impl, ATTENTION_IMPLS)
    _choice("mlp_impl", mlp_impl, MLP_IMPLS)
    _choice("remat_policy", remat_policy, REMAT_POLICIES)
    _check_loss_chunk(loss_chunk)
    is_16bit = compute_dtype != "float32"
    if fp8 and compute_dtype != "bfloat16":
        raise ConfigError(f"use_fp8 needs compute_dtype 'bfloat16', got {compute_dtype!r}")

    fast = FAST_ATTENTION[backend]
    if attention_impl == "auto":
        attention_impl = fast if on_gpu and is_16bit and dropout == 0.0 else "reference"
    elif attention_impl not in ("reference", fast):
        raise ConfigError(f"attention_impl must be one of auto, reference, {fast} for {backend}; "
                          f"{attention_impl!r} is the other backend's kernel")
    elif attention_impl != "reference" and dropout > 0.0:
        raise ConfigError(f"attention_impl {attention_impl!r} needs dropout 0 (got {dropout}); "
                          "use attention_impl 'reference' (or 'auto')")
    elif attention_impl == "cudnn" and not is_16bit:
        raise ConfigError("attention_impl 'cudnn' needs compute_dtype 'bfloat16'; use "
                          "attention_impl 'reference' (or 'auto')")

    if backend == "torch":
        if mlp_impl == "pallas":
            raise ConfigError("mlp_impl must be one of auto, xla for torch; 'pallas' is JAX's "
                              "kernel")
        mlp_impl, fuse_projections, scan_layers = "xla", False, False
    elif mlp_impl == "auto":
        # FP8 rounds the gradient's halves for its own GEMMs, which the kernel does not.
        mlp_impl = "pallas" if on_gpu and is_16bit and not fp8 else "xla"
    return ComputePlan(compute_dtype=compute_dtype, attention_impl=attention_impl,
                       mlp_impl=mlp_impl, fp8=bool(fp8),
                       fuse_projections=bool(fuse_projections) and not tensor_parallel,
                       remat_policy=remat_policy, scan_layers=bool(scan_layers),
                       loss_chunk=loss_chunk)


def _check_loss_chunk(loss_chunk):
    if isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 0:
        raise ConfigError(f"loss_chunk must be an integer >= 0, got {loss_chunk!r}")


def _choice(name: str, value, choices):
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


REFERENCE_PLAN = ComputePlan()  # every layer's default: the exact float32 reference, the SPEC
