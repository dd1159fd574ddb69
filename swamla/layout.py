"""The parameter layout of SWA-MLA, written once (SPEC.md section 7).

:func:`block_tensors` is the table: the tensors of one SWA or MLA block, by name, with their
portable shape (``[out, in]`` for linear weights). Everything else derives from it: the full
tensor list with shapes (:func:`expected_shapes`, which the portable format checks), the true
parameter count (:func:`count_params`), and where layer ``i`` lives in a backend whose repeated
block cycles are stacked for a scan (:func:`layer_location`).
"""

from __future__ import annotations

import math

from swamla.config import BlockKind, ModelConfig

# Sub-module names of each block kind: (attention norm, MLP norm, MLP).
BLOCK_NAMES = {BlockKind.SWA: ("norm1", "norm2", "mlp"),
               BlockKind.MLA: ("attn_norm", "ffn_norm", "ffn")}


def _linear(name: str, n_out: int, n_in: int, bias: bool) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (n_out, n_in), **({f"{name}.bias": (n_out,)} if bias else {})}


def norm_tensors(cfg: ModelConfig, name: str) -> dict[str, tuple[int, ...]]:
    """A block norm over the model width: RMSNorm (weight) or DyT (alpha, weight, bias)."""
    C = cfg.n_embd
    if cfg.use_dyt:
        return {f"{name}.alpha": (), f"{name}.weight": (C,), f"{name}.bias": (C,)}
    return {f"{name}.weight": (C,)}


def _latent_norm(cfg: ModelConfig, name: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (n,), **({f"{name}.bias": (n,)} if cfg.mla_norm == "layernorm"
                                       else {})}


def block_tensors(cfg: ModelConfig, kind: BlockKind) -> dict[str, tuple[int, ...]]:
    """One block's tensors, relative to its prefix ``transformer.h.{i}.``, with their shapes."""
    C, F, b = cfg.n_embd, cfg.mlp_hidden, cfg.bias
    attn_norm, mlp_norm, mlp = BLOCK_NAMES[kind]
    out = {**norm_tensors(cfg, attn_norm), **norm_tensors(cfg, mlp_norm)}
    if kind is BlockKind.SWA:
        kv = cfg.n_head_kv * cfg.head_dim
        out |= _linear("attn.q_proj", C, C, b) | _linear("attn.k_proj", kv, C, b)
        out |= _linear("attn.v_proj", kv, C, b) | _linear("attn.o_proj", C, C, b)
    else:
        H, dqk, dn, dv = cfg.n_head, cfg.mla_qk_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        r, dr, q = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.q_lora_rank
        if q:
            out |= _linear("attn.wq_a", q, C, b) | _latent_norm(cfg, "attn.q_norm", q)
            out |= _linear("attn.wq_b", H * dqk, q, b)
        else:
            out |= _linear("attn.wq", H * dqk, C, b)
        out |= _linear("attn.wkv_a", r + dr, C, b) | _latent_norm(cfg, "attn.kv_norm", r)
        out |= _linear("attn.wkv_b", H * (dn + dv), r, b) | _linear("attn.wo", C, H * dv, b)
    return out | _linear(f"{mlp}.gate_up_proj", 2 * F, C, b) | _linear(f"{mlp}.down_proj", C, F, b)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of SPEC section 7 for ``cfg``, with its shape."""
    shapes = {"transformer.wte.weight": (cfg.vocab_size, cfg.n_embd)}
    for i, kind in enumerate(cfg.block_kinds):
        shapes |= {f"transformer.h.{i}.{k}": s for k, s in block_tensors(cfg, kind).items()}
    return shapes | norm_tensors(cfg, "transformer.ln_f")


def count_params(cfg: ModelConfig) -> int:
    """True parameter count, the tied embedding counted once (what MFU uses)."""
    return sum(math.prod(s) for s in expected_shapes(cfg).values())


def layer_location(cfg: ModelConfig, i: int) -> tuple[str, int | None]:
    """Where layer ``i`` lives when the ``n_cycles`` repeats of the block cycle are stacked:
    ``("cycles/block_{i % L}", i // L)`` (a row of the stacked parameters) or, for the unrolled
    remainder, ``("h_{i}", None)``."""
    L = len(cfg.cycle)
    if i < cfg.n_cycles * L:
        return f"cycles/block_{i % L}", i // L
    return f"h_{i}", None
