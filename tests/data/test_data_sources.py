"""Each text source on small files, the streaming machinery, and every bad-input error."""

import dataclasses
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_docs, write_jsonl

from swamla.data import DataConfig, DataError, build_loader
from swamla.data.sources import is_val_document, open_source


def _docs_of(cfg, split="train"):
    source, hashed = open_source(cfg, split, shuffle=False, seed=0)
    return [t for _, t in source.iter_epoch(0, 0)
            if not hashed or is_val_document(t, cfg.val_fraction) == (split == "val")]


def _cfg(tmp_path, *paths, **kw):
    kw = {"val_fraction": 0.0, "shuffle": False, "num_workers": 0,
          "cache_dir": str(tmp_path / "cache"), **kw}
    return DataConfig(source="files", train_paths=tuple(str(p) for p in paths), **kw)


def test_jsonl_parquet_txt_sources(tmp_path):
    docs = make_docs(30)
    write_jsonl(tmp_path / "a.jsonl", docs[:10], field="body")
    pq.write_table(pa.table({"body": docs[10:20], "id": list(range(10))}), tmp_path / "b.parquet")
    assert _docs_of(_cfg(tmp_path, tmp_path / "a.jsonl", tmp_path / "b.parquet",
                         text_field="body")) == docs[:20]
    (tmp_path / "c.txt").write_text("\n\n".join(docs[20:]))
    assert _docs_of(_cfg(tmp_path, tmp_path / "c.txt", text_unit="paragraph")) == docs[20:]
    assert _docs_of(_cfg(tmp_path, tmp_path / "c.txt", text_unit="line"))[0] == docs[20]
    assert len(_docs_of(_cfg(tmp_path, tmp_path / "c.txt"))) == 1  # one document per file
    assert _docs_of(_cfg(tmp_path, str(tmp_path / "*.jsonl"), text_field="body")) == docs[:10]


def test_streaming_machinery_on_local_jsonl(tmp_path, tokenizer):
    """FineWeb's code path (datasets streaming + buffer shuffle + skip) on a local file."""
    docs = make_docs(40)
    write_jsonl(tmp_path / "s.jsonl", docs)
    cfg = _cfg(tmp_path, tmp_path / "s.jsonl", streaming=True)
    assert _docs_of(cfg) == docs
    source, _ = open_source(cfg.replace(shuffle_buffer=8), "train", shuffle=True, seed=3)
    e0 = [t for _, t in source.iter_epoch(0, 0)]
    assert sorted(e0) == sorted(docs) and e0 != docs
    assert [t for _, t in source.iter_epoch(0, 25)] == e0[25:]  # restart point is exact
    assert [t for _, t in source.iter_epoch(1, 0)] != e0  # a new order each epoch
    kw = dict(batch_size=2, block_size=16, seed=1, tokenizer=tokenizer)
    with build_loader(cfg.replace(shuffle=True, shuffle_buffer=8), **kw) as a:
        first = [next(a).inputs for _ in range(6)]
        state = a.state_dict()
        rest = [next(a).inputs for _ in range(4)]
    with build_loader(cfg.replace(shuffle=True, shuffle_buffer=8), **kw) as b:
        b.load_state_dict(state)
        assert all((x == y).all() for x, y in zip(rest, [next(b).inputs for _ in range(4)]))
    assert first


def test_hash_split_is_disjoint_and_stable(tmp_path):
    docs = make_docs(400)
    write_jsonl(tmp_path / "a.jsonl", docs)
    cfg = _cfg(tmp_path, tmp_path / "a.jsonl", val_fraction=0.2)
    train, val = _docs_of(cfg, "train"), _docs_of(cfg, "val")
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert 40 < len(val) < 120
    write_jsonl(tmp_path / "v.jsonl", docs[:5])
    assert _docs_of(cfg.replace(val_paths=(str(tmp_path / "v.jsonl"),)), "val") == docs[:5]


def test_fineweb_offline_error_names_local_options(tokenizer):
    with pytest.raises(DataError, match="HuggingFaceFW/fineweb-edu.*unreachable.*--source files"
                                        ".*swamla.data.prepare.*--source shards"):
        build_loader(DataConfig(), batch_size=1, block_size=8, tokenizer=tokenizer)


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing.jsonl", r"missing.jsonl does not exist"),
    (lambda d: str(d / "nope*.jsonl"), r"glob .*nope\*.jsonl.* matches no files"),
    (lambda d: (d / "empty.jsonl").write_text("") and None or d / "empty.jsonl",
     r"empty.jsonl is empty"),
    (lambda d: write_jsonl(d / "body.jsonl", ["x"], field="body"),
     r"body.jsonl: records have no field 'text' \(fields: \['body'\]\); set text_field"),
    (lambda d: (d / "bad.txt").write_bytes(b"ok\n\xff\xfe\n") and d / "bad.txt",
     r"bad.txt: bytes are not valid UTF-8.*re-encode"),
    (lambda d: (d / "bad.jsonl").write_bytes(b'{"text": "a\xff"}\n') and d / "bad.jsonl",
     r"bad.jsonl: bytes are not valid UTF-8"),
    (lambda d: (d / "x.csv").write_text("a,b\n") and d / "x.csv", r"unsupported file type '.csv'"),
    (lambda d: (d / "blank.txt").write_text("\n \n\n") and d / "blank.txt",
     r"blank.txt holds no text \(only blank lines, or records without text\); remove it from "
     "train_paths or fill it"),
    (lambda d: (d / "braces.jsonl").write_text("{}\n{}\n") and d / "braces.jsonl",
     r"braces.jsonl holds no text"),
    (lambda d: write_jsonl(d / "blank.jsonl", ["", "  "]), r"blank.jsonl holds no text"),
])
def test_bad_files_raise_clear_errors(tmp_path, tokenizer, setup, message):
    path = setup(tmp_path)
    with pytest.raises(DataError, match=message):
        build_loader(_cfg(tmp_path, path), batch_size=1, block_size=8, tokenizer=tokenizer)


