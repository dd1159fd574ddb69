"""Framework-free pieces of generation, shared by ``swamla_{jax,torch}.generate``.

- :class:`SamplingParams`: greedy / temperature / top-k / top-p and the seed, checked once.
- :func:`plan_batch`: prompts -> one right-padded batch with per-row lengths and length limits, and
  the static sizes (prefill chunk, MLA cache slots) both backends compile for.
- :func:`cache_numbers_per_token`: the compressed cache (SPEC 3.2: SWA ring + sink, MLA latent)
  against an uncompressed KV cache of the same model, from the config alone.
- :class:`TextStreamer` and the ``generate`` command line both backends expose.

Batches are right-padded: row b's prompt occupies positions ``0 .. L_b - 1`` (so its positions
start at 0 at its first real token and its sink is its own first ``swa_sink_size`` tokens), and
every row then decodes at its own position ``L_b + n``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from swamla.config import BlockKind, ModelConfig


class GenerationError(ValueError):
    """Input that generation cannot run on (empty or too long prompt, bad sampling settings)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the logits.

    ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by the temperature, then
    ``top_k > 0`` keeps the k largest and ``top_p < 1`` the smallest set of tokens whose probability
    reaches ``top_p`` (always at least one), and a token is drawn from the stream seeded by
    ``seed``.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t < 0:
            raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), "
                                  f"got {t!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise GenerationError(f"top_p must lie in (0, 1] (1 = off), got {p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise GenerationError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def structure(self) -> tuple[bool, bool, bool]:
        """(greedy, top-k on, top-p on): what a compiled sampler is specialised on; the values
        themselves are runtime inputs, so changing them does not recompile."""
        return self.greedy, self.top_k > 0, self.top_p < 1.0


GREEDY = SamplingParams(temperature=0.0)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What both backends' ``generate`` return."""

    tokens: list[list[int]]          # new tokens per row (EOS included when it stopped the row)
    token_array: np.ndarray          # (B, N) integers, NO_TOKEN after a row stopped
    step_logits: np.ndarray | None   # (B, N, V) float32: logits that chose token n (return_logits)
    cache_bytes: int


NO_TOKEN = -1  # in the output: the row had already stopped


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Prompts laid out for cached generation (the same in both backends)."""

    tokens: np.ndarray    # (B, T_pad) int32, right-padded with 0
    lengths: np.ndarray   # (B,) int32 prompt lengths L_b >= 1
    limits: np.ndarray    # (B,) int32 total length cap: min(L_b + max_new_tokens, block_size)
    chunk: int            # prefill chunk length; T_pad is a multiple of it
    cache_len: int        # MLA cache slots S (>= every position fed, >= T_pad)
    max_new_tokens: int

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan_batch(prompts, cfg: ModelConfig, max_new_tokens: int, *, prefill_chunk: int = 512,
               bucket: int = 64) -> PromptBatch:
    """Validate token-id prompts and pad them into a :class:`PromptBatch`.

    ``prompts`` is one sequence of token ids or a list of them. Sizes are rounded up (``bucket``,
    powers of two for short prompts) so that prompts of similar length reuse one compilation.
    """
    single = (isinstance(prompts, np.ndarray) and prompts.ndim == 1) or (
        isinstance(prompts, Sequence) and len(prompts) and isinstance(prompts[0], (int, np.integer)))
    if single:
        prompts = [prompts]
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    if not prompts:
        raise GenerationError("no prompts given; pass at least one prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise GenerationError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
    for b, p in enumerate(prompts):
        if p.size == 0:
            raise GenerationError(f"prompt {b} is empty (0 tokens); give at least one token of "
                                  "text (e.g. the tokenizer's EOS token to start from nothing)")
        if p.size >= cfg.block_size:
            raise GenerationError(
                f"prompt {b} has {p.size} tokens but the model's block_size is {cfg.block_size}, "
                f"which leaves no room to generate; shorten the prompt to at most "
                f"{cfg.block_size - 1} tokens (or load the model with a larger block_size)")
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise GenerationError(f"prompt {b} has token ids outside [0, {cfg.vocab_size}) "
                                  f"(min {lo}, max {hi}); it was tokenized for another vocabulary")
    lengths = np.array([p.size for p in prompts], np.int32)
    max_len = int(lengths.max())
    short = 1 << max(4, (max_len - 1).bit_length())  # 16, 32, 64, ... for short prompts
    chunk = min(prefill_chunk, short)
    t_pad = _round_up(max_len, chunk)
    tokens = np.zeros((len(prompts), t_pad), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :p.size] = p
    limits = np.minimum(lengths + max_new_tokens, cfg.block_size).astype(np.int32)
    cache_len = max(t_pad, _round_up(int(limits.max()), bucket))
    return PromptBatch(tokens, lengths, limits, chunk, cache_len, int(max_new_tokens))


def swa_cache_slots(cfg: ModelConfig) -> int:
    """Key/value slots an SWA layer keeps, whatever the length: the window ring plus the sink."""
    return cfg.swa_window + cfg.swa_sink_size


def cache_numbers_per_token(cfg: ModelConfig, context: int) -> dict[str, float]:
    """Cached numbers per token at ``context`` tokens, compressed vs an uncompressed KV cache.

    Compressed (this module): SWA layers keep ``2 * (window + sink) * n_head_kv * head_dim``
    numbers in all (spread over the context), MLA layers ``kv_lora_rank + qk_rope_head_dim`` per
    token. Uncompressed: every layer keeps its full keys and values for every token (MLA expanded:
    ``n_head * (dn + dr + dv)``).
    """
    kinds = cfg.block_kinds
    n_swa, n_mla = kinds.count(BlockKind.SWA), kinds.count(BlockKind.MLA)
    swa_kv = 2 * cfg.n_head_kv * cfg.head_dim
    mla_full = cfg.n_head * (cfg.mla_qk_head_dim + cfg.v_head_dim)
    mla_latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    compressed = n_swa * swa_kv * swa_cache_slots(cfg) / context + n_mla * mla_latent
    uncompressed = n_swa * swa_kv + n_mla * mla_full
    return {"compressed": compressed, "uncompressed": float(uncompressed),
            "ratio": uncompressed / compressed}


class TextStreamer:
    """Writes the text of a growing token sequence as it grows (never half a UTF-8 character)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def put(self, token_id: int) -> None:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its rest
            return
        self._write(text)

    def end(self) -> None:
        self._write(self.tokenizer.decode(self.ids))
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


# ------------------------------------------------------------------------------- command line
def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The ``generate`` arguments common to both backends."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="portable checkpoint directory, native JAX directory "
                                      "(config.json + params/) or native PyTorch .pt file")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for a batch (default: read stdin)")
    p.add_argument("--prompt-file", default=None, help="file whose lines are the prompts")
    p.add_argument("--tokenizer", default="openai-community/gpt2",
                   help="tokenizer name or directory (GPT-2 works offline)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--block-size", type=int, default=None,
                   help="override the model's block_size (RoPE positions are computed on the fly)")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute and cache dtype (parameters stay float32)")
    return p


