"""Model FLOPs utilisation (MFU) as this project defines it.

Headline MFU = ``6 * n_params * tokens_per_s / peak`` with ``n_params`` from
``swamla.layout.count_params`` (tied embedding counted once) and ``peak`` the card's dense
datasheet peak for the matmul dtype; always report it with the card's name. ``flops_per_token``
adds the attention score/value matmuls for readers who want the attention-aware figure.
"""

from __future__ import annotations

from swamla.config import BlockKind, ModelConfig
from swamla.layout import count_params

# Dense (no sparsity) datasheet peaks, FLOP/s: (bf16, fp8); fp8 None where the card has none.
# Matched in order against the upper-cased device name, most specific first, so 'GH200' precedes
# 'H200' and 'H100 PCIE' precedes 'H100' (an unqualified H100, as 'NVIDIA H100 80GB HBM3', is SXM).
PEAK_FLOPS = (
    ("GH200", 989e12, 1979e12),
    ("H200", 989e12, 1979e12),
    ("H100 PCIE", 756e12, 1513e12),
    ("H100 NVL", 835e12, 1671e12),
    ("H100", 989e12, 1979e12),
    ("H800", 989e12, 1979e12),
    ("B200", 2250e12, 4500e12),
    ("L40S", 362e12, 733e12),
    ("L4", 121e12, 242e12),
    ("A100", 312e12, None),
    ("A800", 312e12, None),
    ("A10", 125e12, None),
    ("TPU V6", 918e12, None),
    ("TPU V5 LITE", 197e12, None),
    ("TPU V5E", 197e12, None),
    ("TPU V5", 459e12, None),
    ("TPU V4", 275e12, None),
)
_DTYPES = {"bf16": 0, "bfloat16": 0, "fp16": 0, "float16": 0, "fp8": 1, "float8": 1}


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of a device for ``dtype`` ('bf16' or 'fp8'); None for CPU or unknown.

    ``device_name`` is what the framework reports: ``torch.cuda.get_device_name()`` or JAX's
    ``device.device_kind`` (e.g. 'NVIDIA H100 80GB HBM3', 'TPU v5 lite', 'cpu').
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    name = device_name.upper()
    for key, *peaks in PEAK_FLOPS:
        if key in name:
            return peaks[_DTYPES[dtype]]
    return None


def mfu(n_params: int, tokens_per_s: float, peak: float | None) -> float | None:
    """``6 * n_params * tokens_per_s / peak`` as a fraction (0.265 = 26.5%); None without a peak.

    ``peak`` is the total over the devices that produced ``tokens_per_s``.
    """
    if peak is None:
        return None
    if not peak > 0:
        raise ValueError(f"peak must be > 0 FLOP/s, got {peak!r}")
    return 6.0 * n_params * tokens_per_s / peak


def attention_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token of the attention score and value matmuls, averaged over positions.

    Forward + backward = 3 x forward, 2 FLOPs per multiply-add. A query at position i sees
    ``i + 1`` keys in MLA blocks and ``min(i + 1, window) + min(sink, max(0, i + 1 - window))`` in
    SWA blocks (SPEC section 3.1).
    """
    T = cfg.block_size if seq_len is None else seq_len
    W, S = cfg.swa_window, cfg.swa_sink_size
    mla_keys = (T + 1) / 2
    swa_keys = sum(min(i + 1, W) + min(S, max(0, i + 1 - W)) for i in range(T)) / T
    total = 0.0
    for kind in cfg.block_kinds:
        if kind is BlockKind.SWA:
            total += swa_keys * cfg.n_head * 2 * cfg.head_dim
        else:
            total += mla_keys * cfg.n_head * (cfg.mla_qk_head_dim + cfg.v_head_dim)
    return 6.0 * total


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, attention: bool = True) -> float:
    """Training FLOPs per token: ``6 * count_params(cfg)``, plus attention matmuls if asked."""
    dense = 6.0 * count_params(cfg)
    return dense + (attention_flops_per_token(cfg, seq_len) if attention else 0.0)


def mfu_with_attention(cfg: ModelConfig, tokens_per_s: float, peak: float | None,
                       seq_len: int | None = None) -> float | None:
    """MFU counting attention matmuls too (higher than the headline 6N figure)."""
    if peak is None:
        return None
    if not peak > 0:
        raise ValueError(f"peak must be > 0 FLOP/s, got {peak!r}")
    return flops_per_token(cfg, seq_len) * tokens_per_s / peak
