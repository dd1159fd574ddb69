"""SWA-MLA in JAX/Flax: the model, its sharded trainer (``swamla_jax.train``) and cached
generation (``swamla_jax.generate``).

Public API, mirrored by ``swamla_torch``::

    model = swamla_jax.from_config("tiny", seed=0)          # SPEC 6 random init
    model = swamla_jax.from_config("tiny", plan=resolve_plan("jax", on_gpu=True, ...))
    logits, loss = model(idx, targets)
    swamla_jax.save_pretrained(model, "ckpt/")               # portable safetensors + config.json
    model = swamla_jax.load_pretrained("ckpt/")
"""

from swamla.plan import ComputePlan
from swamla_jax.convert import (Model, abstract_params, from_config, from_portable_tensors,
                                init_params, load_native, load_pretrained, save_native,
                                save_pretrained, to_portable_tensors)
from swamla_jax.losses import cross_entropy
from swamla_jax.model import REMAT_POLICIES, SWAMLA

__all__ = ["ComputePlan", "Model", "REMAT_POLICIES", "SWAMLA", "abstract_params", "cross_entropy",
           "from_config", "from_portable_tensors", "init_params", "load_native",
           "load_pretrained", "save_native", "save_pretrained", "to_portable_tensors"]
