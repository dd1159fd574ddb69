"""The framework-free data pipeline: text or shards in, packed numpy batches out.

    from swamla.data import DataConfig, build_loader
    with build_loader(DataConfig(source="shards", train_paths=("data/",)), "train",
                      batch_size=8, block_size=1024, seed=0,
                      process_index=p, process_count=P) as loader:
        batch = next(loader)          # Batch: int32 inputs, targets, segment_ids of shape (8, 1024)
        state = loader.state_dict()   # save in the checkpoint; load_state_dict(state) resumes

Pre-tokenize with ``python -m swamla.data.prepare`` (see docs/data.md).
"""

from swamla.data.config import DataConfig, DataError
from swamla.data.loader import Batch, DataLoader, build_loader, merge_states
from swamla.data.shards import ShardSet, ShardWriter

__all__ = ["Batch", "DataConfig", "DataError", "DataLoader", "ShardSet", "ShardWriter",
           "build_loader", "merge_states"]
