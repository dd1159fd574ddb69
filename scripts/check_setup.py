"""Check that this machine can train SWA-MLA (the original project's ``test_setup.py``).

    python scripts/check_setup.py [--data PATHS...] [--tokenizer NAME]

Reports package versions, accelerators and FP8 capability, loads the tokenizer, reads the first
batch of the data through the training data pipeline (local text files or shard directories, paths
or globs, relative or absolute; without --data, the FineWeb-Edu stream, optional), and runs one tiny
JAX training step and one tiny PyTorch step. Exits non-zero if a required piece fails; each line
says what to fix.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REQUIRED = ("numpy", "jax", "flax", "optax", "orbax.checkpoint", "safetensors", "tokenizers")
OPTIONAL = ("torch", "transformers", "datasets", "tensorboardX", "wandb", "matplotlib")


def _version(name):
    module = importlib.import_module(name)
    return getattr(module, "__version__", "?")


def check(label, fn, required=True):
    t0 = time.perf_counter()
    try:
        detail = fn()
        print(f"  ok    {label}: {detail} ({time.perf_counter() - t0:.1f}s)")
        return True
    except Exception as e:  # a setup check reports every failure and carries on to the next
        print(f"  {'FAIL' if required else 'skip'}  {label}: {type(e).__name__}: {e}")
        return not required


def devices():
    import jax

    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    fp8 = any(k for k in kinds if "H100" in k or "H200" in k)
    return f"{len(devs)} x {', '.join(kinds)} ({jax.default_backend()}); FP8 GEMMs: " + (
        "yes (--use_fp8)" if fp8 else "no")


def tokenizer(name):
    from swamla.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

    tok = load_tokenizer(name)
    ids = tok.encode("Hello world")
    if tok.name == DEFAULT_TOKENIZER and list(ids) != [15496, 995]:  # GPT-2's known ids
        raise RuntimeError(f"'Hello world' encoded to {ids}, expected [15496, 995]")
    if tok.decode(ids) != "Hello world":
        raise RuntimeError(f"'Hello world' encoded to {ids} decodes to {tok.decode(ids)!r}")
    return f"{name} -> {tok.origin}, 'Hello world' = {list(ids)}"


def _is_shards(path: str) -> bool:
    """Pre-tokenized data: ``.bin`` files (or globs of them) or a directory holding some."""
    return path.endswith(".bin") or (Path(path).is_dir() and any(Path(path).glob("*.bin")))


def data(paths, tokenizer_name, block_size=64, cache_dir=None):
    """Read the first batch of ``paths`` (or of the FineWeb-Edu stream) as training would."""
    from swamla.data import DataConfig, build_loader

    cfg = DataConfig(tokenizer_name=tokenizer_name, num_workers=0, cache_dir=cache_dir)
    label = "FineWeb-Edu stream"
    if paths:
        source = "shards" if all(_is_shards(p) for p in paths) else "files"
        cfg = cfg.replace(source=source, train_paths=tuple(paths))
        label = f"{source} {' '.join(paths)}"
    with build_loader(cfg, "train", batch_size=1, block_size=block_size, seed=0,
                      process_index=0, process_count=1) as loader:
        batch = next(loader)
    documents = int(batch.segment_ids.max()) + 1
    return (f"{label}: first {block_size} tokens read ({documents} document(s), "
            f"{len(set(batch.inputs.ravel().tolist()))} distinct tokens)")


def one_step(tmp, backend: str):
    """One tiny training step through the backend's real trainer, on synthetic shards."""
    from swamla.data.synthetic import write_synthetic_shards
    from swamla.train_config import parse_args

    train = __import__(f"swamla_{backend}.train", fromlist=["train"]).train
    shards = write_synthetic_shards(Path(tmp) / "shards", n_docs=50)
    out = train(parse_args(["--size", "tiny", "--block_size", "32", "--batch_size", "2",
                            "--source", "shards", "--train_paths", str(shards), "--max_iters", "1",
                            "--eval_iters", "1", "--output_dir", str(Path(tmp) / backend),
                            "--no-progress_bar", "--no-export_portable"]))
    return f"loss {out['loss']:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="*", default=[], help="local data paths to check (default: "
                   "the FineWeb-Edu stream)")
    p.add_argument("--tokenizer", default="openai-community/gpt2")
    args = p.parse_args(argv)
    ok = True
    print("packages")
    for name in REQUIRED:
        ok &= check(name, lambda n=name: _version(n))
    for name in OPTIONAL:
        check(name, lambda n=name: _version(n), required=False)
    print("machine")
    ok &= check("devices", devices)
    print("inputs")
    ok &= check("tokenizer", lambda: tokenizer(args.tokenizer))
    ok &= check("data", lambda: data(args.data, args.tokenizer), required=bool(args.data))
    print("one training step each")
    with tempfile.TemporaryDirectory() as tmp:
        ok &= check("JAX", lambda: one_step(tmp, "jax"))
        check("PyTorch", lambda: one_step(tmp, "torch"), required=False)
    print("setup OK" if ok else "setup has problems (see FAIL lines)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
