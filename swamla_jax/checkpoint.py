"""Orbax checkpoints of the JAX trainer: async, atomic, last N kept, restorable on any mesh.

A checkpoint is ``output_dir/checkpoints/<step>/`` with two items: ``state`` (the TrainState:
params, optimizer state, step, RNG, bad-step count) and ``meta`` (JSON: data loader position,
counters, the run's TrainConfig). Orbax writes into a temporary directory and renames it when
complete, so a kill mid-save leaves the previous checkpoints as they were; a write that fails
(a full disk) is one TrainingError line naming the step, the space needed and the last good
checkpoint, and the echoes of the failure Orbax and tensorstore print from their threads are
held back. Restoring takes the target shardings of the *current* mesh, so a run can continue on
another device count.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from swamla.portable import CheckpointError
from swamla.train_config import save_failed

CHECKPOINT_DIR = "checkpoints"


class _FailedSaveEchoes(logging.Filter):
    """While a Checkpointer is open, drop what a failed asynchronous save prints besides the
    error it raises, hundreds of lines for one full disk: Orbax's error records and asyncio's
    '... exception was never retrieved', each with an error that names the checkpoint directory
    or a traceback through Orbax (the same error reaches ``wait``, which reports it in one line),
    and the 'Event loop is closed' errors of tensorstore callbacks that outlive the event loop of
    the failed write. After a failure they stay dropped, with the warnings about its coroutines
    never awaited: the failed save's tasks report again when they are garbage collected, as late
    as the interpreter's exit."""

    LOGGERS = ("absl", "asyncio")  # Orbax logs through absl

    def __init__(self, directory: Path):
        super().__init__()
        self._directory = str(directory)
        self._failed = False
        self._previous_hook = sys.unraisablehook
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        sys.unraisablehook = self._unraisable

    def filter(self, record: logging.LogRecord) -> bool:
        error, tb = record.exc_info[1:] if record.exc_info else (None, None)
        if error is not None and self._directory in str(error):
            return False
        while tb is not None:
            if "orbax" in Path(tb.tb_frame.f_code.co_filename).parts:
                return False
            tb = tb.tb_next
        return True

    def _unraisable(self, info) -> None:
        if not (isinstance(info.exc_value, RuntimeError)
                and str(info.exc_value) == "Event loop is closed"):
            self._previous_hook(info)

    def save_failed(self) -> None:
        self._failed = True
        warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)

    def remove(self) -> None:
        if self._failed:
            return
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_hook


class Checkpointer:
    """Save/restore (state, meta) pairs under ``output_dir/checkpoints``."""

    def __init__(self, output_dir: str | Path, keep: int, async_save: bool = True):
        self.directory = Path(output_dir).absolute() / CHECKPOINT_DIR
        # The folder is made by the first save: a run refused at its start leaves nothing.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=False,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)  # of killed saves
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))
        self._in_flight: int | None = None  # the step of an asynchronous save not yet waited on
        self._state_bytes: int | None = None  # the size of the state saved
        self._echoes = _FailedSaveEchoes(self.directory)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict[str, Any], *, wait: bool = False) -> None:
        self.wait()  # Orbax runs one save at a time; a failure of the previous one is its own
        self._state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
        with self._write_errors(step):
            self.directory.mkdir(parents=True, exist_ok=True)
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._in_flight = step
        if wait:
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is on disk (a TrainingError if it could not be)."""
        step, self._in_flight = self._in_flight, None
        with self._write_errors(step):
            self._manager.wait_until_finished()

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        try:
            yield
        except (OSError, ValueError) as e:  # tensorstore's I/O errors are ValueErrors
            self._echoes.save_failed()
            last = self._manager.latest_step()  # only a complete save is renamed into place
            raise save_failed(step, e, None if last is None else self.directory / str(last),
                              directory=self.directory, needed_bytes=self._state_bytes) from e

    def restore(self, step: int, abstract_state):
        """(state, meta) of ``step``, laid out as ``abstract_state``'s shardings say."""
        out = self._read(step, state=ocp.args.StandardRestore(abstract_state),
                         meta=ocp.args.JsonRestore())
        return out.state, out.meta

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self._read(step, meta=ocp.args.JsonRestore()).meta

    def _read(self, step: int, **items):
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax: ValueError, KeyError, FileNotFoundError... per damage
            where = self.directory / str(step)
            earlier = [s for s in self.all_steps() if s < step]
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(
                f"checkpoint {where} cannot be read ({type(e).__name__}: {first_line}): it is "
                f"incomplete or damaged. Move it out of the way (mv {where} "
                f"{self.directory.parent / f'broken_step_{step}'}) to resume from "
                + (f"step {earlier[-1]}" if earlier else "the start")) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()
            self._echoes.remove()


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
