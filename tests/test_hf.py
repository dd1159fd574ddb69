"""The Hugging Face export (``swamla-convert --to hf``, ``swamla_torch.hf``): the loaded
transformers model computes what ``swamla_torch`` computes, its loss, bfloat16 loading, the way
back to the portable tensors, generation on the compressed caches, the export a training run
writes at its end (and its push to the Hub, offline), and each error a user can hit.

Everything runs on CPU in float32 with matmul precision pinned to highest, on perturbed random
weights (so biases, norm weights and DyT alphas matter), with sequences longer than the window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import swamla_torch as st  # noqa: E402
from swamla_torch.convert import to_portable_tensors  # noqa: E402
from swamla.config import BlockKind, load_preset  # noqa: E402
from swamla.convert_cli import convert, main as convert_main, read_tensors  # noqa: E402
from swamla.hf_files import load_hf_export  # noqa: E402
from swamla.portable import CheckpointError  # noqa: E402
from swamla.sampling import cache_numbers_per_token  # noqa: E402
from swamla_torch import generate as tg  # noqa: E402
from swamla_torch.cache import cache_nbytes, init_cache  # noqa: E402
from swamla_torch.hf import export_hf  # noqa: E402
from swamla_torch.losses import cross_entropy  # noqa: E402

transformers = pytest.importorskip("transformers")
AutoModelForCausalLM = transformers.AutoModelForCausalLM
AutoTokenizer = transformers.AutoTokenizer

RTOL = ATOL = 1e-5
VARIANTS = {
    "window8": {},
    "q_lora": {"q_lora_rank": 16},
    "bias": {"bias": True},
    "all_options": {"q_lora_rank": 16, "bias": True, "ratio_kv": 2, "use_dyt": True,
                    "mla_norm": "rmsnorm", "logit_scale_base": 3.0, "logit_scale_window": 16,
                    "rope_scaling": {"type": "linear", "factor": 2.0}},
}


@pytest.fixture(autouse=True)
def highest_precision(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_num_threads(threads)


def tiny_cfg(**overrides):
    return load_preset("tiny", **{"swa_window": 8, "swa_sink_size": 2, **overrides})


def perturbed(cfg, seed=0):
    model = st.from_config(cfg, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def export(model, path, **kwargs):
    return export_hf(model.config, to_portable_tensors(model), path, **kwargs)


def load_hf(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(project model, HF export directory) of the tiny config with window 8."""
    model = perturbed(tiny_cfg())
    path = tmp_path_factory.mktemp("hf") / "export"
    export(model, path)
    return model, path


def left_padded(prompts, pad=0):
    L = max(map(len, prompts))
    ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# ------------------------------------------------------------------------------ the export
def test_export_directory_loads_with_auto_classes(exported):
    model, path = exported
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "swamla"
    assert config["architectures"] == ["SWAMLAForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_swamla.SWAMLAConfig",
                                  "AutoModelForCausalLM": "modeling_swamla.SWAMLAForCausalLM"}
    assert {k: config[k] for k in model.config.to_dict()} == json.loads(
        json.dumps(model.config.to_dict()))
    for name in ("modeling_swamla.py", "configuration_swamla.py", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 50256
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    assert tok("Hello world").input_ids == [15496, 995]
    assert tok.eos_token_id == 50256 and tok.decode([15496, 995]) == "Hello world"
    hf, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                    output_loading_info=True)
    assert type(hf).__name__ == "SWAMLAForCausalLM"
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    # the safetensors weights are the portable tensors, under their SPEC section 7 names
    assert set(hf.state_dict()) == set(model.state_dict())


