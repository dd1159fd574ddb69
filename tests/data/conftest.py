"""Shared fixtures of the data-pipeline tests: small corpora written to tmp_path, one tokenizer."""

import json

import numpy as np
import pytest

from swamla.data import DataConfig
from swamla.tokenizer import load_tokenizer

WORDS = ("the a of and to in is was for on that with as by it at from his her an "
         "model data token window latent attention").split()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("openai-community/gpt2")


def make_docs(n: int, seed: int = 0, lo: int = 3, hi: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS, int(rng.integers(lo, hi)))) for i in range(n)]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


@pytest.fixture
def corpus(tmp_path):
    """(docs, DataConfig) of 200 JSONL documents, no validation split, unshuffled."""
    docs = make_docs(200)
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    cfg = DataConfig(source="files", train_paths=(str(tmp_path / "corpus.jsonl"),),
                     val_fraction=0.0, shuffle=False, num_workers=0, prefetch=2,
                     tokenize_chunk=64, cache_dir=str(tmp_path / "cache"))
    return docs, cfg


class SpyTokenizer:
    """A tokenizer that records every text it is asked to encode."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []
        self.eos_id, self.name, self.backend = tok.eos_id, tok.name, tok.backend

    def encode_batch(self, texts):
        self.seen.extend(texts)
        return self.tok.encode_batch(texts)
