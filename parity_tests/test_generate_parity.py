"""One portable checkpoint, two backends: the same greedy tokens and the same step logits.

The checkpoint is a perturbed torch model written with ``save_pretrained`` and read back by each
backend's ``load_pretrained`` (the path a user takes). Prompts of 10 and 23 tokens decode to 50
and 63 positions, past the tiny window (16) with a 4-token sink.
"""

import numpy as np
import pytest

from parity_helpers import LOGIT_RTOL, perturbed_torch_model, rel_err, tiny_config

torch = pytest.importorskip("torch")

import swamla_jax as sj  # noqa: E402
import swamla_torch as st  # noqa: E402
from swamla_jax import generate as jg  # noqa: E402
from swamla_torch import generate as tg  # noqa: E402

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("seed", [0, 1])
def test_same_greedy_tokens_from_one_portable_checkpoint(tmp_path, seed):
    cfg = tiny_config(swa_window=16, swa_sink_size=4, vocab_size=1024)
    st.save_pretrained(perturbed_torch_model(cfg, seed), tmp_path / "ckpt")
    tm, jm = st.load_pretrained(tmp_path / "ckpt"), sj.load_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (10, 23)]
    t = tg.generate(tm, prompts, max_new_tokens=40, return_logits=True, prefill_chunk=8)
    j = jg.generate(jm, prompts, max_new_tokens=40, return_logits=True, prefill_chunk=8)
    assert j.tokens == t.tokens
    assert all(len(row) == 40 for row in t.tokens)
    assert rel_err(j.step_logits, t.step_logits) <= LOGIT_RTOL
    assert j.cache_bytes == t.cache_bytes