def test_config_fields_are_the_model_config_fields():
    """SWAMLAConfig repeats ModelConfig's fields (transformers reads them from the class): same
    names, same defaults, and a bad value is ModelConfig's error naming the field."""
    import dataclasses

    from swamla.config import ConfigError, ModelConfig
    from swamla_torch.hf import SWAMLAConfig

    default = SWAMLAConfig()
    for field in dataclasses.fields(ModelConfig):
        assert hasattr(default, field.name), field.name
        assert getattr(default, field.name) == getattr(ModelConfig(), field.name), field.name
    assert default.to_model_config() == ModelConfig()
    with pytest.raises(ConfigError, match="swa_window"):
        SWAMLAConfig(swa_window=0).to_model_config()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_equal_swamla_torch(tmp_path, variant):
    """T 40 against a window of 8 and a sink of 2, at two seeds."""
    for seed in (0, 1):
        model = perturbed(tiny_cfg(**VARIANTS[variant]), seed)
        export(model, tmp_path / f"s{seed}")
        hf = load_hf(tmp_path / f"s{seed}")
        ids = torch.randint(0, model.config.vocab_size, (2, 40),
                            generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref, _ = model(ids)
            torch.testing.assert_close(hf(ids).logits, ref, rtol=RTOL, atol=ATOL)


def test_padded_rows_equal_unpadded(exported):
    """Left padding (generation, lm-eval) and right padding: each row's real positions get the
    logits of the row alone."""
    model, path = exported
    hf = load_hf(path)
    prompts = [list(range(100, 140)), list(range(300, 317)), [7]]
    ids, mask = left_padded(prompts)
    L = ids.shape[1]
    right_ids = torch.tensor([p + [0] * (L - len(p)) for p in prompts])
    with torch.no_grad():
        left = hf(ids, attention_mask=mask).logits
        right = hf(right_ids, attention_mask=mask.flip(1)).logits
        for b, p in enumerate(prompts):
            ref, _ = model(torch.tensor([p]))
            torch.testing.assert_close(left[b, L - len(p):], ref[0], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(right[b, :len(p)], ref[0], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="padding between real tokens"):
        hf(ids[:1, :4], attention_mask=torch.tensor([[1, 0, 1, 1]]))


def test_labels_give_the_project_loss_shifted(exported):
    """labels = input ids; the model shifts them (transformers' convention) and ignores -100."""
    model, path = exported
    hf = load_hf(path)
    ids = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, 5:9] = -100
    labels[1, -3:] = -100
    with torch.no_grad():
        out = hf(ids, labels=labels)
        targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
        _, ref = model(ids, targets)
        manual = cross_entropy(out.logits[:, :-1], labels[:, 1:])
    torch.testing.assert_close(out.loss, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.loss, manual, rtol=RTOL, atol=ATOL)
    with torch.no_grad():  # the Trainer's gradient accumulation passes the step's target count
        summed = hf(ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(summed, ref * n / 100, rtol=RTOL, atol=ATOL)
    hf.train()
    loss = hf(ids, labels=ids).loss
    loss.backward()
    assert hf.transformer.wte.weight.grad is not None


def test_bfloat16_loading(exported):
    model, path = exported
    hf = load_hf(path, dtype=torch.bfloat16)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, _ = model(ids)
        out = hf(ids).logits.float()
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_sharded_export_via_the_cli(tmp_path):
    model = perturbed(tiny_cfg())
    st.save_pretrained(model, tmp_path / "portable")
    assert convert_main([str(tmp_path / "portable"), str(tmp_path / "hf"), "--to", "hf",
                         "--max_shard_size", "1MB"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = torch.randint(0, 50257, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "hf")(ids).logits, model(ids)[0],
                                   rtol=RTOL, atol=ATOL)


def test_peft_lora_trains_and_leaves_the_model_intact(exported, tmp_path):
    peft = pytest.importorskip("peft")
    model, path = exported
    hf = load_hf(path)
    lora = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "wq", "wkv_b"], task_type="CAUSAL_LM"))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(6))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = {k: v for k, v in hf.state_dict().items() if "lora_" not in k}
    assert any("base_layer" in k for k in base)  # LoRA wraps the targeted projections
    for k, v in model.state_dict().items():
        module, leaf = k.rsplit(".", 1)
        stored = base[k] if k in base else base[f"{module}.base_layer.{leaf}"]
        assert torch.equal(stored, v), k


# ------------------------------------------------------------------------------ and back
def test_hf_converts_back_to_every_format(exported, tmp_path):
    model, path = exported
    cfg, tensors = read_tensors(path)
    assert cfg == model.config
    assert all(np.array_equal(tensors[k], v) for k, v in to_portable_tensors(model).items())
    convert(path, tmp_path / "portable", "portable")
    convert(path, tmp_path / "model.pt", "torch")
    back = st.load_native(tmp_path / "model.pt")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    convert(path, tmp_path / "bf16", "hf", dtype="bfloat16")
    assert load_hf(tmp_path / "bf16").transformer.wte.weight.dtype == torch.bfloat16
    _, half = read_tensors(tmp_path / "bf16")
    assert all(torch.equal(torch.from_numpy(half[k].astype(np.float32)), v.bfloat16().float())
               for k, v in model.state_dict().items())


