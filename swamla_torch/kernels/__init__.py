"""The PyTorch fast paths the compute plan (``swamla.plan``) may choose, beside the model math:
FlexAttention/SDPA attention (:mod:`.attention`) and FP8 linears (:mod:`.fp8`).

Mirrors ``swamla_jax/kernels/``. Each kernel is checked against the float32 reference path in
``tests/test_torch_fast_paths.py`` and ``tests/test_torch_fp8.py``.
"""
