"""``swamla-convert``: move SWA-MLA weights between JAX, PyTorch and the portable format.

    swamla-convert SRC DST --to {portable,jax,torch,hf} [--dtype float32|bfloat16] [--overwrite]

SRC is detected: a portable directory (config.json + safetensors; PyTorch training checkpoints
are such directories), a native JAX directory (config.json + params/ Orbax checkpoint), a native
PyTorch ``.pt`` file, a Hugging Face export (config.json with model_type "swamla"), or a
trainer's output_dir (its newest checkpoint). Every conversion goes through the portable tensors,
so JAX -> torch -> JAX and JAX -> hf -> JAX are bit-exact. The backends (and transformers, for
--to hf) are imported only when a conversion needs them.

--to hf writes a transformers model directory (docs/hf.md): AutoModelForCausalLM.from_pretrained(
DST, trust_remote_code=True) loads it, with the swamla package installed.

DST is a directory, or for --to torch a file ending in .pt or .pth. It must not exist yet (an
empty directory is fine); --overwrite replaces a DST that is a checkpoint of the kind written,
never anything else (a run directory, an unrelated folder). Writes are atomic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from swamla.config import ModelConfig
from swamla.hf_files import is_hf_export, load_hf_export
from swamla.portable import (TORCH_SUFFIXES, CheckpointError, check_destination,
                             detect_format, is_jax_checkpoint, is_torch_checkpoint,
                             is_sharded_torch_checkpoint, is_weights_checkpoint, load_portable,
                             save_portable, torch_run_steps)

# What --to writes: (its name in messages, how to recognize one that --overwrite may replace).
WRITTEN = {"portable": ("portable checkpoint", is_weights_checkpoint),
           "jax": ("native JAX checkpoint", is_jax_checkpoint),
           "torch": ("native PyTorch checkpoint", is_torch_checkpoint),
           "hf": ("Hugging Face export", is_hf_export)}


def check_dst(dst: Path, to: str, overwrite: bool) -> None:
    """Refuse a destination the conversion must not write (see the module doc), before any work."""
    if to not in WRITTEN:
        raise ValueError(f"--to must be portable, jax, torch or hf, got {to!r}")
    what, is_same_kind = WRITTEN[to]
    if to == "torch" and (dst.suffix not in TORCH_SUFFIXES or dst.is_dir()):
        raise CheckpointError(f"--to torch writes one file, and {dst} is "
                              + ("a directory" if dst.is_dir() else "not named *.pt or *.pth")
                              + f": give a file name such as {dst.with_suffix('.pt').name}")
    check_destination(dst, what, is_same_kind, overwrite=overwrite)


def read_tensors(path: Path):
    """(config, portable numpy tensors) from any supported checkpoint."""
    fmt = detect_format(path)
    if fmt == "portable":
        return load_portable(path)
    if fmt == "hf":
        return load_hf_export(path)
    if fmt == "torch-run":
        newest = torch_run_steps(path)[-1]
        if not is_sharded_torch_checkpoint(newest):
            return load_portable(newest)
        from swamla_torch.checkpoint import sharded_reader  # DCP: only for a sharded one

        shapes, read = sharded_reader(newest)
        return ModelConfig.load_saved(newest / "config.json"), {name: read(name) for name in shapes}
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
            overwrite: bool = False, max_shard_size: int | str = "2GB") -> Path:
    """Convert checkpoint ``src`` into format ``to`` at ``dst``; returns ``dst``. An existing
    ``dst`` is replaced only with ``overwrite`` and only if it is a checkpoint of kind ``to``.
    ``max_shard_size`` (bytes, or "2GB") bounds a Hugging Face export's weight files."""
    dst = Path(dst)
    check_dst(dst, to, overwrite)
    cfg, tensors = read_tensors(Path(src))
    if to == "portable":
        return save_portable(tensors, cfg, dst, dtype=dtype)
    if to == "hf":
        from swamla_torch.hf.export import export_hf  # imports torch and transformers

        return export_hf(cfg, tensors, dst, dtype=dtype, max_shard_size=max_shard_size,
                         source=str(src))
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
    parser.add_argument("--to", required=True, choices=tuple(WRITTEN))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="tensor dtype of a portable or hf output (default float32)")
    parser.add_argument("--max_shard_size", default="2GB",
                        help="--to hf: largest weight file, e.g. 2GB or 500MB (default 2GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace dst if it is a checkpoint of the kind written (never "
                        "anything else)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.to, args.dtype, overwrite=args.overwrite,
                      max_shard_size=args.max_shard_size)
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