def test_jax_to_hf_to_jax_is_bit_exact(tmp_path):
    sj = pytest.importorskip("swamla_jax")
    jmodel = sj.from_config(tiny_cfg(q_lora_rank=16, bias=True), seed=0)
    sj.save_native(jmodel, tmp_path / "jax")
    convert(tmp_path / "jax", tmp_path / "hf", "hf")
    convert(tmp_path / "hf", tmp_path / "jax2", "jax")
    _, before = read_tensors(tmp_path / "jax")
    _, after = read_tensors(tmp_path / "jax2")
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_refused_by_message(exported, tmp_path):
    model, path = exported
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not an SWA-MLA checkpoint.*Hugging Face export"):
        read_tensors(other)

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama', expected 'swamla'"):
        read_tensors(llama)

    def copy(name):
        import shutil

        shutil.copytree(path, tmp_path / name)
        return tmp_path / name

    no_tok = copy("no_tok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"lacks the tokenizer file\(s\) \['tokenizer.json'\]"):
        load_hf_export(no_tok)

    wrong = copy("wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["kv_lora_rank"] = 24
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors .*wkv_a.weight"):
        load_hf_export(wrong)

    # nothing overwritten unasked: another export needs --overwrite, anything else is refused
    with pytest.raises(CheckpointError, match="already holds a Hugging Face export; pass "
                                              "--overwrite"):
        convert(path, wrong, "hf")
    convert(path, wrong, "hf", overwrite=True)
    assert json.loads((wrong / "config.json").read_text())["kv_lora_rank"] == 32
    with pytest.raises(CheckpointError, match="refusing to write a Hugging Face export"):
        convert(path, other, "hf", overwrite=True)
    assert (other / "notes.txt").is_file()


def test_missing_swamla_package_names_the_install(exported):
    _, path = exported
    code = ("import sys; sys.modules['swamla_torch.model'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(path.parent / "mods")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode != 0
    assert "pip install 'swamla[torch]'" in run.stderr


# ------------------------------------------------------------------------------ generate
def test_greedy_generate_equals_the_project_generate(exported):
    """Batched prompts of different lengths, left-padded, with the compressed cache and without
    (recomputing everything each step): the tokens of swamla_torch.generate's greedy decoding."""
    model, path = exported
    hf = load_hf(path)
    prompts = [list(range(1000, 1013)), [50, 60, 70], list(range(2000, 2021))]
    ref = tg.generate(model, prompts, max_new_tokens=24).tokens
    assert len({t for row in ref for t in row}) > 3  # not one repeated token
    ids, mask = left_padded(prompts)
    for use_cache in (True, False):
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                          use_cache=use_cache, eos_token_id=None, pad_token_id=0)
        assert out[:, ids.shape[1]:].tolist() == ref, use_cache
    beams = [hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=3,
                         do_sample=False, use_cache=use_cache, eos_token_id=None, pad_token_id=0)
             for use_cache in (True, False)]  # the cache's rows follow the beams
    assert beams[0].tolist() == beams[1].tolist()


def test_sampled_generate_and_cache_bytes(exported):
    """Sampling gives the same tokens with and without the cache at one seed, and the cache
    holds the project's compressed figures: SWA ring + sink, MLA latents per token."""
    model, path = exported
    hf = load_hf(path)
    ids, mask = left_padded([list(range(1000, 1013)), [50, 60, 70]])
    runs = {}
    for use_cache in (True, False):
        torch.manual_seed(5)
        runs[use_cache] = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16,
                                      do_sample=True, top_k=50, temperature=0.8,
                                      use_cache=use_cache, eos_token_id=None, pad_token_id=0,
                                      return_dict_in_generate=True)
    assert runs[True].sequences.tolist() == runs[False].sequences.tolist()
    cache = runs[True].cache
    assert type(cache).__name__ == "SWAMLACache"
    cfg = model.config
    S = next(layer["c"].shape[1] for layer in cache.buffers["layers"] if "c" in layer)
    assert S >= ids.shape[1] + 16
    assert cache.nbytes == cache_nbytes(init_cache(cfg, 2, S))
    per_row = cache_numbers_per_token(cfg, S)["compressed"] * S
    assert cache.nbytes == round(per_row) * 2 * 4  # float32, two rows
    n_mla = cfg.block_kinds.count(BlockKind.MLA)
    assert cache_numbers_per_token(cfg, S)["compressed"] * S - cache_numbers_per_token(
        cfg, S - 1)["compressed"] * (S - 1) == pytest.approx(
        n_mla * (cfg.kv_lora_rank + cfg.qk_rope_head_dim))


