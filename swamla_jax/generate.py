"""Text generation with compressed KV caches for the Flax SWA-MLA model.

    python -m swamla_jax.generate CKPT --prompt "Once upon a time" --max-new-tokens 64 \
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--dtype bfloat16]

Prompts are right-padded into one batch (:func:`swamla.sampling.plan_batch`), prefilled in chunks
by one compiled chunk step, and then decoded by one compiled ``lax.while_loop`` that samples,
stops rows at EOS or their length limit, and (optionally) streams each token to the host through
an ordered ``io_callback``. The loop is compiled once per (config, batch, cache size,
max_new_tokens, sampling structure); sampling values, prompts and seeds are runtime inputs.
``TRACE_COUNTS`` counts traces, so tests can assert that nothing recompiles per token.

Shapes: B batch, T chunk time, V vocabulary, N new tokens.
"""

from __future__ import annotations

import collections
import functools
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from swamla.config import ModelConfig
from swamla.plan import ComputePlan
from swamla.sampling import (GREEDY, NO_TOKEN, GenerationResult, PromptBatch, SamplingParams,
                             build_parser, plan_batch, run_cli)
from swamla_jax.cache import cache_nbytes, init_cache
from swamla_jax.convert import Model
from swamla_jax.model import SWAMLA, forward_chunk, logits

TRACE_COUNTS: collections.Counter = collections.Counter()


# ------------------------------------------------------------------------------- sampling
def sample(logits, key, temperature, top_k, top_p, vocab_limit, *, structure):
    """Next tokens (B,) from float32 logits (B, V); ``structure`` = SamplingParams.structure.

    Ids ``>= vocab_limit`` (the vocabulary's padding beyond the tokenizer) are never chosen.
    """
    greedy, use_top_k, use_top_p = structure
    V = logits.shape[-1]
    logits = jnp.where(jnp.arange(V) < vocab_limit, logits, -jnp.inf)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if use_top_k or use_top_p:
        desc = -jnp.sort(-logits, axis=-1)  # (B, V)
        if use_top_k:
            kth_index = jnp.full((desc.shape[0], 1), jnp.minimum(top_k, V) - 1)
            kth = jnp.take_along_axis(desc, kth_index, axis=-1)
            logits = jnp.where(logits < kth, -jnp.inf, logits)
            desc = jnp.where(desc < kth, -jnp.inf, desc)
        if use_top_p:
            probs = jax.nn.softmax(desc, axis=-1)
            keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the first token is always kept
            cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------- compiled steps
_STREAM: list[Callable | None] = [None]  # the host sink of the current generate call


def _stream_to_host(tokens, active):
    if _STREAM[0] is not None:
        _STREAM[0](np.asarray(tokens), np.asarray(active))


@functools.partial(jax.jit, static_argnames=("cfg", "plan"), donate_argnames=("cache",))
def prefill_chunk(params, cache, tokens, start, lengths, *, cfg: ModelConfig, plan: ComputePlan):
    """One prefill chunk; returns (cache, logits (B, V) at each row's last prompt position in this
    chunk (meaningful only for rows whose prompt ends inside it))."""
    TRACE_COUNTS["prefill_chunk"] += 1
    x, cache = forward_chunk(cfg, plan, params, cache, tokens, start, lengths)
    idx = jnp.clip(lengths - 1 - start, 0, tokens.shape[1] - 1)
    last = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    return cache, logits(cfg, plan, params, last)


def prefill(model: Model, batch: PromptBatch, cache=None):
    """Fill a fresh cache with the prompts; returns (cache, logits (B, V) at each last prompt
    token)."""
    cfg, plan = model.config, model.module.plan
    B, T = batch.tokens.shape
    if cache is None:
        cache = init_cache(cfg, B, batch.cache_len, jnp.dtype(plan.compute_dtype))
    lengths = jnp.asarray(batch.lengths)
    last = None
    for s in range(0, T, batch.chunk):
        start = jnp.full((B,), s, jnp.int32)
        tokens = jnp.asarray(batch.tokens[:, s:s + batch.chunk])
        cache, out = prefill_chunk(model.params, cache, tokens, start, lengths, cfg=cfg,
                                   plan=plan)
        ends_here = (batch.lengths - 1 >= s) & (batch.lengths - 1 < s + batch.chunk)
        last = out if last is None else jnp.where(jnp.asarray(ends_here)[:, None], out, last)
    return cache, last


@functools.partial(jax.jit, donate_argnames=("cache",),
                   static_argnames=("cfg", "plan", "max_new_tokens", "structure",
                                    "return_logits", "stream"))
