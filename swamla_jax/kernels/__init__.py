"""The JAX fast paths the compute plan (``swamla.plan``) may choose, beside the model math:
cuDNN flash attention with the SWA sink merge (:mod:`.attention`), SwiGLU's Pallas backward
(:mod:`.swiglu`), FP8 GEMMs (:mod:`.fp8`) and projections fused into one GEMM
(:mod:`.projections`).

Mirrors ``swamla_torch/kernels/``. Each is checked against the float32 reference path in
``tests/test_jax_fast_paths.py``.
"""