def read_prompts(args) -> list[str]:
    if args.prompt is not None and args.prompt_file is not None:
        raise GenerationError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise GenerationError(f"prompt file {path} does not exist")
        return [line for line in path.read_text().splitlines() if line.strip()]
    if args.prompt is not None:
        return list(args.prompt)
    return [sys.stdin.read()]


def run_cli(args, *, backend: str, load_model: Callable, generate: Callable) -> int:
    """Load, tokenize, generate and print; ``error: ...`` and exit status 2 on bad input.

    ``load_model(args)`` returns a model; ``generate(model, prompts, sampling, eos_id,
    vocab_limit, on_token)`` returns per-row lists of new token ids and calls
    ``on_token(tokens, active)`` after each step (numpy (B,) arrays).
    """
    from swamla.tokenizer import load_tokenizer  # transformers is imported only when needed

    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        texts = read_prompts(args)
        tokenizer = load_tokenizer(args.tokenizer)
        prompts = [tokenizer.encode(t) for t in texts]
        for b, p in enumerate(prompts):
            if not p:
                raise GenerationError(f"prompt {b} is empty (0 tokens after tokenization); give "
                                      "some text with --prompt, --prompt-file or stdin")
        model = load_model(args)
        plan_batch(prompts, model.config, args.max_new_tokens)  # bad prompts fail before output
        eos_id = None if args.ignore_eos else tokenizer.eos_id
        streamer = TextStreamer(tokenizer) if len(prompts) == 1 else None

        def on_token(tokens, active):
            if streamer is not None and active[0] and tokens[0] != eos_id:
                streamer.put(int(tokens[0]))

        if streamer is not None:
            sys.stdout.write(texts[0])
            sys.stdout.flush()
        start = time.perf_counter()
        outs = generate(model, prompts, sampling, eos_id, tokenizer.vocab_size, on_token)
        elapsed = time.perf_counter() - start
    except (ValueError, FileNotFoundError) as e:  # GenerationError, CheckpointError, ConfigError...
        print(f"error: {e}", file=sys.stderr)
        return 2
    if streamer is not None:
        streamer.end()
    else:
        for b, (text, new) in enumerate(zip(texts, outs)):
            print(f"--- [{b}] {text}{tokenizer.decode(new)}")
    n = sum(len(o) for o in outs)
    print(f"[{backend}] {n} new tokens in {elapsed:.2f} s ({n / max(elapsed, 1e-9):.1f} tok/s, "
          "compilation included)", file=sys.stderr)
    return 0
