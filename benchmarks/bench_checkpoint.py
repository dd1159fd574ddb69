"""A PyTorch training checkpoint of one preset under FSDP2: time, host memory, size on disk.

    MALLOC_MMAP_THRESHOLD_=65536 torchrun --standalone --nproc_per_node 8 \
        benchmarks/bench_checkpoint.py --size large --dir /local_nvme/bench_ckpt \
        [--json bench_checkpoint.json] [--portable]
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_checkpoint.py --size tiny \
        --dir /tmp/bench_ckpt                                        # a CPU smoke run

The model is built and sharded as the trainer does it (``--size`` a preset, float32 weights,
AdamW float32 moments or ``--bf16_moments``) and one save is measured per rank: the time the
training loop is blocked (staging its shards to host memory), the time until the checkpoint is
complete on disk (the background write and the rename), the peak host memory above the level
before the save (resident size sampled every millisecond; MALLOC_MMAP_THRESHOLD_ makes glibc
return freed memory, so the resident size follows what is allocated), and the bytes on disk. ``--portable`` also times the
conversion of that checkpoint into the portable training state (rank 0, one tensor at a time),
as a run does at its end. Rank 0 prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from swamla.train_config import TrainConfig
from swamla_torch import distributed
from swamla_torch.checkpoint import (Saves, _live_tensors, init_moments, save_checkpoint,
                                     to_train_state)
from swamla_torch.distributed import all_gather_objects
from swamla_torch.optim import build_optimizer
from swamla_torch.train import build_model

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())

    @property
    def increase(self) -> int:
        return self.peak - self.base


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="large", help="model preset")
    ap.add_argument("--dir", required=True, help="where to write (removed and rewritten)")
    ap.add_argument("--json", default="bench_checkpoint.json")
    ap.add_argument("--bf16_moments", action="store_true")
    ap.add_argument("--portable", action="store_true",
                    help="also time the conversion to the portable training state (rank 0)")
    args = ap.parse_args(argv)
    out = Path(args.dir)
    cfg = TrainConfig.from_dict({"size": args.size, "fsdp": True, "output_dir": str(out),
                                 "compute_dtype": "float32", "keep_checkpoints": 0,
                                 "bf16_moments": args.bf16_moments})
    env = distributed.setup()
    if env.is_main and out.exists():
        shutil.rmtree(out)
    torch.manual_seed(0)
    with torch.device(env.device):
        raw = build_model(cfg, env.device)
    par = distributed.parallelize(raw, cfg, env)
    optimizer = build_optimizer(par.raw.named_parameters(), cfg, env.device)
    init_moments(optimizer, par.raw, cfg.optimizer_type, 1)
    tensors = _live_tensors(par.raw, optimizer, cfg.optimizer_type)
    shard = sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors.values())
    full = sum(t.numel() * t.element_size() for t in tensors.values())
    saves = Saves(env, cfg)
    directory = out / "checkpoints" / "step_00000001"
    distributed.barrier(env)
    with PeakRSS() as memory:
        t0 = time.perf_counter()
        save_checkpoint(directory, env=env, raw=par.raw, optimizer=optimizer, cfg=cfg, step=1,
                        bad_steps=0, data_state=None, saves=saves)
        blocked = time.perf_counter() - t0
        saves.wait()
        complete = time.perf_counter() - t0
    rows = all_gather_objects({"rank": env.rank, "blocked_s": blocked, "complete_s": complete,
                               "host_peak_bytes": memory.increase, "shard_bytes": shard}, env)
    if env.is_main:
        result = {"size": args.size, "ranks": env.world_size, "device": env.device_name,
                  "full_state_bytes": full, "disk_bytes": disk_bytes(directory), "per_rank": rows}
        if args.portable:
            t0 = time.perf_counter()
            to_train_state(directory, out / "portable", with_rng=False)
            result["portable_s"] = time.perf_counter() - t0
            result["portable_disk_bytes"] = disk_bytes(out / "portable")
        gb = 1e9
        print(f"{args.size}: {env.world_size} x {env.device_name}, full state "
              f"{full / gb:.2f} GB, on disk {result['disk_bytes'] / gb:.2f} GB")
        print("| rank | blocked s | complete s | host peak GB | shard GB |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['rank']} | {r['blocked_s']:.2f} | {r['complete_s']:.2f} | "
                  f"{r['host_peak_bytes'] / gb:.2f} | {r['shard_bytes'] / gb:.2f} |")
        if args.portable:
            print(f"portable training state: {result['portable_s']:.1f} s, "
                  f"{result['portable_disk_bytes'] / gb:.2f} GB")
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"results written to {args.json}")
    distributed.teardown(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
