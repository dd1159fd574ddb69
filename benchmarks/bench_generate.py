"""Generation throughput and cache size with compressed KV caches, JAX and PyTorch.

    # GPU (the issue's numbers): small preset, 4K and 32K contexts, batch 1 and 64
    python benchmarks/bench_generate.py --backend both --preset small --dtype bfloat16 \
        --contexts 4096 32768 --batches 1 64 --json /tmp/bench_generate.json [--torch-compile]
    # CPU smoke run
    python benchmarks/bench_generate.py --preset tiny --dtype float32 --contexts 256 512 \
        --batches 1 4 --decode-steps 8 --prefill-chunk 128

For each context T the model's block_size is overridden to T + decode_steps (RoPE is computed for
the current positions only, so nothing else changes). Random weights; the numbers do not depend on
them.

- prefill tok/s: ``--prefill-batch`` prompts of T tokens through the chunked prefill, timed after
  a warm-up run of the same shapes (so compilation is excluded).
- decode tok/s: B rows whose caches hold T positions of random content (filling a 32K x 64 cache
  by prefill would measure prefill again), then ``--decode-steps`` greedy steps: the JAX
  ``while_loop`` (one call) or the PyTorch step loop, eager or ``--torch-compile`` (CUDA graphs).
- cache bytes per token: the bytes of the caches allocated for this run over B * (slots), and the
  formula of ``swamla.sampling.cache_numbers_per_token`` at T against an uncompressed KV cache of
  the same model (every layer's full keys and values, MLA expanded).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from swamla.config import load_preset
from swamla.sampling import GREEDY, PromptBatch, cache_numbers_per_token, plan_batch

BYTES = {"float32": 4, "bfloat16": 2}


# ------------------------------------------------------------------------------- JAX
class JaxBench:
    name = "jax"

    def __init__(self, cfg, dtype, seed=0):
        import jax

        import swamla_jax
        from swamla_jax import generate as gen

        self.jax, self.gen = jax, gen
        self.model = swamla_jax.from_config(cfg, seed=seed,
                                            plan=swamla_jax.ComputePlan(compute_dtype=dtype))
        self.device = str(jax.devices()[0].device_kind)

    def prefill(self, batch: PromptBatch) -> float:
        def run():
            cache, first = self.gen.prefill(self.model, batch)
            self.jax.block_until_ready(first)
            return cache
        run()  # compile
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    def decode(self, B, context, steps, cache_len) -> tuple[float, int]:
        jax, jnp = self.jax, self.jax.numpy
        from swamla_jax.cache import cache_nbytes, init_cache

        cfg, plan = self.model.config, self.model.module.plan
        cache = init_cache(cfg, B, cache_len, jnp.dtype(plan.compute_dtype))
        leaves, tree = jax.tree_util.tree_flatten(cache["layers"])
        keys = jax.random.split(jax.random.key(0), len(leaves))
        cache["layers"] = jax.tree_util.tree_unflatten(
            tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
        cache["swa_pos"] = jnp.asarray(np.broadcast_to(ring_positions(cfg.swa_window, context),
                                                       (B, cfg.swa_window)))
        nbytes = cache_nbytes(cache)
        first = jax.random.normal(jax.random.key(1), (B, cfg.vocab_size), jnp.float32)
        lengths = jnp.full((B,), context, jnp.int32)
        limits = jnp.full((B,), context + steps, jnp.int32)

        def run(cache):
            out, _, cache = self.gen.decode_loop(
                self.model.params, cache, first, lengths, limits, jax.random.key(0),
                jnp.float32(0), jnp.int32(0), jnp.float32(1), jnp.int32(cfg.vocab_size),
                jnp.int32(-1), cfg=cfg, plan=plan, max_new_tokens=steps,
                structure=GREEDY.structure, return_logits=False, stream=False)
            out.block_until_ready()
            return cache
        cache = run(cache)  # compile (the cache is donated and handed back)
        start = time.perf_counter()
        run(cache)
        return time.perf_counter() - start, nbytes


# ------------------------------------------------------------------------------- PyTorch
class TorchBench:
    name = "torch"

    def __init__(self, cfg, dtype, seed=0, compile=False):
        import torch

        import swamla_torch
        from swamla_torch import generate as gen

        self.torch, self.gen, self.compile = torch, gen, compile
        self.dev = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(self.dev):
            self.model = swamla_torch.from_config(cfg, seed=seed).eval()
        self.model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
        self.device = torch.cuda.get_device_name() if self.dev == "cuda" else "cpu"

    def _sync(self):
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def prefill(self, batch: PromptBatch) -> float:
        with self.torch.inference_mode():
            self.gen.prefill(self.model, batch)  # warm-up
            self._sync()
            start = time.perf_counter()
            self.gen.prefill(self.model, batch)
            self._sync()
        return time.perf_counter() - start

    def decode(self, B, context, steps, cache_len) -> tuple[float, int]:
        torch = self.torch
        from swamla_torch.cache import cache_nbytes, init_cache

        cfg = self.model.config
        dtype = self.model.transformer.wte.weight.dtype
        with torch.inference_mode():
            cache = init_cache(cfg, B, cache_len, dtype, self.dev)
            for layer in cache["layers"]:
                for t in layer.values():
                    t.normal_()
            cache["swa_pos"].copy_(torch.from_numpy(ring_positions(cfg.swa_window, context)))
            first = torch.randn(B, cfg.vocab_size, device=self.dev)
            lengths = torch.full((B,), context, device=self.dev)
            limits = torch.full((B,), context + steps, device=self.dev)
            step = self.gen.compiled_decode_step(self.model, cache) if self.compile else None

            def run():
                self.gen.decode(self.model, cache, first, lengths, limits, max_new_tokens=steps,
                                step=step)
                self._sync()
            run()  # warm-up (compilation, CUDA-graph capture)
            start = time.perf_counter()
            run()
        return time.perf_counter() - start, cache_nbytes(cache)


def ring_positions(window: int, context: int) -> np.ndarray:
    """Positions held by each ring slot after ``context`` tokens: the last window of them."""
    p = np.arange(max(0, context - window), context)
    pos = np.full(window, -1, np.int64)
    pos[p % window] = p
    return pos


# ------------------------------------------------------------------------------- driver
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("jax", "torch", "both"), default="both")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", choices=tuple(BYTES), default="bfloat16")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prefill-batch", type=int, default=1)
    ap.add_argument("--prefill-chunk", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--torch-compile", action="store_true", help="compiled / CUDA-graph step")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="CPU only: torch intra-op threads (0 = torch's default); 1 avoids "
                         "OpenMP threads fighting XLA's pool on small machines")
    ap.add_argument("--json", default="bench_generate.json")
    args = ap.parse_args(argv)

    if args.torch_threads and args.backend != "jax":
        import torch

        torch.set_num_threads(args.torch_threads)
    rows = []
    backends = ("jax", "torch") if args.backend == "both" else (args.backend,)
    for context in args.contexts:
        cfg = load_preset(args.preset, block_size=context + args.decode_steps)
        formula = cache_numbers_per_token(cfg, context)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, cfg.vocab_size, context).tolist()
                   for _ in range(args.prefill_batch)]
        batch = plan_batch(prompts, cfg, args.decode_steps, prefill_chunk=args.prefill_chunk)
        for name in backends:
            bench = (JaxBench(cfg, args.dtype) if name == "jax"
                     else TorchBench(cfg, args.dtype, compile=args.torch_compile))
            prefill_s = bench.prefill(batch)
            for B in args.batches:
                decode_s, nbytes = bench.decode(B, context, args.decode_steps, batch.cache_len)
                row = {
                    "backend": name, "device": bench.device, "preset": args.preset,
                    "dtype": args.dtype, "context": context, "batch": B,
                    "prefill_tok_s": (args.prefill_batch * context / prefill_s
                                      if B == args.batches[0] else None),
                    "decode_tok_s": B * args.decode_steps / decode_s,
                    "decode_ms_per_step": 1e3 * decode_s / args.decode_steps,
                    "cache_mib": nbytes / 2**20,
                    "cache_bytes_per_token": nbytes / (B * batch.cache_len),
                    "formula_bytes_per_token": formula["compressed"] * BYTES[args.dtype],
                    "uncompressed_bytes_per_token": formula["uncompressed"] * BYTES[args.dtype],
                    "compression_ratio": formula["ratio"],
                    "torch_compile": bool(args.torch_compile) if name == "torch" else None,
                }
                rows.append(row)
                print_row(row, header=len(rows) == 1)
            del bench
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")


COLUMNS = [("backend", "{:<6}"), ("context", "{:>7}"), ("batch", "{:>5}"),
           ("prefill_tok_s", "{:>13}"), ("decode_tok_s", "{:>12.1f}"),
           ("decode_ms_per_step", "{:>9.2f}"), ("cache_mib", "{:>10.1f}"),
           ("cache_bytes_per_token", "{:>11.0f}"), ("uncompressed_bytes_per_token", "{:>12.0f}"),
           ("compression_ratio", "{:>6.1f}x")]
HEADER = ("backend context batch prefill tok/s decode tok/s  ms/step  cache MiB  B/tok here "
          "B/tok uncomp  ratio")


def print_row(row, header=False):
    if header:
        print(f"device: {row['device']}  preset: {row['preset']}  dtype: {row['dtype']}")
        print(HEADER)
    cells = []
    for key, fmt in COLUMNS:
        v = row[key]
        if key == "prefill_tok_s":
            cells.append(fmt.format("-" if v is None else f"{v:.0f}"))
        else:
            cells.append(fmt.format(v))
    print(" ".join(cells), flush=True)


if __name__ == "__main__":
    main()
