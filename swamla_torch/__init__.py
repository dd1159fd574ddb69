"""SWA-MLA in PyTorch: the model, its trainer (``swamla_torch.train``) and cached generation
(``swamla_torch.generate``).

Public API, mirrored by ``swamla_jax``::

    model = swamla_torch.from_config("tiny", seed=0)        # SPEC 6 random init
    model = swamla_torch.from_config("tiny", plan=resolve_plan("torch", on_gpu=True, ...))
    logits, loss = model(idx, targets)
    swamla_torch.save_pretrained(model, "ckpt/")             # portable safetensors + config.json
    model = swamla_torch.load_pretrained("ckpt/")
"""

from swamla_torch.convert import (from_config, load_native, load_pretrained, save_native,
                                  save_pretrained)
from swamla_torch.losses import cross_entropy
from swamla_torch.model import SWAMLA

__all__ = ["SWAMLA", "cross_entropy", "from_config", "load_native", "load_pretrained",
           "save_native", "save_pretrained"]