def decode_loop(params, cache, first_logits, lengths, limits, key, temperature, top_k, top_p,
                vocab_limit, eos_id, *, cfg: ModelConfig, plan: ComputePlan, max_new_tokens: int,
                structure: tuple, return_logits: bool, stream: bool):
    """Sample N = max_new_tokens tokens per row in one ``lax.while_loop``.

    Row b's token n sits at position ``L_b + n``; a row stops after EOS or at ``limits[b]`` total
    tokens, and the loop ends when every row has stopped. Returns (tokens (B, N), logits
    (B, N, V) or None, cache).
    """
    TRACE_COUNTS["decode_loop"] += 1
    B, N = lengths.shape[0], max_new_tokens
    pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p,
                             vocab_limit=vocab_limit, structure=structure)

    def emit(n, tok, done, length, out, logit_buf, step_logits):
        """Record token ``tok`` (B,) as new token n of each row still running."""
        tok = jnp.where(done, NO_TOKEN, tok)
        out = out.at[:, n].set(tok)
        if return_logits:
            logit_buf = logit_buf.at[:, n].set(step_logits)
        if stream:
            io_callback(_stream_to_host, None, tok, ~done, ordered=True)
        length = jnp.where(done, length, length + 1)
        done = done | (tok == eos_id) | (length >= limits)
        return out, logit_buf, length, done

    key, sub = jax.random.split(key)
    out = jnp.full((B, N), NO_TOKEN, jnp.int32)
    logit_buf = jnp.zeros((B, N, first_logits.shape[-1]) if return_logits else (0,), jnp.float32)
    tok = pick(first_logits, sub)
    out, logit_buf, length, done = emit(0, tok, jnp.zeros((B,), bool), lengths, out, logit_buf,
                                        first_logits)

    def cond(state):
        n, done = state[0], state[3]
        return (n < N) & ~jnp.all(done)

    def body(state):
        n, cache, length, done, out, logit_buf, key = state
        TRACE_COUNTS["decode_step"] += 1
        pos = length - 1  # the newest token's position; stopped rows rewrite it harmlessly
        tok = jnp.take_along_axis(out, jnp.full((B, 1), n - 1), axis=1)[:, 0]
        x, cache = forward_chunk(cfg, plan, params, cache, jnp.where(done, 0, tok)[:, None], pos,
                                 pos + 1)
        step_logits = logits(cfg, plan, params, x[:, 0])
        key, sub = jax.random.split(key)
        out, logit_buf, length, done = emit(n, pick(step_logits, sub), done, length, out,
                                            logit_buf, step_logits)
        return n + 1, cache, length, done, out, logit_buf, key

    state = (jnp.int32(1), cache, length, done, out, logit_buf, key)
    _, cache, _, _, out, logit_buf, _ = jax.lax.while_loop(cond, body, state)
    return out, (logit_buf if return_logits else None), cache


# ------------------------------------------------------------------------------- generate
def generate(model: Model, prompts, *, max_new_tokens: int, sampling: SamplingParams = GREEDY,
             eos_id: int | None = None, vocab_limit: int | None = None, prefill_chunk: int = 512,
             on_token: Callable | None = None, return_logits: bool = False) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after each prompt (lists of token ids).

    ``on_token(tokens, active)`` is called on the host after every step with numpy (B,) arrays
    (streaming); ``return_logits`` also returns the float32 logits each token was chosen from.
    """
    cfg = model.config
    batch = plan_batch(prompts, cfg, max_new_tokens, prefill_chunk=prefill_chunk)
    cache, first = prefill(model, batch)
    vocab_limit = cfg.vocab_size if vocab_limit is None else min(vocab_limit, cfg.vocab_size)
    _STREAM[0] = on_token
    try:
        out, step_logits, cache = decode_loop(
            model.params, cache, first, jnp.asarray(batch.lengths), jnp.asarray(batch.limits),
            jax.random.key(sampling.seed), jnp.float32(sampling.temperature),
            jnp.int32(sampling.top_k), jnp.float32(sampling.top_p), jnp.int32(vocab_limit),
            jnp.int32(NO_TOKEN if eos_id is None else eos_id), cfg=cfg, plan=model.module.plan,
            max_new_tokens=max_new_tokens, structure=sampling.structure,
            return_logits=return_logits, stream=on_token is not None)
        out = np.asarray(out)  # waits for the loop, so every callback has run
    finally:
        _STREAM[0] = None
    return GenerationResult([[int(t) for t in row if t != NO_TOKEN] for row in out], out,
                            None if step_logits is None else np.asarray(step_logits),
                            cache_nbytes(cache))


# ------------------------------------------------------------------------------- command line
def _load_any(path, *, dtype="float32", **config_overrides) -> Model:
    """A model from any checkpoint this project writes (``swamla.portable.detect_format``),
    a trainer's output_dir included (its newest checkpoint).

    Portable directories and native JAX directories load directly; a native PyTorch ``.pt`` is
    read through the portable tensors. Raises ``CheckpointError`` naming the accepted formats.
    Decoding runs the reference attention path in ``dtype``.
    """
    from swamla.convert_cli import read_tensors
    from swamla.portable import detect_format
    from swamla.portable import CheckpointError, apply_overrides
    from swamla_jax.convert import abstract_params, from_portable_tensors

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a portable checkpoint "
                              "directory, a native JAX directory, a PyTorch .pt file or a "
                              "trainer's output_dir")
    plan = ComputePlan(compute_dtype=dtype)
    fmt = detect_format(path)
    if fmt == "portable":
        import swamla_jax

        return swamla_jax.load_pretrained(path, plan=plan, **config_overrides)
    cfg, tensors = read_tensors(path)
    cfg = apply_overrides(cfg, config_overrides, str(path))
    module = SWAMLA(cfg, plan)
    return Model(module, from_portable_tensors(cfg, tensors, abstract_params(module)))


def main(argv=None) -> int:
    args = build_parser("python -m swamla_jax.generate", __doc__).parse_args(argv)

    def load(args):
        overrides = {} if args.block_size is None else {"block_size": args.block_size}
        return _load_any(args.checkpoint, dtype=args.dtype, **overrides)

    def gen(model, prompts, sampling, eos_id, vocab_limit, on_token):
        return generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                        eos_id=eos_id, vocab_limit=vocab_limit, prefill_chunk=args.prefill_chunk,
                        on_token=on_token).tokens

    return run_cli(args, backend="jax", load_model=load, generate=gen)


if __name__ == "__main__":
    sys.exit(main())
