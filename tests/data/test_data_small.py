"""A small corpus (39 documents: none hashes into the 0.5% validation split) trains as a user
would try it: prepared to shards or read directly, it has a validation split of one document."""

import numpy as np
import pytest
from conftest import make_docs, write_jsonl

from swamla.data import DataConfig, DataError, build_loader
from swamla.data.prepare import prepare
from swamla.data.sources import is_val_document


@pytest.fixture
def small(tmp_path):
    docs = make_docs(39, seed=5)
    assert not any(is_val_document(d, 0.005) for d in docs)  # the case this file is about
    return docs, write_jsonl(tmp_path / "small.jsonl", docs)


def _rows_text(tokenizer, batch):
    return tokenizer.decode(batch.inputs.ravel().tolist())


def test_prepare_holds_out_one_document_and_training_reads_both_splits(small, tmp_path,
                                                                         tokenizer):
    docs, path = small
    cfg = DataConfig(source="files", train_paths=(str(path),), num_workers=0, shuffle=False,
                     cache_dir=str(tmp_path / "cache"))
    summary = prepare(cfg, tmp_path / "shards", progress=False)
    assert (summary["train_documents"], summary["val_documents"]) == (38, 1)
    shards = DataConfig(source="shards", train_paths=(str(tmp_path / "shards"),))
    kw = dict(batch_size=2, block_size=64, tokenizer=tokenizer)
    with build_loader(shards, "train", **kw) as train, build_loader(shards, "val", **kw) as val:
        assert next(train).inputs.shape == (2, 64)
        held = [next(val) for _ in range(3)]  # the one document, read as a cycle
    assert docs[-1][:40] in _rows_text(tokenizer, held[0])
    # Read directly, the text loaders make the same split: the last document is validation only.
    with build_loader(cfg, "val", **kw) as val, build_loader(cfg, "train", **kw) as train:
        assert docs[-1][:40] in _rows_text(tokenizer, next(val))
        seen = "".join(_rows_text(tokenizer, next(train)) for _ in range(40))
    assert docs[0][:40] in seen and docs[-1][:40] not in seen


def test_streamed_small_corpus_makes_the_same_split(small, tmp_path, tokenizer):
    docs, path = small
    cfg = DataConfig(source="files", train_paths=(str(path),), num_workers=0, streaming=True,
                     shuffle_buffer=8)
    with build_loader(cfg, "val", batch_size=1, block_size=32, tokenizer=tokenizer) as val:
        assert docs[-1][:30] in _rows_text(tokenizer, next(val))


def test_shards_without_a_validation_split_name_fixes_that_work(small, tmp_path, tokenizer):
    """A shard folder with no val_*.bin (an older prepare): both fixes the error names work."""
    docs, path = small
    cfg = DataConfig(source="files", train_paths=(str(path),), num_workers=0,
                     cache_dir=str(tmp_path / "cache"))
    prepare(cfg, tmp_path / "shards", progress=False)
    for f in (tmp_path / "shards").glob("val_*"):
        f.unlink()
    shards = DataConfig(source="shards", train_paths=(str(tmp_path / "shards"),))
    with pytest.raises(DataError, match="no val_\\*.bin shards.*--val_paths.*new --out"):
        build_loader(shards, "val", batch_size=1, block_size=16)
    summary = prepare(cfg, tmp_path / "again", progress=False)  # the named re-run
    assert summary["val_documents"] == 1
    with build_loader(shards.replace(val_paths=(str(tmp_path / "again"),)), "val",
                      batch_size=1, block_size=16) as val:
        assert next(val).inputs.shape == (1, 16)


def test_one_document_trains_and_its_validation_error_names_the_fix(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", make_docs(1))
    cfg = DataConfig(source="files", train_paths=(str(path),), num_workers=0,
                     cache_dir=str(tmp_path / "cache"))
    summary = prepare(cfg, tmp_path / "shards", progress=False)
    assert (summary["train_documents"], summary["val_documents"]) == (1, 0)
    with build_loader(cfg, "train", batch_size=1, block_size=8, tokenizer=tokenizer) as train:
        assert np.all(next(train).inputs >= 0)
    with build_loader(cfg, "val", batch_size=1, block_size=8, tokenizer=tokenizer) as val:
        with pytest.raises(DataError, match="fewer than two documents.*--val_paths"):
            next(val)
