"""SWA-MLA in JAX/Flax: the main model and (later) its sharded trainer.

Public API, mirrored by ``swamla_torch``::

    model = swamla_jax.from_config("tiny", seed=0)          # SPEC 6 random init
    logits, loss = model(idx, targets)
    swamla_jax.save_pretrained(model, "ckpt/")               # portable safetensors + config.json
    model = swamla_jax.load_pretrained("ckpt/")
"""

from swamla_jax.convert import (Model, abstract_params, from_config, from_portable_tensors,
                                init_params, load_native, load_pretrained, save_native,
                                save_pretrained, to_portable_tensors)
from swamla_jax.model import REMAT_POLICIES, SWAMLA, cross_entropy

__all__ = ["Model", "REMAT_POLICIES", "SWAMLA", "abstract_params", "cross_entropy", "from_config",
           "from_portable_tensors", "init_params", "load_native", "load_pretrained", "save_native",
           "save_pretrained", "to_portable_tensors"]
