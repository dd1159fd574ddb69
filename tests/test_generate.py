"""Cached generation in both backends: cache == full forward, absorbed MLA == expanded MLA,
one compilation for the JAX decode loop, sampling, stopping, the CLI, and each error a user can hit.

Everything runs in float32 with matmul precision pinned to highest, on perturbed random weights
(so biases, norm weights and DyT alphas matter), with sequences much longer than the window.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import swamla_jax as sj
import swamla_torch as st
from swamla.config import load_preset
from swamla.portable import CheckpointError
from swamla.sampling import (GREEDY, GenerationError, SamplingParams, cache_numbers_per_token,
                             plan_batch)
from swamla_jax import cache as jc
from swamla_jax import generate as jg
from swamla_torch import cache as tc
from swamla_torch import generate as tg

RTOL = 1e-5
# Every SPEC option the decode path must honour, in one model (n_layer 7: 2 scanned cycles + 1).
ALL_OPTIONS = dict(bias=True, q_lora_rank=24, ratio_kv=2, use_dyt=True, mla_norm="rmsnorm",
                   logit_scale_base=3.0, logit_scale_window=16, logit_scale_max=1.8,
                   rope_scaling={"type": "linear", "factor": 2.0})
VARIANTS = {"default": {}, "all_options": ALL_OPTIONS}


@pytest.fixture(autouse=True)
def highest_precision():
    # One torch thread: these ops are tiny, and two OpenMP threads next to XLA's thread pool on a
    # 2-core machine run ~50x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    with jax.default_matmul_precision("highest"):
        yield
    torch.set_num_threads(threads)


def small_cfg(**overrides):
    return load_preset("tiny", **{"n_layer": 7, "swa_window": 16, "swa_sink_size": 4,
                                  "vocab_size": 1024, **overrides})


def perturbed_torch(cfg, seed):
    model = st.from_config(cfg, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def perturbed_jax(cfg, seed):
    """The perturbed torch model's weights in Flax (porting is cheaper than a Flax init)."""
    tensors = {k: v.detach().numpy() for k, v in perturbed_torch(cfg, seed).state_dict().items()}
    module = sj.SWAMLA(cfg)
    return sj.Model(module, sj.from_portable_tensors(cfg, tensors, sj.abstract_params(module)))


