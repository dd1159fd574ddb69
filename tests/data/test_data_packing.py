"""Packing exactness, world-size invariance, rank-disjointness and resume, for text and shards."""

import json

import numpy as np
import pytest
from conftest import SpyTokenizer

from swamla.data import DataError, build_loader, merge_states
from swamla.data.packing import segment_ids
from swamla.data.prepare import prepare

EOS = 50256


def rows_of(batch):
    """The full (B, T+1) packed rows: inputs plus the last target."""
    assert batch.inputs.dtype == batch.targets.dtype == batch.segment_ids.dtype == np.int32
    assert (batch.inputs[:, 1:] == batch.targets[:, :-1]).all()
    return np.concatenate([batch.inputs, batch.targets[:, -1:]], axis=1)


def global_batches(cfg, tokenizer, P, n, global_rows=4, block_size=16, seed=7, split="train"):
    """n global batches assembled from P processes' loaders."""
    parts = []
    for p in range(P):
        with build_loader(cfg, split, batch_size=global_rows // P, block_size=block_size,
                          seed=seed, process_index=p, process_count=P,
                          tokenizer=tokenizer) as loader:
            parts.append([rows_of(next(loader)) for _ in range(n)])
    return [np.concatenate([parts[p][i] for p in range(P)]) for i in range(n)]


@pytest.fixture
def shards(corpus, tmp_path, tokenizer):
    docs, cfg = corpus
    prepare(cfg.replace(val_fraction=0.1), tmp_path / "shards", progress=False)
    return cfg.replace(source="shards", train_paths=(str(tmp_path / "shards"),), shuffle=True)


def test_text_packing_is_exact(corpus, tokenizer):
    """Row r holds documents r, r+R, ... each + EOS, every token once, in order, no padding."""
    docs, cfg = corpus
    ids = [np.append(tokenizer.encode(d), EOS) for d in docs]
    R, T, n = 2, 16, 40
    with build_loader(cfg, batch_size=R, block_size=T, tokenizer=tokenizer) as loader:
        batches = [next(loader) for _ in range(n)]
    for r in range(R):
        got = np.concatenate([rows_of(b)[r] for b in batches])
        lane = np.concatenate([ids[g] for g in range(r, len(docs), R)] * 2)
        np.testing.assert_array_equal(got, lane[:len(got)])
    b = batches[5]
    np.testing.assert_array_equal(b.segment_ids, segment_ids(b.inputs, EOS))
    assert (b.segment_ids[:, 0] == 0).all()


def test_segment_ids_follow_eos():
    x = np.array([[5, EOS, 6, 7, EOS, EOS, 8]])
    assert segment_ids(x, EOS).tolist() == [[0, 0, 1, 1, 1, 2, 3]]


def test_shard_packing_is_exact(shards, corpus, tokenizer):
    docs, _ = corpus
    stream = np.concatenate([np.append(tokenizer.encode(d), EOS) for d in docs
                             if not _is_val(d)])
    T, n = 16, 30
    with build_loader(shards.replace(shuffle=False), batch_size=1, block_size=T) as loader:
        got = np.concatenate([rows_of(next(loader))[0] for _ in range(n)])
    np.testing.assert_array_equal(got, stream[:n * (T + 1)])
    # Shuffled: one epoch visits every sequence exactly once.
    with build_loader(shards, batch_size=2, block_size=T, seed=1) as loader:
        per_epoch = len(stream) // (T + 1) // 2
        seen = {tuple(row) for _ in range(per_epoch) for row in rows_of(next(loader))}
    expected = {tuple(stream[i * (T + 1):(i + 1) * (T + 1)]) for i in range(2 * per_epoch)}
    assert len(seen) == 2 * per_epoch and seen <= {tuple(stream[i * (T + 1):(i + 1) * (T + 1)])
                                                    for i in range(len(stream) // (T + 1))}
    assert len(expected) > 0


def _is_val(text):
    from swamla.data.sources import is_val_document
    return is_val_document(text, 0.1)


@pytest.mark.parametrize("kind", ["text", "shards"])
def test_world_size_invariance(kind, corpus, shards, tokenizer):
    cfg = corpus[1].replace(shuffle=True) if kind == "text" else shards
    ref = global_batches(cfg, tokenizer, 1, 6)
    for P in (2, 4):
        got = global_batches(cfg, tokenizer, P, 6)
        assert all((a == b).all() for a, b in zip(ref, got)), f"P={P} differs from P=1"
    assert not all((a == b).all() for a, b in zip(ref, global_batches(cfg, tokenizer, 1, 6,
                                                                      seed=8)))


def test_ranks_read_disjoint_documents(corpus, tokenizer):
    docs, cfg = corpus
    spies = [SpyTokenizer(tokenizer) for _ in range(2)]
    for p, spy in enumerate(spies):
        with build_loader(cfg, batch_size=2, block_size=16, process_index=p, process_count=2,
                          tokenizer=spy) as loader:
            next(loader)
    a, b = set(spies[0].seen), set(spies[1].seen)
    assert a and b and not a & b
    assert {docs.index(d) % 4 for d in a} == {0, 1} and {docs.index(d) % 4 for d in b} == {2, 3}


@pytest.mark.parametrize("kind", ["text", "shards"])
def test_resume_continues_exactly(kind, corpus, shards, tokenizer):
    cfg = corpus[1].replace(shuffle=True) if kind == "text" else shards
    full = global_batches(cfg, tokenizer, 1, 20)
    k = 11
    # Two processes run k steps and save; a fresh run of 1, 2 or 4 processes resumes.
    states = []
    for p in range(2):
        with build_loader(cfg, batch_size=2, block_size=16, seed=7, process_index=p,
                          process_count=2, tokenizer=tokenizer) as loader:
            for _ in range(k):
                next(loader)
            states.append(json.loads(json.dumps(loader.state_dict())))
    state = merge_states(states)
    for P in (1, 2, 4):
        parts = []
        for p in range(P):
            with build_loader(cfg, batch_size=4 // P, block_size=16, seed=7, process_index=p,
                              process_count=P, tokenizer=tokenizer) as loader:
                loader.load_state_dict(state)
                parts.append([rows_of(next(loader)) for _ in range(20 - k)])
        for i in range(20 - k):
            np.testing.assert_array_equal(np.concatenate([q[i] for q in parts]), full[k + i])


def test_state_mismatch_and_partial_state_errors(corpus, tokenizer):
    cfg = corpus[1]
    with build_loader(cfg, batch_size=2, block_size=16, process_index=0, process_count=2,
                      tokenizer=tokenizer) as loader:
        next(loader)
        state = loader.state_dict()
    with build_loader(cfg, batch_size=2, block_size=32, tokenizer=tokenizer) as other:
        with pytest.raises(DataError, match=r"block_size 16 -> 32; global batch size \(rows\) 4 "
                                            "-> 2.*--resume_data continue.*--resume_data restart"):
            other.load_state_dict(state)
    with build_loader(cfg, batch_size=2, block_size=16, process_index=1, process_count=2,
                      tokenizer=tokenizer) as other:
        with pytest.raises(DataError, match=r"no position for rows \[2, 3\].*merge_states"):
            other.load_state_dict(state)