def test_streamed_missing_field_and_null_text_surface_from_the_worker(tmp_path, tokenizer):
    write_jsonl(tmp_path / "body.jsonl", ["x"], field="body")
    with build_loader(_cfg(tmp_path, tmp_path / "body.jsonl", streaming=True), batch_size=1,
                      block_size=8, tokenizer=tokenizer) as loader:
        with pytest.raises(DataError, match="no field 'text'"):
            next(loader)
    (tmp_path / "null.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    with build_loader(_cfg(tmp_path, tmp_path / "null.jsonl"), batch_size=1, block_size=8,
                      tokenizer=tokenizer) as loader:
        with pytest.raises(DataError, match="null.jsonl: record 1 has text=None, not a string"):
            next(loader)


def test_empty_split_is_an_error(tmp_path, tokenizer):
    """One document cannot be spared for validation: the error names fixes that work."""
    write_jsonl(tmp_path / "a.jsonl", make_docs(1))
    cfg = dataclasses.replace(_cfg(tmp_path, tmp_path / "a.jsonl"), val_fraction=1e-9)
    with build_loader(cfg, "val", batch_size=1, block_size=8, tokenizer=tokenizer) as loader:
        with pytest.raises(DataError, match="no documents in the 'val' split; it has fewer than "
                                            "two documents.*--val_paths"):
            next(loader)
    with build_loader(cfg.replace(val_paths=(str(tmp_path / "a.jsonl"),)), "val", batch_size=1,
                      block_size=8, tokenizer=tokenizer) as loader:
        assert next(loader).inputs.shape == (1, 8)  # the fix it names
    with pytest.raises(DataError, match="split='val' needs validation data"):
        build_loader(_cfg(tmp_path, tmp_path / "a.jsonl"), "val", batch_size=1, block_size=8,
                     tokenizer=tokenizer)


def test_streamed_files_of_only_empty_documents_are_an_error(tmp_path, tokenizer):
    """Rows of nothing but EOS are never trained on (local files are refused when opened, as
    test_bad_files_raise_clear_errors shows; a stream finds out when it has read an epoch)."""
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    cfg = _cfg(tmp_path, tmp_path / "blank.jsonl", val_paths=(str(tmp_path / "blank.jsonl"),),
               streaming=True)
    for split in ("train", "val"):
        with build_loader(cfg, split, batch_size=1, block_size=8, tokenizer=tokenizer) as loader:
            with pytest.raises(DataError, match=rf"blank.jsonl: every document of the '{split}' "
                                                "split is empty.*check text_field"):
                next(loader)
    (tmp_path / "some.jsonl").write_text('{"text": ""}\n{"text": "a word"}\n')
    with build_loader(cfg.replace(train_paths=(str(tmp_path / "some.jsonl"),)), batch_size=1,
                      block_size=8, tokenizer=tokenizer) as loader:
        assert (next(loader).inputs != tokenizer.eos_id).any()  # some text is enough


def test_a_failed_prepare_writes_no_shards_and_can_be_rerun(tmp_path):
    """All-empty documents, a malformed line half-way, a killed run: no shard reaches the output
    directory, so the same command runs again once the input is fixed."""
    from swamla.data.prepare import prepare

    out = tmp_path / "out"
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"blank.jsonl holds no text"):
        prepare(_cfg(tmp_path, tmp_path / "blank.jsonl"), out, progress=False)
    assert list(out.iterdir()) == []
    broken = write_jsonl(tmp_path / "broken.jsonl", make_docs(40))
    broken.write_text(broken.read_text() + "{not json\n")
    with pytest.raises(DataError, match="broken.jsonl"):
        prepare(_cfg(tmp_path, broken, tokenize_chunk=8), out, progress=False)
    assert list(out.iterdir()) == []
    killed = out / ".partial-999999999"  # a prepare killed mid-way (no such process)
    killed.mkdir()
    (killed / "train_000000.bin").write_bytes(b"\0" * 64)
    alive = out / f".partial-{os.getpid()}-notes"  # not a process id: left alone
    alive.mkdir()
    summary = prepare(_cfg(tmp_path, write_jsonl(tmp_path / "a.jsonl", make_docs(40))), out,
                      progress=False)
    assert summary["train_documents"] == 40 and not killed.exists() and alive.exists()
    assert sorted(p.name for p in out.glob("train_*")) == ["train_000000.bin",
                                                           "train_000000.json"]


def test_tokenizer_errors_are_data_errors(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", make_docs(3))
    with pytest.raises(DataError, match="tokenizer_name: tokenizer directory .*nonexistent_tok "
                                        "does not exist"):
        build_loader(_cfg(tmp_path, tmp_path / "a.jsonl",
                          tokenizer_name=str(tmp_path / "nonexistent_tok")),
                     batch_size=1, block_size=8)