def random_prompts(cfg, seed, lengths=(10, 23)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def check_against_forward(result, prompts, forward, n_new):
    """Each step's logits against the uncached model's logits at the position that chose it.

    The sequences go through the full forward as one right-padded batch (causal: the padding
    cannot reach the real positions), so the forward compiles once.
    """
    seqs = [p + new for p, new in zip(prompts, result.tokens)]
    padded = np.zeros((len(seqs), max(map(len, seqs))), np.int64)
    for b, seq in enumerate(seqs):
        padded[b, :len(seq)] = seq
    full = np.asarray(forward(padded))
    for b, prompt in enumerate(prompts):
        new = result.tokens[b]
        assert len(new) == n_new
        ref = full[b, len(prompt) - 1:len(prompt) - 1 + len(new)]
        err = rel_err(result.step_logits[b, :len(new)], ref)
        assert err <= RTOL, f"row {b}: cached logits differ from the full forward by {err:.2e}"


# ------------------------------------------------------------------------- cache == forward
# JAX compiles cost ~5 s per config on CPU, so only the all-options model runs here; the parity
# suite checks the default model's JAX cache against the (here verified) torch cache.
@pytest.mark.parametrize("variant", ["all_options"])
def test_jax_cached_decode_matches_forward(variant):
    # Prompts of 10 and 23 tokens (the second wraps the ring during a chunked prefill), decoded
    # to 60 and 73 positions: every step's logits against the full forward at that position.
    cfg = small_cfg(**VARIANTS[variant])
    model = perturbed_jax(cfg, seed=len(variant))
    prompts = random_prompts(cfg, seed=1)
    res = jg.generate(model, prompts, max_new_tokens=50, return_logits=True, prefill_chunk=8)
    check_against_forward(res, prompts, lambda s: model(s)[0], 50)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_cached_decode_matches_forward(variant):
    cfg = small_cfg(**VARIANTS[variant])
    model = perturbed_torch(cfg, seed=len(variant))
    prompts = random_prompts(cfg, seed=2)
    res = tg.generate(model, prompts, max_new_tokens=50, return_logits=True, prefill_chunk=8)
    with torch.no_grad():
        check_against_forward(res, prompts, lambda s: model(torch.from_numpy(s))[0].numpy(), 50)


def test_no_sink_and_window_longer_than_sequence():
    cfg = small_cfg(swa_sink_size=0, swa_window=64)
    model = perturbed_torch(cfg, seed=3)
    prompts = random_prompts(cfg, seed=3, lengths=(5, 3))
    res = tg.generate(model, prompts, max_new_tokens=20, return_logits=True)
    with torch.no_grad():
        check_against_forward(res, prompts, lambda s: model(torch.from_numpy(s))[0].numpy(), 20)


# ------------------------------------------------------------------------- absorbed == expanded
MLA_CFG = dict(bias=True, q_lora_rank=24)


def test_jax_absorbed_mla_equals_expanded():
    from swamla_jax.attention import MLAttention
    from swamla_jax.layers import rope_tables

    cfg = small_cfg(**MLA_CFG)
    B, T = 2, 40
    x = jax.random.normal(jax.random.key(0), (B, T, cfg.n_embd))
    module = MLAttention(cfg)
    pos = jnp.arange(T)
    rope = rope_tables(cfg.qk_rope_head_dim, pos, cfg.rope_theta, cfg.rope_factor)
    params = jax.jit(module.init)(jax.random.key(1), x, rope, pos)["params"]
    rng = np.random.default_rng(2)
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32),
                                    nn.meta.unbox(params))
    expanded = jax.jit(module.apply)({"params": params}, x, rope, pos)

    @jax.jit
    def absorbed(params, x):  # an empty T-slot latent cache, all rows starting at position 0
        layer = {"c": jnp.zeros((B, T, cfg.kv_lora_rank)),
                 "k_pe": jnp.zeros((B, T, cfg.qk_rope_head_dim))}
        cache = {"swa_pos": jnp.full((B, cfg.swa_window), -1, jnp.int32)}
        start, end = jnp.zeros(B, jnp.int32), jnp.full(B, T, jnp.int32)
        rows = start[:, None] + pos  # (B, T) per-row positions
        chunk = jc.chunk_layout(cfg, cache, rows, start, end, T)
        rope_rows = rope_tables(cfg.qk_rope_head_dim, rows, cfg.rope_theta, cfg.rope_factor)
        return module.apply({"params": params}, x, rope_rows, rows, layer, chunk)

    y, new = absorbed(params, x)
    assert rel_err(y, expanded) <= RTOL
    assert set(new) == {"c", "k_pe"}  # only the latent and the shared rope key are cached


def test_torch_absorbed_mla_equals_expanded():
    from swamla_torch.attention import MLAttention
    from swamla_torch.layers import rope_tables

    cfg = small_cfg(**MLA_CFG)
    B, T = 2, 40
    torch.manual_seed(0)
    attn = MLAttention(cfg).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.05 * torch.randn(p.shape))
        x = torch.randn(B, T, cfg.n_embd)
        pos = torch.arange(T)
        expanded = attn(x, rope_tables(cfg.qk_rope_head_dim, pos, cfg.rope_theta, 1.0), pos)
        layer = {"c": torch.zeros(B, T, cfg.kv_lora_rank), "k_pe": torch.zeros(B, T, 8)}
        cache = {"swa_pos": torch.full((B, cfg.swa_window), -1)}
        start, end = torch.zeros(B, dtype=torch.long), torch.full((B,), T)
        rows = start[:, None] + pos  # (B, T) per-row positions
        chunk = tc.chunk_layout(cfg, cache, rows, start, end, T)
        rope = rope_tables(cfg.qk_rope_head_dim, rows, cfg.rope_theta, 1.0)
        absorbed = attn(x, rope, rows, cache=layer, chunk=chunk)
    assert rel_err(absorbed.numpy(), expanded.numpy()) <= RTOL


# ------------------------------------------------------------------------- compiled once
def test_jax_decode_loop_compiles_once_and_seeds_reproduce():
    cfg = small_cfg(n_layer=4)  # a config no other test uses, so its first trace happens here
    model = perturbed_jax(cfg, seed=0)
    before = dict(jg.TRACE_COUNTS)
    runs = [(random_prompts(cfg, 5, (9, 12)), SamplingParams(0.7, top_k=20, top_p=0.9, seed=1)),
            (random_prompts(cfg, 6, (14, 3)), SamplingParams(1.3, top_k=7, top_p=0.5, seed=2)),
            (random_prompts(cfg, 5, (9, 12)), SamplingParams(0.7, top_k=20, top_p=0.9, seed=1)),
            (random_prompts(cfg, 5, (9, 12)), SamplingParams(0.7, top_k=20, top_p=0.9, seed=3))]
    outs = [jg.generate(model, p, max_new_tokens=30, sampling=s).tokens for p, s in runs]
    assert all([len(t) for t in out] == [30, 30] for out in outs)
    grown = {k: jg.TRACE_COUNTS[k] - before.get(k, 0) for k in jg.TRACE_COUNTS}
    assert grown == {"prefill_chunk": 1, "decode_loop": 1, "decode_step": 1}, grown
    assert outs[2] == outs[0], "the same seed must give the same tokens"
    assert outs[3] != outs[0]


