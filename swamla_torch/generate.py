"""Text generation with compressed KV caches for the PyTorch SWA-MLA model.

    python -m swamla_torch.generate CKPT --prompt "Once upon a time" --max-new-tokens 64 \
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--dtype bfloat16] \
        [--device cuda] [--compile]

Mirrors ``swamla_jax.generate``: prompts are right-padded into one batch, prefilled in chunks, and
decoded one token per row per step at per-row positions. The cache tensors have fixed shapes and
are updated in place, so ``compile=True`` can ``torch.compile`` the decode step once (CUDA: mode
``reduce-overhead``, i.e. CUDA graphs, with the cache marked as static addresses; CPU: the
default inductor mode). Sampling runs eagerly with a ``torch.Generator`` seeded per call.

Shapes: B batch, T chunk time, V vocabulary, N new tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

from swamla.plan import REFERENCE_PLAN
from swamla.sampling import (GREEDY, NO_TOKEN, GenerationError, GenerationResult, PromptBatch,
                             SamplingParams, build_parser, plan_batch, run_cli)
from swamla_torch.cache import cache_nbytes, cache_tensors, init_cache
from swamla_torch.model import SWAMLA

_CHECK_DONE_EVERY = 8  # decode steps between host syncs that test "every row stopped"


def sample(logits: torch.Tensor, generator: torch.Generator, sampling: SamplingParams,
           vocab_limit: int) -> torch.Tensor:
    """Next tokens (B,) from float32 logits (B, V); ids ``>= vocab_limit`` are never chosen."""
    V = logits.shape[-1]
    logits = logits.masked_fill(torch.arange(V, device=logits.device) >= vocab_limit, float("-inf"))
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, V), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        desc = torch.sort(logits, dim=-1, descending=True).values
        probs = torch.softmax(desc, dim=-1)
        keep = probs.cumsum(-1) - probs < sampling.top_p  # the first token is always kept
        cutoff = torch.where(keep, desc, float("inf")).amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _device(model) -> torch.device:
    return model.transformer.wte.weight.device


def prefill(model: SWAMLA, batch: PromptBatch, cache=None):
    """Fill a fresh cache with the prompts; returns (cache, logits (B, V) at each last prompt
    token)."""
    dev, dtype = _device(model), model.transformer.wte.weight.dtype
    B, T = batch.tokens.shape
    if cache is None:
        cache = init_cache(model.config, B, batch.cache_len, dtype, dev)
    tokens = torch.from_numpy(batch.tokens).long().to(dev)
    lengths = torch.from_numpy(batch.lengths).long().to(dev)
    last_x = None
    for s in range(0, T, batch.chunk):
        start = torch.full((B,), s, dtype=torch.long, device=dev)
        x = model.forward_chunk(cache, tokens[:, s:s + batch.chunk], start, lengths)
        idx = (lengths - 1 - s).clamp(0, x.shape[1] - 1)
        here = x[torch.arange(B, device=dev), idx]  # (B, C)
        ends = ((lengths - 1 >= s) & (lengths - 1 < s + batch.chunk))[:, None]
        last_x = here if last_x is None else torch.where(ends, here, last_x)
    return cache, model.logits(last_x)


def _decode_step(model, cache, tok, pos):
    """One token per row (B,) at positions ``pos`` (B,); returns logits (B, V) float32."""
    x = model.forward_chunk(cache, tok[:, None], pos, pos + 1)
    return model.logits(x[:, 0])


def compiled_decode_step(model, cache):
    """``torch.compile`` of the decode step for this cache (fixed shapes, no recompiles).

    On CUDA: CUDA graphs (``reduce-overhead``) with the cache tensors marked static. On CPU:
    inductor's default mode; raises a clear RuntimeError if no C++ compiler is available.
    """
    cuda = _device(model).type == "cuda"
    if cuda:
        for t in cache_tensors(cache):
            torch._dynamo.mark_static_address(t)
    return torch.compile(_decode_step, fullgraph=True, dynamic=False,
                         mode="reduce-overhead" if cuda else None)


@torch.inference_mode()
def decode(model: SWAMLA, cache, first_logits, lengths, limits, *, max_new_tokens: int,
           sampling: SamplingParams = GREEDY, eos_id: int | None = None,
           vocab_limit: int | None = None, on_token: Callable | None = None,
           return_logits: bool = False, step: Callable | None = None):
    """Sample up to N = max_new_tokens tokens per row; row b's token n sits at position L_b + n.

    A row stops after EOS or at ``limits[b]`` total tokens. ``step`` replaces the eager decode
    step (e.g. :func:`compiled_decode_step`). Returns (tokens (B, N), logits (B, N, V) or None).
    """
    dev = first_logits.device
    B, N = first_logits.shape[0], max_new_tokens
    vocab_limit = model.config.vocab_size if vocab_limit is None else vocab_limit
    gen = torch.Generator(device=dev).manual_seed(sampling.seed)
    step = step or _decode_step
    eos = NO_TOKEN if eos_id is None else eos_id
    limits = torch.as_tensor(limits, device=dev).long()
    length = torch.as_tensor(lengths, device=dev).long().clone()
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = torch.full((B, N), NO_TOKEN, dtype=torch.long, device=dev)
    logit_buf = [] if return_logits else None
    step_logits = first_logits
    for n in range(N):
        if n > 0:
            if n % _CHECK_DONE_EVERY == 0 and bool(done.all()):
                break
            pos = length - 1  # the newest token's position; stopped rows rewrite it harmlessly
            tok = torch.where(done, 0, out[:, n - 1])
            step_logits = step(model, cache, tok, pos).clone()  # clone: CUDA-graph output buffer
        tok = torch.where(done, NO_TOKEN, sample(step_logits, gen, sampling, vocab_limit))
        out[:, n] = tok
        if return_logits:
            logit_buf.append(step_logits)
        if on_token is not None:
            on_token(tok.cpu().numpy(), (~done).cpu().numpy())
        length = torch.where(done, length, length + 1)
        done = done | (tok == eos) | (length >= limits)
    if return_logits:
        logit_buf = torch.stack(logit_buf, 1)
        logit_buf = torch.cat([logit_buf, logit_buf.new_zeros(B, N - logit_buf.shape[1],
                                                              logit_buf.shape[2])], 1)
    return out, logit_buf


@torch.inference_mode()
def generate(model: SWAMLA, prompts, *, max_new_tokens: int, sampling: SamplingParams = GREEDY,
             eos_id: int | None = None, vocab_limit: int | None = None, prefill_chunk: int = 512,
             on_token: Callable | None = None, return_logits: bool = False,
             compile: bool = False) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after each prompt (lists of token ids).

    ``on_token(tokens, active)`` is called after every step with numpy (B,) arrays (streaming);
    ``return_logits`` also returns the float32 logits each token was chosen from; ``compile``
    uses :func:`compiled_decode_step`.
    """
    model.eval()
    cfg = model.config
    batch = plan_batch(prompts, cfg, max_new_tokens, prefill_chunk=prefill_chunk)
    cache, first = prefill(model, batch)
    vocab_limit = cfg.vocab_size if vocab_limit is None else min(vocab_limit, cfg.vocab_size)
    step = compiled_decode_step(model, cache) if compile else None
    out, step_logits = decode(model, cache, first, batch.lengths, batch.limits,
                              max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id,
                              vocab_limit=vocab_limit, on_token=on_token,
                              return_logits=return_logits, step=step)
    out = out.cpu().numpy()
    return GenerationResult([[int(t) for t in row if t != NO_TOKEN] for row in out], out,
                            None if step_logits is None else step_logits.cpu().numpy(),
                            cache_nbytes(cache))