# ------------------------------------------------------------------------------ lm-eval
LM_EVAL_TASK = """\
task: swamla_local_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
LM_EVAL_RUN = """\
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

export, tasks, out = sys.argv[1:]
res = lm_eval.simple_evaluate(
    model="hf", model_args=f"pretrained={export},trust_remote_code=True,dtype=float32",
    tasks=["swamla_local_ll"], task_manager=TaskManager(include_path=tasks), batch_size=2,
    device="cpu", log_samples=True)
samples = sorted(res["samples"]["swamla_local_ll"], key=lambda s: s["doc_id"])
json.dump({"results": res["results"]["swamla_local_ll"],
           "ll": [s["filtered_resps"][0][0] for s in samples]}, open(out, "w"))
"""


@pytest.mark.slow
def test_lm_eval_loglikelihood_equals_the_project_model(exported, tmp_path):
    """lm-eval's hf model on the export, offline, on a task from a local YAML and jsonl file: its
    per-document log-likelihoods and perplexity are the project model's."""
    pytest.importorskip("lm_eval")
    from swamla.tokenizer import bundled_gpt2

    model, path = exported
    docs = [("The cat sat on the", " mat"), ("Once upon a time there was a",
                                             " princess who lived in a castle"),
            ("1 2 3 4", " 5"), ("Hello", " world"), ("A B C", " D E F G")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task.yaml").write_text(LM_EVAL_TASK.format(data=data))
    (tmp_path / "run.py").write_text(LM_EVAL_RUN)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(path),
                          str(tmp_path / "tasks"), str(tmp_path / "out.json")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())

    tok = bundled_gpt2()
    ll, greedy = [], []
    with torch.no_grad():
        for context, continuation in docs:
            ctx, cont = tok.encode(context), tok.encode(continuation)
            logits, _ = model(torch.tensor([ctx + cont])[:, :-1])
            logp = torch.log_softmax(logits[0, len(ctx) - 1:].double(), -1)
            ll.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
            greedy.append(bool((logp.argmax(-1) == torch.tensor(cont)).all()))
    np.testing.assert_allclose(got["ll"], ll, rtol=1e-5)
    results = got["results"]
    assert results["perplexity,none"] == pytest.approx(np.exp(-np.mean(ll)), rel=1e-5)
    assert results["acc,none"] == pytest.approx(np.mean(greedy))


# ------------------------------------------------------------------ from a training run
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from swamla.data.synthetic import write_synthetic_shards

    return write_synthetic_shards(tmp_path_factory.mktemp("shards"), n_docs=100, seed=0)


def run_flags(shards, out, *extra):
    return ["--size", "tiny", "--n_layer", "3", "--block_size", "32", "--swa_window", "8",
            "--source", "shards", "--train_paths", str(shards), "--batch_size", "2",
            "--max_iters", "2", "--warmup_iters", "1", "--learning_rate", "3e-3",
            "--min_lr", "3e-4", "--log_interval", "1", "--eval_interval", "1000",
            "--eval_iters", "1", "--save_interval", "1000", "--compute_dtype", "float32",
            "--loss_chunk", "0", "--no-progress_bar", "--output_dir", str(out), *extra]


