"""SWA-MLA as a ``transformers`` causal LM: ``AutoModelForCausalLM.from_pretrained(DST,
trust_remote_code=True)`` on a directory written by ``swamla-convert SRC DST --to hf``.

Shapes: B batch, T time, V vocabulary.

The model *is* ``swamla_torch.model.SWAMLA``: this file wraps it instead of copying its blocks,
so the project keeps one definition of each block, and its parameters keep their portable names
(SPEC.md section 7): the export's safetensors hold the portable tensors. The price is a
dependency: the ``swamla`` package (``pip install 'swamla[torch]'``) must be installed where the
export is loaded.

Padding: rows may be left-padded (generation, lm-eval batches) or right-padded; the positions of
a row are counted from its first real token, as the project's own generation does.

Generation runs on the project's compressed caches (SWA ring + sink, absorbed MLA latents:
``swamla_torch.cache``) held in :class:`SWAMLACache`, a transformers ``Cache``; a forward builds
one only when asked (``use_cache=True``, as ``generate`` does), so scoring never pays for it.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_swamla import SWAMLA_MISSING, SWAMLAConfig

try:  # in a try block: transformers then leaves the missing-package message to us
    from swamla.plan import REFERENCE_PLAN
    from swamla_torch.cache import cache_nbytes, cache_tensors, init_cache
    from swamla_torch.layers import DynamicTanh, RMSNorm
    from swamla_torch.losses import IGNORE_INDEX, cross_entropy
    from swamla_torch.model import SWAMLA
except ImportError as e:
    raise ImportError(f"{SWAMLA_MISSING} ({e})") from e


class SWAMLACache(Cache):
    """The project's compressed cache (``swamla_torch.cache.init_cache``) as a transformers Cache.

    ``buffers`` are the project's per-layer buffers, ``lengths`` (B,) the real tokens each row
    holds (its next position). The MLA latent slots grow with the longest row, 64 at a time, up
    to ``block_size``; the SWA buffers have a fixed size.
    """

    def __init__(self, model: SWAMLA, batch: int, dtype: torch.dtype, device):
        super().__init__(layers=[])
        self.config = model.config
        self.buffers = init_cache(self.config, batch, 0, dtype, device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.seen = 0  # columns fed, padding included: what transformers slices inputs by

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.config.block_size

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False  # a ring slot, once overwritten, cannot be restored

    @property
    def is_sliding(self) -> list[bool]:
        return []

    @property
    def is_linear(self) -> list[bool]:
        return []

    @property
    def nbytes(self) -> int:
        """Bytes of the cached keys, values and latents (``swamla_torch.cache.cache_nbytes``)."""
        return cache_nbytes(self.buffers)

    def reserve(self, positions: int) -> None:
        """Grow the MLA latent slots to hold ``positions`` positions per row."""
        positions = min(-(-positions // 64) * 64, self.config.block_size)
        for layer in self.buffers["layers"]:
            for name in ("c", "k_pe"):
                if name in layer and layer[name].shape[1] < positions:
                    t = layer[name]
                    layer[name] = torch.cat(
                        [t, t.new_zeros(t.shape[0], positions - t.shape[1], t.shape[2])], dim=1)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Rows ``beam_idx`` of every buffer (beam search)."""
        for t in cache_tensors(self.buffers):
            t.copy_(t.index_select(0, beam_idx.to(t.device)))
        self.lengths = self.lengths.index_select(0, beam_idx.to(self.lengths.device))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an SWA-MLA cache cannot be cropped: the sliding-window ring "
                                  "has overwritten what it held (assisted decoding is not "
                                  "supported)")


class SWAMLAPreTrainedModel(PreTrainedModel):
    config: SWAMLAConfig
    config_class = SWAMLAConfig
    base_model_prefix = "swamla"  # no such attribute: state-dict keys are used as they are
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        """SPEC 6: linear weights and embedding ~ N(0, init_std); biases 0; norms 1 / 0."""
        std = self.config.init_std
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DynamicTanh):
            init.constant_(module.alpha, self.config.dyt_alpha_init)
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (torch.nn.LayerNorm, RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)


