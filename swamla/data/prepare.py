"""Pre-tokenize a text source into binary shards: ``python -m swamla.data.prepare``.

    python -m swamla.data.prepare --source files --train-paths 'corpus/*.jsonl' --out data/
    python -m swamla.data.prepare --source fineweb-edu --max-tokens 1e9 --out data/fineweb/

Documents are read once in source order (no shuffle: the loader shuffles sequences), split into
train/val by the same stable text hash the text loaders use (or ``--val-paths``; a corpus too
small for the hash to pick a document holds out its last one, see ``sources``), tokenized in
batches, EOS-terminated and appended to ``train_*.bin`` / ``val_*.bin`` shards with JSON sidecars
(see ``shards``). Train with ``--source shards --train-paths data/``. Shards are written to a
hidden ``.partial-<pid>`` directory inside the output and moved into it only once every check
has passed, so a failed or interrupted run leaves no shards behind and can simply be re-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from swamla.data.config import DataConfig, DataError
from swamla.data.encode import Encoder, data_tokenizer
from swamla.data.shards import ShardWriter
from swamla.data.sources import open_source

logger = logging.getLogger(__name__)
PARTIAL = ".partial-"  # + the writing process's id: where shards are written before the checks


def prepare(cfg: DataConfig, out_dir: str | Path, *, max_tokens: int | None = None,
            max_documents: int | None = None, shard_tokens: int = 100_000_000,
            progress: bool = True) -> dict:
    """Write the shards of ``cfg``'s text source to ``out_dir``; returns a summary dict.

    ``max_tokens`` / ``max_documents`` bound what is read (needed to take a slice of FineWeb).
    """
    if cfg.source == "shards":
        raise DataError("prepare reads text: --source must be 'fineweb-edu' or 'files'")
    tokenizer = data_tokenizer(cfg.tokenizer_name)
    out_dir = Path(out_dir)
    if any(out_dir.glob("*.bin")):
        raise DataError(f"{out_dir} already holds .bin shards; choose an empty --out directory "
                        "so shards of different runs do not mix")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out_dir)
    work = out_dir / f"{PARTIAL}{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)  # a killed run's, whose id this process now has
    work.mkdir()
    try:
        summary = _prepare(cfg, tokenizer, work, max_tokens, max_documents, shard_tokens,
                           progress)
        # Sidecars first: a shard visible in out_dir always has its sidecar.
        for path in sorted(work.iterdir(), key=lambda p: (p.suffix != ".json", p.name)):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"out": str(out_dir), **summary}


def _remove_dead_partials(out_dir: Path) -> None:
    """Remove the partial shards of prepare runs that were killed (their process is gone)."""
    for path in out_dir.glob(f"{PARTIAL}*"):
        try:
            os.kill(int(path.name[len(PARTIAL):]), 0)
        except ValueError:  # not one of ours
            continue
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _prepare(cfg, tokenizer, work, max_tokens, max_documents, shard_tokens, progress) -> dict:
    writers = {split: ShardWriter(work, split, tokenizer_name=tokenizer.name,
                                  vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                                  shard_tokens=shard_tokens) for split in ("train", "val")}
    encoder = Encoder(tokenizer, cfg.num_workers)
    eos = np.array([tokenizer.eos_id], dtype=np.uint32)
    docs = {"train": 0, "val": 0}
    bar = _progress_bar(progress, max_tokens)
    try:
        for split in ("train", "val") if cfg.val_paths else ("train",):
            source, rule = open_source(cfg, split, shuffle=False, seed=0)
            rule = None if cfg.val_paths else rule  # explicit validation files: no hash split
            texts: list[str] = []
            for _, text in source.iter_epoch(0, 0):
                texts.append(text)
                if len(texts) == cfg.tokenize_chunk:
                    if not _write(texts, split, rule, encoder, eos, writers, docs, bar,
                                  max_tokens, max_documents):
                        break
                    texts = []
            else:
                _write(texts, split, rule, encoder, eos, writers, docs, bar,
                       max_tokens, max_documents)
    finally:
        encoder.close()
        for w in writers.values():
            w.close()
        if bar is not None:
            bar.close()
    summary = {"tokenizer": tokenizer.name,
               "tokenizer_origin": tokenizer.origin, "dtype": writers["train"].dtype.name,
               **{f"{s}_tokens": writers[s].total_tokens for s in writers},
               **{f"{s}_documents": docs[s] for s in docs},
               **{f"{s}_shards": len(writers[s].paths) for s in writers}}
    if not summary["train_tokens"]:
        raise DataError("no training documents were read (none written); check the source "
                        "and val_fraction")
    if not summary["val_documents"]:
        logger.warning("no validation shards written (a corpus of one document, or "
                       "val_fraction 0): train from these shards with --val_paths naming "
                       "validation data (text files or another prepare output)")
    if summary["train_tokens"] == summary["train_documents"]:  # one EOS per document, no text
        raise DataError(f"every training document is empty (no text in "
                        f"{', '.join(cfg.train_paths) or cfg.dataset_name}; no shard written): "
                        "check text_field and fill the files")
    return summary


def _progress_bar(enabled: bool, total):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="tokenizing", file=sys.stderr)


def _write(texts, split, rule, encoder, eos, writers, docs, bar, max_tokens,
           max_documents) -> bool:
    """Tokenize and append one chunk; False once a limit is reached."""
    n_tok = writers["train"].total_tokens + writers["val"].total_tokens
    for text, ids in zip(texts, encoder(texts)):
        if (max_tokens is not None and n_tok >= max_tokens) or \
                (max_documents is not None and docs["train"] + docs["val"] >= max_documents):
            return False
        target = split if rule is None else ("val" if rule.is_val(text) else "train")
        writers[target].add(np.concatenate([ids, eos]))
        docs[target] += 1
        n_tok += len(ids) + 1
        if bar is not None:
            bar.update(len(ids) + 1)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m swamla.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DataConfig()
    p.add_argument("--source", choices=("fineweb-edu", "files"), default=d.source)
    p.add_argument("--train-paths", nargs="+", default=[], help="files, globs or directories")
    p.add_argument("--val-paths", nargs="+", default=[], help="explicit validation files")
    p.add_argument("--out", required=True, help="output directory (must hold no shards yet)")
    p.add_argument("--text-field", default=d.text_field)
    p.add_argument("--text-unit", default=d.text_unit, choices=("document", "paragraph", "line"))
    p.add_argument("--dataset-name", default=d.dataset_name)
    p.add_argument("--dataset-config", default=d.dataset_config)
    p.add_argument("--tokenizer", default=d.tokenizer_name)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--streaming", action="store_true", help="stream local files")
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--max-tokens", type=float, default=None, help="stop after this many tokens")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--shard-tokens", type=float, default=1e8, help="tokens per shard file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = DataConfig(source=args.source, train_paths=tuple(args.train_paths),
                     val_paths=tuple(args.val_paths), text_field=args.text_field,
                     text_unit=args.text_unit, dataset_name=args.dataset_name,
                     dataset_config=args.dataset_config, tokenizer_name=args.tokenizer,
                     val_fraction=args.val_fraction, streaming=args.streaming,
                     num_workers=args.num_workers, shuffle=False)
    summary = prepare(cfg, args.out,
                      max_tokens=None if args.max_tokens is None else int(args.max_tokens),
                      max_documents=args.max_documents, shard_tokens=int(args.shard_tokens))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # a user-facing problem: the message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
