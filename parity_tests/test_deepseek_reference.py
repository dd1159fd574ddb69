"""Our MLA against an external implementation: DeepSeek-V3 attention from `transformers`.

With `mla_norm = "rmsnorm"` and interleaved RoPE our MLA block is DeepSeek's; the same weights
must give the same outputs. (DeepSeek's interleaved RoPE writes the rotated halves de-interleaved,
but it does so for q and k alike, so q.k and the attention output are unchanged.)
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds  # noqa: E402

import swamla_jax.attention as ja  # noqa: E402
import swamla_jax.layers as jl  # noqa: E402
import swamla_torch.attention as ta  # noqa: E402
import swamla_torch.layers as tl  # noqa: E402
from parity_helpers import (SEQ, assert_rel_close, flax_params_from_torch, perturb,  # noqa: E402
                            tiny_config)

pytestmark = pytest.mark.parity

NAMES = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj",
         "wo": "o_proj"}


def deepseek_attention(cfg):
    config = ds.DeepseekV3Config(
        hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, rope_interleave=True, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps)
    config._attn_implementation = "eager"
    return ds.DeepseekV3Attention(config, layer_idx=0).eval(), ds.DeepseekV3RotaryEmbedding(config)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
@pytest.mark.parametrize("seed", [0, 1])
def test_mla_matches_deepseek_v3(q_lora_rank, seed):
    cfg = tiny_config(mla_norm="rmsnorm", q_lora_rank=q_lora_rank)
    ours = perturb(ta.MLAttention(cfg), seed).eval()
    theirs, rotary = deepseek_attention(cfg)
    theirs.load_state_dict({f"{NAMES[k.split('.')[0]]}.{k.split('.')[1]}": v
                            for k, v in ours.state_dict().items()}, strict=True)
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((2, SEQ, cfg.n_embd))
                         .astype(np.float32))
    pos = torch.arange(SEQ)
    causal = torch.full((SEQ, SEQ), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected = theirs(x, rotary(x, pos[None]), causal)[0].numpy()
        got_torch = ours(x, tl.rope_tables(cfg.qk_rope_head_dim, pos, cfg.rope_theta, 1.0), pos)
    got_jax = ja.MLAttention(cfg).apply(
        {"params": flax_params_from_torch(ours)}, jnp.asarray(x.numpy()),
        jl.rope_tables(cfg.qk_rope_head_dim, jnp.arange(SEQ), cfg.rope_theta, 1.0), jnp.arange(SEQ))
    assert_rel_close(got_torch.numpy(), expected, 1e-5, "torch MLA vs DeepSeek-V3")
    assert_rel_close(got_jax, expected, 1e-5, "JAX MLA vs DeepSeek-V3")