class SWAMLAForCausalLM(SWAMLAPreTrainedModel, GenerationMixin):
    """``swamla_torch.model.SWAMLA`` behind transformers' causal-LM interface.

    ``self.transformer`` is the wrapped model's module tree, registered here so that the state
    dict keys are the portable names; the wrapped model itself is held unregistered.
    """

    def __init__(self, config: SWAMLAConfig):
        super().__init__(config)
        # The reference attention path: exact on any device, and the one the cached path uses.
        model = SWAMLA(config.to_model_config(), REFERENCE_PLAN)
        self.transformer = model.transformer
        self._swamla = (model,)  # a tuple, so nn.Module does not register it a second time
        self.post_init()

    @property
    def swamla(self) -> SWAMLA:
        """The wrapped project model (its parameters are this model's)."""
        return self._swamla[0]

    def train(self, mode: bool = True):
        self.swamla.training = mode
        return super().train(mode)

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return None  # the head is the embedding itself (SPEC 2), read in SWAMLA._head

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids=None, cache=None,
                inputs_embeds=None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, T, V) of ``input_ids`` (B, T), and with ``labels`` the project's loss
        (SPEC 5) under transformers' convention: labels are the input ids, shifted here, and
        -100 is ignored. ``attention_mask`` (B, T) marks left or right padding; ``position_ids``
        are ignored (positions follow the mask). A :class:`SWAMLACache` is built only when
        ``use_cache=True`` is passed (``generate`` does), not from the config's default, and is
        then returned as ``cache``; ``past_key_values`` is transformers' older name for it."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("SWA-MLA takes input_ids; inputs_embeds is not supported")
        cache = cache if cache is not None else past_key_values
        if cache is not None or use_cache:
            logits, cache = self._forward_cached(input_ids, attention_mask, cache)
        else:
            shift = _left_pad(attention_mask, input_ids.shape)
            ids = input_ids if shift is None else _roll_rows(input_ids, shift)
            logits, _ = self.swamla(ids)  # (B, T, V)
            if shift is not None:
                logits = _roll_rows(logits, -shift)
        loss = None
        if labels is not None:
            # transformers' convention: position t predicts labels[t + 1]
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1),
                                                                  IGNORE_INDEX)], dim=1)
            loss = cross_entropy(logits, targets.to(logits.device),
                                 self.swamla.config.label_smoothing)
            n_items = kwargs.get("num_items_in_batch")
            if n_items is not None:  # the Trainer's gradient-accumulation normalization
                loss = loss * (targets != IGNORE_INDEX).sum() / n_items
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _forward_cached(self, input_ids, attention_mask, cache: SWAMLACache | None):
        """Logits (B, T, V) of the new tokens ``input_ids`` (B, T) run against ``cache`` (a new
        one when None) through ``SWAMLA.forward_chunk``; ``attention_mask`` (B, past + T) as
        transformers passes it. Returns (logits, cache)."""
        B, T = input_ids.shape
        model = self.swamla
        if cache is None:
            weight = model.transformer.wte.weight
            cache = SWAMLACache(model, B, weight.dtype, weight.device)
        elif not isinstance(cache, SWAMLACache):
            raise TypeError(f"SWA-MLA runs on its own compressed cache (SWAMLACache), not "
                            f"{type(cache).__name__}; let the model create it (use_cache=True)")
        if cache.seen + T > model.config.block_size:
            raise ValueError(f"{cache.seen + T} tokens exceed the model's block_size "
                             f"{model.config.block_size}")
        mask = None if attention_mask is None else attention_mask[:, -T:]
        shift = _left_pad(mask, input_ids.shape)
        tokens = input_ids if shift is None else _roll_rows(input_ids, shift)
        n_new = torch.full((B,), T, device=input_ids.device) if mask is None else mask.sum(1)
        start = cache.lengths
        end = start + n_new.to(start.device).long()
        cache.reserve(int(start.max()) + T)  # padding slots are written too, then overwritten
        x = model.forward_chunk(cache.buffers, tokens, start, end)  # (B, T, C)
        logits = model.logits(x)  # (B, T, V) float32
        if shift is not None:
            logits = _roll_rows(logits, -shift)
        cache.lengths, cache.seen = end, cache.seen + T
        return logits, cache

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # attention state lives in the project's compressed caches, not K/V lists


def _left_pad(attention_mask, shape) -> torch.Tensor | None:
    """Leading padding tokens per row (B,), or None when no row is left-padded. Raises a
    ValueError for a mask with holes (padding between real tokens)."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(shape)}: they must match")
    mask = attention_mask.bool()
    before = torch.nn.functional.pad(mask[:, :-1], (1, 0))  # (B, T): the previous token's mask
    if bool(((mask & ~before).sum(1) > 1).any()):  # more than one run of real tokens in a row
        raise ValueError("attention_mask has padding between real tokens; SWA-MLA takes rows "
                         "padded on the left or on the right only")
    lead = (~mask).int().cumprod(1).sum(1)  # (B,) leading padding tokens
    return lead if bool(lead.any()) else None


def _roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row b of ``x`` (B, T, ...) rotated left by ``shift[b]`` along T."""
    B, T = x.shape[:2]
    idx = (torch.arange(T, device=x.device)[None, :] + shift[:, None].to(x.device)) % T  # (B, T)
    return x.gather(1, idx.view(B, T, *(1,) * (x.dim() - 2)).expand_as(x))


__all__ = ["SWAMLACache", "SWAMLAForCausalLM", "SWAMLAPreTrainedModel"]