def trainer(backend):
    if backend == "jax":
        pytest.importorskip("jax")
    import importlib

    return importlib.import_module(f"swamla_{backend}.train")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_training_run_writes_the_export(shards, tmp_path, backend):
    """The run's own export_hf computes what its portable export computes in swamla_torch."""
    from swamla.train_config import parse_args

    out = tmp_path / "run"
    result = trainer(backend).train(parse_args(run_flags(shards, out, "--export_hf")))
    assert result["export_hf"] == str(out / "export_hf")
    assert result["export"] == str(out / "export")
    ref = st.load_pretrained(out / "export").eval()
    hf = load_hf(out / "export_hf")
    ids = torch.randint(0, ref.config.vocab_size, (2, 32),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids)[0], rtol=RTOL, atol=ATOL)
    # launched again at max_iters, the run replaces its own export
    again = trainer(backend).train(parse_args(run_flags(shards, out, "--export_hf")))
    assert again["export_hf"] == str(out / "export_hf") and again["step"] == 2
    assert load_hf_export(out / "export_hf")[0] == ref.config


@pytest.fixture
def no_hub_login(tmp_path, monkeypatch):
    """Online, and no token anywhere huggingface_hub looks (nothing here reaches the network)."""
    import huggingface_hub

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH",
                        str(tmp_path / "hf_home" / "token"))
    assert huggingface_hub.get_token() is None


def assert_not_started(out):
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_push_to_hub_offline_fails_before_training(shards, tmp_path, backend, capsys):
    from swamla.train_cli import main
    from swamla.train_config import TrainingError, parse_args

    out = tmp_path / "run"  # HF_HUB_OFFLINE=1: the autouse fixture
    with pytest.raises(TrainingError, match=r"push_to_hub='me/tiny' but the Hub is offline "
                       r"\(HF_HUB_OFFLINE is set\): unset HF_HUB_OFFLINE"):
        trainer(backend).train(parse_args(run_flags(shards, out, "--push_to_hub", "me/tiny")))
    assert_not_started(out)
    assert main(run_flags(shards, out, "--push_to_hub", "me/tiny"), backend=backend) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_push_to_hub_without_a_token_fails_before_training(shards, tmp_path, no_hub_login):
    from swamla.train_config import TrainingError, parse_args

    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="needs a Hugging Face login: run `hf auth login` or "
                       "set HF_TOKEN"):
        trainer("torch").train(parse_args(run_flags(shards, out, "--push_to_hub", "me/tiny")))
    assert_not_started(out)


def test_failed_push_names_the_local_export(tmp_path, no_hub_login, monkeypatch):
    """A push that fails at the end of a run (here: the Hub endpoint refuses the connection, a
    closed port on this machine): one line, the export kept for a later upload."""
    import huggingface_hub

    from swamla.hub import push_export
    from swamla.train_config import TrainingError

    monkeypatch.setenv("HF_TOKEN", "hf_test_token_never_sent")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    export_dir = tmp_path / "export_hf"
    export_dir.mkdir()
    with pytest.raises(TrainingError) as info:
        push_export(export_dir, "me/tiny")
    message = str(info.value)
    assert "\n" not in message and "could not push to the Hub repo 'me/tiny'" in message
    assert f"the local export at {export_dir} is complete" in message
    assert f"`hf upload me/tiny {export_dir}`" in message


def test_export_flags_refused_by_message(shards, tmp_path):
    from swamla.config import ConfigError
    from swamla.train_config import parse_args

    for bad in ("tiny", "me/", "/tiny", "a/b/c", "me/ti ny", "-me/tiny", "me/tiny."):
        with pytest.raises(ConfigError, match=r"push_to_hub must be a Hub repo id 'owner/name'"):
            parse_args([f"--push_to_hub={bad}"])
    assert parse_args(["--push_to_hub", "me/tiny-v1.2_b"]).push_to_hub == "me/tiny-v1.2_b"
    with pytest.raises(ConfigError, match="export_hf must be true or false"):
        parse_args(["--config", str(write_json(tmp_path / "c.json", {"export_hf": "yes"}))])
    out = tmp_path / "run"
    (out / "export_hf").mkdir(parents=True)
    (out / "export_hf" / "notes.txt").write_text("mine")
    cfg = parse_args(run_flags(shards, out, "--export_hf"))
    with pytest.raises(ConfigError, match="holds export_hf but no train_config.json"):
        trainer("torch").train(cfg)  # not a run's folder at all
    cfg.save_to_run(out)  # a run's folder whose export_hf is someone else's
    with pytest.raises(CheckpointError, match="refusing to write a Hugging Face export at"):
        trainer("torch").train(cfg)
    assert (out / "export_hf" / "notes.txt").read_text() == "mine"
    assert_not_started(out)


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path
