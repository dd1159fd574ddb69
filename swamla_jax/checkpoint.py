"""Orbax checkpoints of the JAX trainer: async, atomic, last N kept, restorable on any mesh.

A checkpoint is ``output_dir/checkpoints/<step>/`` with two items, three with FP8 delayed
scaling: ``state`` (the TrainState: params, optimizer state, step, RNG, bad-step count), ``meta``
(JSON: data loader position, counters, the run's TrainConfig) and ``fp8`` (the amax histories).
The histories are an item of their own so that ``state`` has one layout whatever the precision:
a run resumed with other FP8 settings, or from a checkpoint without histories, starts them anew
(the trainer calibrates them) instead of failing on a tree mismatch. Orbax writes into a temporary directory and renames it when
complete, so a kill mid-save leaves the previous checkpoints as they were. Restoring takes the
target shardings of the *current* mesh, so a run can continue on another device count.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
FP8_ITEM, FP8_FIELD = "fp8", "fp8_stats"
log = logging.getLogger("swamla_jax.checkpoint")


def _fields(state) -> dict[str, Any]:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


class Checkpointer:
    """Save/restore (state, meta) pairs under ``output_dir/checkpoints``."""

    def __init__(self, output_dir: str | Path, keep: int, async_save: bool = True):
        self.directory = Path(output_dir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta", FP8_ITEM))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict[str, Any], *, wait: bool = False) -> None:
        """Save a TrainState (a dataclass; its ``fp8_stats``, if any, as the ``fp8`` item)."""
        fields = _fields(state)
        stats = fields.pop(FP8_FIELD, None)
        items = {"state": ocp.args.StandardSave(fields), "meta": ocp.args.JsonSave(meta)}
        if stats is not None:
            items[FP8_ITEM] = ocp.args.StandardSave(stats)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if wait:
            self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """(state, meta) of ``step``, laid out as ``abstract_state``'s shardings say. FP8
        histories the run needs but the checkpoint lacks (or holds for another history length)
        come back as zeros: empty, so the trainer calibrates them."""
        fields = _fields(abstract_state)
        stats = fields.pop(FP8_FIELD, None)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(fields), meta=ocp.args.JsonRestore()))
        restored = None
        if stats is not None and (self.directory / str(step) / FP8_ITEM).is_dir():
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    **{FP8_ITEM: ocp.args.StandardRestore(stats)}))[FP8_ITEM]
            except ValueError as e:  # another model or history length: start anew
                log.warning("FP8 amax histories of step %d do not fit this run (%s); "
                            "recalibrating", step, str(e).splitlines()[0])
        if stats is not None and restored is None:
            restored = jax.tree_util.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), stats)
        return type(abstract_state)(**out.state, **{FP8_FIELD: restored}), out.meta

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(shapes, shardings):
    """ShapeDtypeStructs carrying the shardings a restore should produce."""
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def is_run_directory(path: str | Path) -> bool:
    """A trainer output_dir (or its checkpoints/ folder) holding at least one step."""
    path = Path(path)
    root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    return root.is_dir() and any(p.name.isdigit() and (p / "state").is_dir()
                                 for p in root.iterdir())
