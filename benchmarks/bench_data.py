"""Data-pipeline throughput: the shard path and the tokenize-and-pack path, in tokens/s per core.

    python benchmarks/bench_data.py [--json /tmp/bench_data.json] [--mb 24]

Synthetic English-like JSONL (and a random-token shard) are written to a temporary directory;
each path is timed from the consumer's side of the prefetch queue after a warm-up batch, so
worker start-up and Arrow loading are excluded. Targets (2-core CPU): shards >= 20M tokens/s,
tokenize-and-pack >= 0.4M tokens/s per core.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from swamla.data import DataConfig, ShardWriter, build_loader
from swamla.tokenizer import load_tokenizer

WORDS = ("the of and to in is was for on that with as by it at from his her an be this which "
         "or are had not but were have one their all been has they more when there can who "
         "model learning attention window latent sequence training data token language memory "
         "students teachers history science energy water because through however between "
         "important research children during including example different government 1984 "
         "2024 3.14 it's don't (see below) e.g. U.S. climate-change").split()


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    written, target = 0, megabytes * 2 ** 20
    with path.open("w") as f:
        while written < target:
            n = int(rng.integers(50, 1500))
            words = rng.choice(WORDS, n)
            text = " ".join(w.capitalize() if i % 17 == 0 else w for i, w in enumerate(words))
            line = json.dumps({"text": text.replace(" and ", ", and ") + "."}) + "\n"
            f.write(line)
            written += len(line)


def time_loader(cfg: DataConfig, *, batch_size: int, block_size: int, seconds: float,
                tokenizer=None) -> float:
    """Tokens per second delivered to the consumer."""
    with build_loader(cfg, batch_size=batch_size, block_size=block_size, seed=0,
                      tokenizer=tokenizer) as loader:
        next(loader)  # warm-up: workers started, first chunk tokenized
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(loader)
            n += 1
        elapsed = time.perf_counter() - start
    return n * batch_size * block_size / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "bench_data.json"))
    ap.add_argument("--mb", type=float, default=24.0, help="size of the synthetic JSONL corpus")
    ap.add_argument("--seconds", type=float, default=6.0, help="timing window per row")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    tokenizer = load_tokenizer()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shard_dir = tmp / "shards"
        w = ShardWriter(shard_dir, "train", tokenizer_name=tokenizer.name,
                        vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id)
        w.add(np.random.default_rng(0).integers(0, 50257, 200_000_000 // 2, dtype=np.uint32))
        w.close()
        for B, T in ((16, 1024), (32, 2048)):
            cfg = DataConfig(source="shards", train_paths=(str(shard_dir),), prefetch=8)
            tps = time_loader(cfg, batch_size=B, block_size=T, seconds=args.seconds)
            results.append({"path": "shards (memmap, shuffled)", "batch": f"{B}x{T}",
                            "workers": 0, "tokens_per_s": tps, "tokens_per_s_per_core": tps / cores})
        corpus = tmp / "corpus.jsonl"
        write_corpus(corpus, args.mb)
        for workers in (0, cores):
            cfg = DataConfig(source="files", train_paths=(str(corpus),), num_workers=workers,
                             val_fraction=0.005, cache_dir=str(tmp / "cache"), prefetch=8,
                             tokenize_chunk=2048)
            tps = time_loader(cfg, batch_size=16, block_size=1024, seconds=args.seconds,
                              tokenizer=tokenizer)
            results.append({"path": "tokenize+pack (jsonl)", "batch": "16x1024",
                            "workers": workers, "tokens_per_s": tps,
                            "tokens_per_s_per_core": tps / cores})
    print(f"\n{cores} CPU cores; tokenizer: {tokenizer.origin}")
    print(f"{'path':<28}{'batch':>9}{'workers':>9}{'tokens/s':>14}{'tokens/s/core':>16}")
    for r in results:
        print(f"{r['path']:<28}{r['batch']:>9}{r['workers']:>9}{r['tokens_per_s'] / 1e6:>13.2f}M"
              f"{r['tokens_per_s_per_core'] / 1e6:>15.2f}M")
    Path(args.json).write_text(json.dumps({"cpu_cores": cores, "results": results}, indent=2))
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