@pytest.mark.slow
def test_torch_compiled_step_matches_eager():
    # Inductor on CPU compiles this one-SWA + one-MLA model in ~10 s; it must agree with eager.
    cfg = small_cfg(n_layer=2, swa_layers_per_cycle=1, mla_layers_per_cycle=1)
    model = perturbed_torch(cfg, seed=4)
    prompts = random_prompts(cfg, 4, (5, 9))
    eager = tg.generate(model, prompts, max_new_tokens=4, return_logits=True)
    compiled = tg.generate(model, prompts, max_new_tokens=4, return_logits=True, compile=True)
    assert compiled.tokens == eager.tokens
    assert rel_err(compiled.step_logits, eager.step_logits) <= RTOL


# ------------------------------------------------------------------------- sampling and stopping
BACKENDS = ["jax", "torch"]


@pytest.fixture(scope="module")
def models():
    cfg = small_cfg(n_layer=3, block_size=64)
    tm = perturbed_torch(cfg, seed=7)
    tensors = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    module = sj.SWAMLA(cfg)
    jm = sj.Model(module, sj.from_portable_tensors(cfg, tensors, sj.abstract_params(module)))
    return {"jax": (jm, jg.generate), "torch": (tm, tg.generate)}


def _sampler(backend):
    """sample(logits (B, V) numpy, params, seed, vocab_limit) -> numpy tokens, for a backend."""
    if backend == "jax":
        fns = {}

        def run(logits, sp, seed, limit):
            fn = fns.setdefault(sp.structure, jax.jit(functools.partial(
                jg.sample, structure=sp.structure)))
            return np.asarray(fn(jnp.asarray(logits), jax.random.key(seed), sp.temperature,
                                 sp.top_k, sp.top_p, limit))
        return run
    return lambda logits, sp, seed, limit: tg.sample(
        torch.from_numpy(logits), torch.Generator().manual_seed(seed), sp, limit).numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_controls(backend):
    sample = _sampler(backend)
    logits = np.random.default_rng(0).standard_normal((64, 1000)).astype(np.float32)
    greedy = logits.argmax(-1)
    assert (sample(logits, GREEDY, 0, 1000) == greedy).all()
    assert (sample(logits, SamplingParams(1.0, top_k=1), 1, 1000) == greedy).all()
    assert (sample(logits, SamplingParams(1.0, top_p=1e-6), 1, 1000) == greedy).all()
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    picked = sample(logits, SamplingParams(3.0, top_k=5), 2, 1000)
    assert all(t in row for t, row in zip(picked, top5)) and len(set(picked)) > 1
    # top_p 0.5 at temperature 1: only tokens inside the smallest set reaching half the mass
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)
    mass_before = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(
        probs, order, -1)
    picked = sample(logits, SamplingParams(1.0, top_p=0.5), 3, 1000)
    for r, t in enumerate(picked):
        assert mass_before[r, list(order[r]).index(t)] < 0.5
    assert (sample(logits, GREEDY, 0, 100) < 100).all()
    assert (sample(logits, SamplingParams(5.0), 4, 100) < 100).all()
    a, b = (sample(logits, SamplingParams(1.0), seed, 1000) for seed in (7, 7))
    assert (a == b).all() and (a != sample(logits, SamplingParams(1.0), 8, 1000)).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stops_at_eos_and_at_block_size(models, backend):
    model, generate = models[backend]
    prompts = random_prompts(model.config, 9, (4, 6))
    greedy = generate(model, prompts, max_new_tokens=20).tokens
    eos = greedy[0][3]
    stop = greedy[0].index(eos)
    res = generate(model, prompts, max_new_tokens=20, eos_id=eos)
    assert res.tokens[0] == greedy[0][:stop + 1]
    assert (res.token_array[0, stop + 1:] == -1).all()
    assert res.tokens[1] == greedy[1][:len(res.tokens[1])]
    # block_size 64: a 60-token prompt leaves room for 4 tokens, whatever max_new_tokens says.
    long_prompt = random_prompts(model.config, 10, (60, 5))
    assert [len(t) for t in generate(model, long_prompt, max_new_tokens=20).tokens] == [4, 20]


