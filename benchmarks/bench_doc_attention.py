"""Attention kernels over packed documents (``--doc_mask``) against the plain kernels, at a
preset's training shapes: forward + backward time of one layer, and the error against the float32
reference.

    python benchmarks/bench_doc_attention.py --preset small --batch 8 --seq 2048 --out doc.json

Rows hold random documents of geometric lengths (``--mean-length``). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn, args, iters):
    import jax

    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mean-length", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--kernels", nargs="*", default=None, help="names to run (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from swamla.config import load_preset
    from swamla.data.packing import segment_ids
    from swamla_jax.attention import attention
    from swamla_jax.kernels import documents
    from swamla_jax.kernels.attention import causal_attention, swa_sink_attention
    from swamla_jax.model import document_positions

    cfg = load_preset(args.preset)
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    segs = jnp.asarray(segment_ids(np.where(rng.random((B, T)) < 1 / args.mean_length, 1, 0), 1))
    pos = document_positions(segs)
    H, K, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    dqk, dv = cfg.mla_qk_head_dim, cfg.v_head_dim
    W, Z = cfg.swa_window, cfg.swa_sink_size

    def arrays(h, k, d, v, seed):
        r = np.random.default_rng(seed)
        return [jnp.asarray(r.standard_normal(s), jnp.bfloat16)
                for s in ((B, T, h, d), (B, T, k, d), (B, T, k, v), (B, T, h, v))]

    swa = arrays(H, K, D, D, 1)
    mla = arrays(H, H, dqk, dv, 2)
    s_swa, s_mla = D ** -0.5, dqk ** -0.5
    kernels = {
        "swa_cudnn_plain": (swa, lambda q, k, v: swa_sink_attention(q, k, v, scale=s_swa,
                                                                     window=W, sink=Z), None),
        "swa_blocked_docs": (swa, lambda q, k, v: documents.swa_document_attention(
            q, k, v, segs, pos, scale=s_swa, window=W, sink=Z), (W, Z)),
        "swa_blocked_docs_nosink": (swa, lambda q, k, v: documents.swa_document_attention(
            q, k, v, segs, pos, scale=s_swa, window=W, sink=0), (W, 0)),
        "mla_cudnn_plain": (mla, lambda q, k, v: causal_attention(q, k, v, scale=s_mla), None),
    }
    kernels["mla_docs"] = (mla, lambda q, k, v: documents.causal_document_attention(
        q, k, v, segs, scale=s_mla), (None, 0))
    for block in (32, 64):
        kernels[f"mla_pallas_docs_b{block}"] = (mla, lambda q, k, v, b=block: (
            documents.pallas_document_attention(q, k, v, segs, scale=s_mla, block=b)), (None, 0))
    for m in (16, 64):
        kernels[f"mla_cudnn_packed_docs_m{m}"] = (mla, lambda q, k, v, m=m: (
            documents.cudnn_document_attention(q, k, v, segs, scale=s_mla, max_docs=m)),
            (None, 0))
    rows = []
    for name, ((q, k, v, d_out), fn, docs) in kernels.items():
        if args.kernels and name not in args.kernels:
            continue
        row = {"kernel": name}
        try:
            def fwd_bwd(q, k, v, fn=fn, d_out=d_out):
                out, vjp = jax.vjp(fn, q, k, v)
                return out, vjp(d_out)
            row["fwd_ms"] = 1e3 * timed(fn, (q, k, v), args.iters)
            row["fwd_bwd_ms"] = 1e3 * timed(fwd_bwd, (q, k, v), args.iters)
            if docs is not None:
                window, sink = docs
                scale = s_swa if window else s_mla

                def ref(q, k, v, window=window, sink=sink, scale=scale):
                    return attention(q, k, v, scale=scale, window=window, sink=sink,
                                     documents=(segs[:1], pos[:1]))
                # the error on the batch's first row: the reference holds (T, T) scores per row
                out_ref = jax.jit(ref)(*(x[:1].astype(jnp.float32) for x in (q, k, v)))
                out = jax.jit(fn)(q, k, v)[:1].astype(jnp.float32)
                row["rel_err"] = float(jnp.abs(out - out_ref).max() / jnp.abs(out_ref).max())
        except Exception as e:  # a kernel that does not compile here is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{jax.devices()[0].device_kind}, {args.preset} B={B} T={T}, documents of mean "
          f"length {args.mean_length}")
    print("| kernel | fwd ms | fwd+bwd ms | rel err | error |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r.get('fwd_ms', 0):.2f} | {r.get('fwd_bwd_ms', 0):.2f} | "
              f"{r.get('rel_err', float('nan')):.1e} | {r.get('error', '')} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                              "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
