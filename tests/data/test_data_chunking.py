"""What the text loader tokenizes: about what the batches need, a small file once per pass, and
an evaluation's documents once for all resets; rows and resume stay exact across passes."""

import json

import numpy as np
import pytest
from conftest import SpyTokenizer, make_docs, write_jsonl

import swamla.data.loader as loader_module
from swamla.data import DataConfig, build_loader, merge_states

EOS = 50256


def _rows(batch):
    return np.concatenate([batch.inputs, batch.targets[:, -1:]], axis=1)


@pytest.fixture
def small_file(tmp_path):
    """(docs, DataConfig) of a 3-document file with the default tokenize_chunk of 512."""
    docs = make_docs(3, lo=100, hi=120)  # over 100 tokens each
    write_jsonl(tmp_path / "small.jsonl", docs)
    cfg = DataConfig(source="files", train_paths=(str(tmp_path / "small.jsonl"),),
                     val_paths=(str(tmp_path / "small.jsonl"),), val_fraction=0.0,
                     shuffle=False, num_workers=0, cache_dir=str(tmp_path / "cache"))
    return docs, cfg


def test_first_batch_tokenizes_about_what_it_needs(corpus, small_file, tokenizer):
    """Before: the first chunk was tokenize_chunk documents, cycling a 3-document file 171 times."""
    for cfg in (small_file[1], corpus[1]):
        spy = SpyTokenizer(tokenizer)
        with build_loader(cfg, batch_size=2, block_size=16, tokenizer=spy) as loader:
            next(loader)
            seen = len(spy.seen)
        assert seen <= 8, f"{seen} documents tokenized for a first batch of 2 x 17 tokens"


def test_reset_keeps_workers_and_encoded_validation_documents(small_file, tokenizer,
                                                              monkeypatch):
    built = []

    class CountingEncoder(loader_module.Encoder):
        def __init__(self, *args, **kwargs):
            built.append(self)
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(loader_module, "Encoder", CountingEncoder)
    spy = SpyTokenizer(tokenizer)
    evals, tokenized = [], []
    with build_loader(small_file[1], "val", batch_size=4, block_size=16,
                      tokenizer=spy) as loader:
        for _ in range(3):
            loader.reset()  # joins the prefetch thread: the count below is settled
            tokenized.append(len(spy.seen))
            evals.append([_rows(next(loader)) for _ in range(2)])
        loader.reset()
        tokenized.append(len(spy.seen))
    assert len(built) == 1
    # Prefetching goes a few batches further, still within each lane's first document.
    assert tokenized[0] == 0 and 4 <= tokenized[1] <= 6 and len(set(tokenized[1:])) == 1
    for other in evals[1:]:
        np.testing.assert_array_equal(np.stack(other), np.stack(evals[0]))


def test_rows_are_exact_across_passes_over_a_small_file(small_file, tokenizer):
    docs, cfg = small_file
    ids = [np.append(tokenizer.encode(d), EOS) for d in docs]
    R, T, n = 4, 8, 60  # each lane reads about 4 documents: several passes over 3
    with build_loader(cfg, batch_size=R, block_size=T, tokenizer=tokenizer) as loader:
        got = [_rows(next(loader)) for _ in range(n)]
    for r in range(R):
        lane = np.concatenate([ids[g % 3] for g in range(r, n * R, R)])
        row = np.concatenate([b[r] for b in got])
        np.testing.assert_array_equal(row, lane[:len(row)])


def test_resume_across_passes_over_a_small_file(small_file, tokenizer):
    cfg = small_file[1].replace(shuffle=True)
    kw = dict(block_size=8, seed=3, tokenizer=tokenizer)
    with build_loader(cfg, batch_size=4, **kw) as loader:
        full = [_rows(next(loader)) for _ in range(30)]
    k = 13
    states = []
    for p in range(2):
        with build_loader(cfg, batch_size=2, process_index=p, process_count=2, **kw) as loader:
            for _ in range(k):
                next(loader)
            states.append(json.loads(json.dumps(loader.state_dict())))
    with build_loader(cfg, batch_size=4, **kw) as loader:
        loader.load_state_dict(merge_states(states))
        for i in range(k, 30):
            np.testing.assert_array_equal(_rows(next(loader)), full[i])