def test_swa_cache_is_fixed_and_mla_cache_is_latent_only():
    cfg = small_cfg(n_layer=3)
    sizes = {n: jc.cache_nbytes(jc.init_cache(cfg, 1, n)) for n in (64, 1024)}
    per_token = (sizes[1024] - sizes[64]) / (1024 - 64) / 4  # float32 numbers per extra token
    assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim  # one MLA layer, SWA unchanged
    assert tc.cache_nbytes(tc.init_cache(cfg, 1, 1024)) == sizes[1024]
    small = load_preset("small")
    assert cache_numbers_per_token(small, 32768)["ratio"] >= 10


# ------------------------------------------------------------------------- bad input
def test_bad_prompts_and_settings():
    cfg = small_cfg(block_size=64)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        plan_batch([[1, 2], []], cfg, 5)
    with pytest.raises(GenerationError, match="prompt 0 has 70 tokens but the model's block_size "
                                              "is 64.*at most 63 tokens"):
        plan_batch([[1] * 70], cfg, 5)
    with pytest.raises(GenerationError, match="has 64 tokens.*leaves no room"):
        plan_batch([[1] * 64], cfg, 5)
    with pytest.raises(GenerationError, match=r"outside \[0, 1024\)"):
        plan_batch([[1, 1024]], cfg, 5)
    with pytest.raises(GenerationError, match="max_new_tokens must be an integer >= 1"):
        plan_batch([[1]], cfg, 0)
    with pytest.raises(GenerationError, match="top_p must lie in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(GenerationError, match="temperature must be"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(GenerationError, match="top_k must be"):
        SamplingParams(top_k=-2)


@pytest.mark.parametrize("load_any", [jg._load_any, tg._load_any], ids=BACKENDS)
def test_unknown_checkpoint(tmp_path, load_any):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_any(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="is not an SWA-MLA checkpoint"):
        load_any(tmp_path / "junk")


# ------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = perturbed_torch(load_preset("tiny", n_layer=3, block_size=64), seed=11)
    st.save_pretrained(model, root / "portable")
    st.save_native(model, root / "native.pt")
    return root


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the bundled GPT-2 BPE, no 2 s network probe


@pytest.mark.parametrize("backend,ckpt", [("jax", "portable"), ("jax", "native.pt"),
                                          ("torch", "portable")])
def test_cli_streams_text(checkpoints, offline, capsys, backend, ckpt):
    main = {"jax": jg.main, "torch": tg.main}[backend]
    rc = main([str(checkpoints / ckpt), "--prompt", "Hello world", "--max-new-tokens", "8",
               "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("Hello world") and len(out) > len("Hello world\n")
    assert f"[{backend}] 8 new tokens" in err


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_errors_exit_2(checkpoints, offline, capsys, tmp_path, backend):
    main = {"jax": jg.main, "torch": tg.main}[backend]
    cases = [
        ([str(tmp_path / "nope"), "--prompt", "hi"], "does not exist"),
        ([str(checkpoints / "portable"), "--prompt", ""], "prompt 0 is empty"),
        ([str(checkpoints / "portable"), "--prompt", "word " * 70], "block_size is 64"),
        ([str(checkpoints / "portable"), "--prompt", "hi", "--top-p", "2"], "top_p must lie"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err


def test_torch_cli_device_that_is_not_there_exits_2(checkpoints, offline, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only torch
    argv = [str(checkpoints / "portable"), "--prompt", "hi", "--max-new-tokens", "2"]
    assert tg.main(argv + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda but ") and err.rstrip().endswith(
        "use --device cpu"), err
    assert tg.main(argv + ["--device", "gpu"]) == 2
    assert "--device 'gpu' is not a torch device name" in capsys.readouterr().err


def test_torch_device_index_beyond_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert tg.check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(GenerationError, match=r"--device cuda:2 but only 2 CUDA device\(s\) are "
                                              r"visible; use --device cuda:0 .. cuda:1"):
        tg.check_device("cuda:2")
    assert tg.check_device("cpu") == torch.device("cpu")


def test_prompt_batch_layout():
    cfg = small_cfg(block_size=256)
    batch = plan_batch([[5] * 10, [6] * 23], cfg, 50, prefill_chunk=8)
    assert batch.tokens.shape == (2, 24) and batch.chunk == 8
    assert batch.tokens[0, :10].tolist() == [5] * 10 and (batch.tokens[0, 10:] == 0).all()
    assert batch.lengths.tolist() == [10, 23] and batch.limits.tolist() == [60, 73]
    assert batch.cache_len >= 73