# ------------------------------------------------------------------------------- command line
def _load_any(path, **config_overrides) -> SWAMLA:
    """A model from any checkpoint this project writes (``swamla.portable.detect_format``),
    a trainer's output_dir included (its newest checkpoint).

    Portable directories and native ``.pt`` files load directly; a native JAX directory is read
    through the portable tensors. Raises ``CheckpointError`` naming the accepted formats.
    """
    from swamla.convert_cli import read_tensors
    from swamla.portable import detect_format
    from swamla.portable import CheckpointError, apply_overrides
    from swamla_torch.convert import load_portable_tensors, load_pretrained

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a portable checkpoint "
                              "directory, a native JAX directory, a PyTorch .pt file or a "
                              "trainer's output_dir")
    if detect_format(path) == "portable":
        return load_pretrained(path, **config_overrides)
    cfg, tensors = read_tensors(path)
    cfg = apply_overrides(cfg, config_overrides, str(path))
    with torch.device("meta"):
        model = SWAMLA(cfg, REFERENCE_PLAN)  # decoding runs the reference attention path
    return load_portable_tensors(model.to_empty(device="cpu"), tensors, str(path))


def check_device(name: str) -> torch.device:
    """The torch device ``--device`` names; GenerationError saying why if this machine has none
    (torch itself would fail later with an AssertionError or a CUDA error)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise GenerationError(f"--device {name!r} is not a torch device name; use --device cpu, "
                              "cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch has no CUDA (a CPU-only build)" if torch.version.cuda is None
                   and torch.version.hip is None else
                   "torch finds no CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES)")
            raise GenerationError(f"--device {name} but {why}; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise GenerationError(f"--device {name} but only {count} CUDA device(s) are visible; "
                                  f"use --device cuda:0 .. cuda:{count - 1}")
    elif dev.type != "cpu":
        try:  # mps, xpu...: the backend's own availability test, whatever its name
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as e:
            first = str(e).split(". ")[0].splitlines()[0]  # torch may append a page of backends
            raise GenerationError(f"--device {name} is not usable here ({first}); use --device "
                                  "cpu") from None
    return dev


def main(argv=None) -> int:
    parser = build_parser("python -m swamla_torch.generate", __doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    args = parser.parse_args(argv)

    def load(args):
        overrides = {} if args.block_size is None else {"block_size": args.block_size}
        device = check_device(args.device)  # before the checkpoint is read
        model = _load_any(args.checkpoint, **overrides).to(device).eval()
        return model.to(torch.bfloat16) if args.dtype == "bfloat16" else model

    def gen(model, prompts, sampling, eos_id, vocab_limit, on_token):
        return generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                        eos_id=eos_id, vocab_limit=vocab_limit, prefill_chunk=args.prefill_chunk,
                        on_token=on_token, compile=args.compile).tokens

    return run_cli(args, backend="torch", load_model=load, generate=gen)


if __name__ == "__main__":
    sys.exit(main())
