"""The prepare command, the shard format and its errors, and loader lifecycle (prefetch thread)."""

import json
import threading

import numpy as np
import pytest
from conftest import make_docs, write_jsonl

from swamla.data import DataConfig, DataError, ShardSet, ShardWriter, build_loader
from swamla.data.prepare import main, prepare
from swamla.data.shards import read_meta


@pytest.fixture
def prepared(corpus, tmp_path):
    out = tmp_path / "shards"
    summary = main(["--source", "files", "--train-paths", *corpus[1].train_paths, "--out",
                    str(out), "--val-fraction", "0.1", "--num-workers", "0",
                    "--shard-tokens", "2000"])
    return out, summary


def test_prepare_writes_sidecars(prepared, corpus, tokenizer):
    out, summary = prepared
    assert summary["train_shards"] > 1 and summary["val_documents"] > 0
    assert summary["train_documents"] + summary["val_documents"] == len(corpus[0])
    meta = read_meta(out / "train_000000.bin")
    assert meta["tokenizer"] == "openai-community/gpt2" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 50257 and meta["eos_id"] == 50256
    shards = ShardSet(sorted(out.glob("train_*.bin")), tokenizer_name="gpt2")
    assert shards.num_tokens == summary["train_tokens"]
    # Reads spanning shard files equal the concatenation.
    flat = np.concatenate([np.fromfile(p, np.uint16) for p in sorted(out.glob("train_*.bin"))])
    np.testing.assert_array_equal(shards.read(1990, 30), flat[1990:2020])
    cfg = DataConfig(source="shards", train_paths=(str(out),))
    with build_loader(cfg, "val", batch_size=1, block_size=8) as a, \
            build_loader(cfg, "val", batch_size=1, block_size=8) as b:
        first = [next(a).inputs for _ in range(3)]
        assert all((x == next(b).inputs).all() for x in first)
        a.reset()
        assert (next(a).inputs == first[0]).all()


def test_prepare_limits_and_streaming(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(100))
    cfg = DataConfig(source="files", train_paths=(str(tmp_path / "a.jsonl"),), streaming=True,
                     num_workers=0, val_fraction=0.0, tokenize_chunk=16)
    s = prepare(cfg, tmp_path / "o1", max_documents=10, progress=False)
    assert s["train_documents"] == 10
    s = prepare(cfg, tmp_path / "o2", max_tokens=300, progress=False)
    assert 300 <= s["train_tokens"] < 300 + 200
    with pytest.raises(DataError, match="already holds .bin shards"):
        prepare(cfg, tmp_path / "o2", progress=False)


def test_prepare_with_worker_pool_matches_in_thread(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(64))
    cfg = DataConfig(source="files", train_paths=(str(tmp_path / "a.jsonl"),), val_fraction=0.0,
                     num_workers=0, cache_dir=str(tmp_path / "c"))
    prepare(cfg, tmp_path / "o0", progress=False)
    prepare(cfg.replace(num_workers=2), tmp_path / "o2", progress=False)
    assert (tmp_path / "o0/train_000000.bin").read_bytes() == \
        (tmp_path / "o2/train_000000.bin").read_bytes()


def _edit_meta(path, **changes):
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **changes}))


def test_shard_errors(prepared, tmp_path):
    out, _ = prepared
    first = out / "train_000000.bin"
    cfg = DataConfig(source="shards", train_paths=(str(first),))
    with pytest.raises(DataError, match="written by tokenizer 'openai-community/gpt2' but this "
                                        "run uses 'my/tok'; set tokenizer_name"):
        build_loader(cfg.replace(tokenizer_name="my/tok"), batch_size=1, block_size=8)
    _edit_meta(first, vocab_size=70000)
    with pytest.raises(DataError, match="vocab_size 70000 is too large for dtype uint16"):
        build_loader(cfg, batch_size=1, block_size=8)
    _edit_meta(first, vocab_size=50257)
    with pytest.raises(DataError, match="too few|fewer than one global batch"):
        build_loader(cfg, batch_size=64, block_size=1024)
    with first.open("r+b") as f:
        f.truncate(first.stat().st_size - 2)
    with pytest.raises(DataError, match="truncated or corrupt, re-run prepare"):
        build_loader(cfg, batch_size=1, block_size=8)
    first.with_suffix(".json").unlink()
    with pytest.raises(DataError, match="sidecar train_000000.json is missing"):
        build_loader(cfg, batch_size=1, block_size=8)
    with pytest.raises(DataError, match="holds no train_\\*.bin shards"):
        build_loader(cfg.replace(train_paths=(str(tmp_path),)), batch_size=1, block_size=8)


def test_writer_rejects_vocab_too_large_for_dtype(tmp_path):
    with pytest.raises(DataError, match="vocab_size 70000 does not fit shard dtype uint16"):
        ShardWriter(tmp_path, "train", tokenizer_name="t", vocab_size=70000, eos_id=0,
                    dtype="uint16")
    w = ShardWriter(tmp_path, "train", tokenizer_name="t", vocab_size=70000, eos_id=0)
    w.add(np.array([69999, 0], dtype=np.uint32))
    w.close()
    assert read_meta(tmp_path / "train_000000.bin")["dtype"] == "uint32"


def test_worker_error_surfaces_and_close_is_clean(prepared, monkeypatch):
    out, _ = prepared
    cfg = DataConfig(source="shards", train_paths=(str(out),), prefetch=2)
    before = threading.active_count()
    loader = build_loader(cfg, batch_size=1, block_size=8)
    next(loader)
    assert threading.active_count() == before + 1
    loader.close()
    loader.close()
    assert threading.active_count() == before

    def boom(start, length):
        raise OSError("disk went away")
    loader = build_loader(cfg, batch_size=1, block_size=8)
    monkeypatch.setattr(loader.shards, "read", boom)
    with loader, pytest.raises(OSError, match="disk went away"):
        next(loader)
    assert threading.active_count() == before
