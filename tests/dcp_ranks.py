"""Run by ``torchrun --nproc_per_node 2`` from tests/test_torch_dcp.py (gloo on CPU).

    dcp_ranks.py train CFG.json [CFG.json ...]   # train(cfg) for each, in one process group
    dcp_ranks.py memory OUT.json                  # a rank's host memory during a sharded save
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from swamla.config import load_preset
from swamla.train_config import TrainConfig
from swamla_torch import distributed
from swamla_torch.checkpoint import Saves, _live_tensors, init_moments, save_checkpoint
from swamla_torch.distributed import full_numpy
from swamla_torch.optim import build_optimizer
from swamla_torch.train import build_model, train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_checkpoint import PeakRSS  # noqa: E402

def memory(out: Path) -> None:
    """FSDP2 over the ranks: the peak host allocation of a sharded save against the full
    state's size, and that of gathering the full state (the former save) as a probe check."""
    model_cfg = load_preset("tiny", n_layer=4, n_embd=512, n_head=8, vocab_size=8192,
                            block_size=64, kv_lora_rank=64, mlp_hidden_dim=2048)
    cfg = TrainConfig.from_dict({"size": "tiny", "model": model_cfg.to_dict(), "fsdp": True,
                                 "compute_dtype": "float32", "keep_checkpoints": 0,
                                 "output_dir": str(out.parent / "run")})
    env = distributed.setup()
    torch.manual_seed(0)
    par = distributed.parallelize(build_model(cfg, env.device), cfg, env)
    optimizer = build_optimizer(par.raw.named_parameters(), cfg, env.device)
    init_moments(optimizer, par.raw, cfg.optimizer_type, 0)
    tensors = _live_tensors(par.raw, optimizer, cfg.optimizer_type)
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors.values()]
    saves = Saves(env, cfg)
    dist.barrier()
    with PeakRSS() as save:
        save_checkpoint(Path(cfg.output_dir) / "checkpoints" / "step_00000001", env=env,
                        raw=par.raw, optimizer=optimizer, cfg=cfg, step=1, bad_steps=0,
                        data_state=None, saves=saves)
        saves.wait()
    dist.barrier()
    with PeakRSS() as gather:
        full = [full_numpy(t) for t in tensors.values()]
    record = {"save": save.increase, "gather": gather.increase,
              "shard": sum(t.nbytes for t in local),
              "full": sum(t.numel() for t in tensors.values()) * 4,
              "largest": max(t.numel() for t in tensors.values()) * 4}
    del full
    (out.parent / f"{out.stem}.{env.rank}.json").write_text(json.dumps(record))
    distributed.teardown(env)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "memory":
        memory(Path(sys.argv[2]))
    else:
        distributed.setup()  # one process group for every run below (each train() keeps it)
        for path in sys.argv[2:]:
            train(TrainConfig.load(path))
