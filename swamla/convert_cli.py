"""``swamla-convert``: move SWA-MLA weights between JAX, PyTorch and the portable format.

    swamla-convert SRC DST --to {portable,jax,torch} [--dtype float32|bfloat16] [--overwrite]

SRC is detected: a portable directory (config.json + safetensors; PyTorch training checkpoints
are such directories), a native JAX directory (config.json + params/ Orbax checkpoint), a native
PyTorch ``.pt`` file, or a trainer's output_dir (its newest checkpoint). Every conversion goes
through the portable tensors, so JAX -> torch -> JAX is bit-exact. The backends are imported only
when a conversion needs them.

DST is a directory, or for --to torch a file ending in .pt or .pth. It must not exist yet (an
empty directory is fine); --overwrite replaces a DST that is a checkpoint of the kind written,
never anything else (a run directory, an unrelated folder). Writes are atomic.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from swamla.portable import (CheckpointError, check_destination,
                             is_portable_checkpoint, is_weights_checkpoint, load_portable,
                             save_portable)

TORCH_SUFFIXES = (".pt", ".pth")


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix in TORCH_SUFFIXES:
        return "torch"
    if is_portable_checkpoint(path):  # PyTorch training checkpoints are portable directories too
        return "portable"
    if is_jax_checkpoint(path):
        return "jax"
    if path.is_dir() and (path / "train_config.json").is_file() and (path / "checkpoints").is_dir():
        steps = _torch_steps(path)
        return "torch-run" if steps else "jax-run"
    raise CheckpointError(
        f"{path} is not an SWA-MLA checkpoint: expected a portable directory (config.json + "
        "model.safetensors), a JAX directory (config.json + params/), a PyTorch .pt file, or a "
        "trainer's output_dir (its newest checkpoint is read)")


def is_jax_checkpoint(path: Path) -> bool:
    """A native JAX checkpoint (``swamla_jax.save_native``): config.json + params/."""
    return path.is_dir() and (path / "params").is_dir() and (path / "config.json").is_file()


def is_torch_checkpoint(path: Path) -> bool:
    """A native PyTorch checkpoint (``swamla_torch.save_native``): a .pt holding config + model."""
    import torch

    if not path.is_file():
        return False
    try:  # mmap: only the pickled dict is read, not the tensors
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError):  # not a torch.save zip of tensors
        return False
    return isinstance(blob, dict) and {"config", "model"} <= set(blob)


# What --to writes: (its name in messages, how to recognize one that --overwrite may replace).
WRITTEN = {"portable": ("portable checkpoint", is_weights_checkpoint),
           "jax": ("native JAX checkpoint", is_jax_checkpoint),
           "torch": ("native PyTorch checkpoint", is_torch_checkpoint)}


def check_dst(dst: Path, to: str, overwrite: bool) -> None:
    """Refuse a destination the conversion must not write (see the module doc), before any work."""
    if to not in WRITTEN:
        raise ValueError(f"--to must be portable, jax or torch, got {to!r}")
    what, is_same_kind = WRITTEN[to]
    if to == "torch" and (dst.suffix not in TORCH_SUFFIXES or dst.is_dir()):
        raise CheckpointError(f"--to torch writes one file, and {dst} is "
                              + ("a directory" if dst.is_dir() else "not named *.pt or *.pth")
                              + f": give a file name such as {dst.with_suffix('.pt').name}")
    check_destination(dst, what, is_same_kind, overwrite=overwrite)


def _torch_steps(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").iterdir()
                  if p.name.startswith("step_") and is_portable_checkpoint(p))


def read_tensors(path: Path):
    """(config, portable numpy tensors) from any supported checkpoint."""
    fmt = detect_format(path)
    if fmt == "portable":
        return load_portable(path)
    if fmt == "torch-run":
        return load_portable(_torch_steps(path)[-1])
    if fmt == "jax-run":
        from swamla_jax.convert import to_portable_tensors
        from swamla_jax.train import restore_latest

        cfg, state, _ = restore_latest(path)
        return cfg.model, to_portable_tensors(cfg.model, state.params)
    if fmt == "jax":
        import swamla_jax

        model = swamla_jax.load_native(path)
        return model.config, swamla_jax.to_portable_tensors(model.config, model.params)
    import swamla_torch
    from swamla_torch.convert import to_portable_tensors

    model = swamla_torch.load_native(path)
    return model.config, to_portable_tensors(model)


def convert(src: str | Path, dst: str | Path, to: str, dtype: str = "float32", *,
            overwrite: bool = False) -> Path:
    """Convert checkpoint ``src`` into format ``to`` at ``dst``; returns ``dst``. An existing
    ``dst`` is replaced only with ``overwrite`` and only if it is a checkpoint of kind ``to``."""
    dst = Path(dst)
    check_dst(dst, to, overwrite)
    cfg, tensors = read_tensors(Path(src))
    if to == "portable":
        return save_portable(tensors, cfg, dst, dtype=dtype)
    if to == "jax":
        import swamla_jax

        module = swamla_jax.SWAMLA(cfg)
        params = swamla_jax.from_portable_tensors(cfg, tensors, swamla_jax.abstract_params(module))
        return swamla_jax.save_native(swamla_jax.Model(module, params), dst)
    if to == "torch":
        import torch

        import swamla_torch
        from swamla_torch.convert import load_portable_tensors

        with torch.device("meta"):
            model = swamla_torch.SWAMLA(cfg)
        model = load_portable_tensors(model.to_empty(device="cpu"), tensors, str(src))
        return swamla_torch.save_native(model, dst)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="swamla-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint to read (format detected)")
    parser.add_argument("dst", help="where to write (a directory, or a .pt file for --to torch)")
    parser.add_argument("--to", required=True, choices=("portable", "jax", "torch"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="tensor dtype of a portable output (default float32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace dst if it is a checkpoint of the kind written (never "
                        "anything else)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.to, args.dtype, overwrite=args.overwrite)
    except (CheckpointError, ValueError) as e:  # also ConfigError: bad input
        print(f"swamla-convert: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a permission: the file system's, not the input's
        print(f"swamla-convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.to} checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
