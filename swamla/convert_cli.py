"""``swamla-convert``: move SWA-MLA weights between JAX, PyTorch and the portable format.

    swamla-convert SRC DST --to {portable,jax,torch} [--dtype float32|bfloat16]

SRC is detected: a portable directory (config.json + safetensors; PyTorch training checkpoints
are such directories), a native JAX directory (config.json + params/ Orbax checkpoint), a native
PyTorch ``.pt`` file, or a trainer's output_dir (its newest checkpoint). Every conversion goes
through the portable tensors, so JAX -> torch -> JAX is bit-exact. The backends are imported only
when a conversion needs them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from swamla.portable import CheckpointError, is_portable_checkpoint, load_portable, save_portable


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix in (".pt", ".pth"):
        return "torch"
    if is_portable_checkpoint(path):  # PyTorch training checkpoints are portable directories too
        return "portable"
    if path.is_dir() and (path / "params").is_dir() and (path / "config.json").is_file():
        return "jax"
    if path.is_dir() and (path / "train_config.json").is_file() and (path / "checkpoints").is_dir():
        steps = _torch_steps(path)
        return "torch-run" if steps else "jax-run"
    raise CheckpointError(
        f"{path} is not an SWA-MLA checkpoint: expected a portable directory (config.json + "
        "model.safetensors), a JAX directory (config.json + params/), a PyTorch .pt file, or a "
        "trainer's output_dir (its newest checkpoint is read)")


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


def convert(src: str | Path, dst: str | Path, to: str, dtype: str = "float32") -> Path:
    """Convert checkpoint ``src`` into format ``to`` at ``dst``; returns ``dst``."""
    cfg, tensors = read_tensors(Path(src))
    dst = Path(dst)
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
    raise ValueError(f"--to must be portable, jax or torch, got {to!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="swamla-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint to read (format detected)")
    parser.add_argument("dst", help="where to write (a directory, or a .pt file for --to torch)")
    parser.add_argument("--to", required=True, choices=("portable", "jax", "torch"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="tensor dtype of a portable output (default float32)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.to, args.dtype)
    except (CheckpointError, ValueError) as e:
        print(f"swamla-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
