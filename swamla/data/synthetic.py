"""Small learnable token shards for smoke tests and setup checks (no tokenizer, no network).

Each document repeats a short random motif over a small alphabet and ends with EOS, so a model
learns it within a few dozen steps: a run whose loss does not fall is broken.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from swamla.data.shards import ShardWriter

GPT2_VOCAB, GPT2_EOS = 50257, 50256


def write_synthetic_shards(directory: str | Path, n_docs: int = 400, seed: int = 0,
                           alphabet: int = 64) -> Path:
    """Write ``train`` and ``val`` GPT-2-compatible shards into ``directory``; returns it."""
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_docs), ("val", max(n_docs // 10, 4))):
        writer = ShardWriter(directory, split, tokenizer_name="openai-community/gpt2",
                             vocab_size=GPT2_VOCAB, eos_id=GPT2_EOS)
        for _ in range(n):
            motif = rng.integers(0, alphabet, rng.integers(3, 9))
            writer.add(np.concatenate([np.tile(motif, rng.integers(4, 20)), [GPT2_EOS]]))
        writer.close()
    return directory
