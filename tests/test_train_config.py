"""TrainConfig and its command line: the original project's flags, generated flags, precedence, errors, round
trips."""

import dataclasses
import importlib
import json
import warnings

import pytest

from swamla import train_config as tc
from swamla.config import ConfigError, ModelConfig, load_preset
from swamla.train_config import ORIGINAL_FLAG_ALIASES, TrainConfig, parse_args


@pytest.fixture(autouse=True)
def data_config(monkeypatch):
    """The real DataConfig; while swamla/data/__init__.py does not export it yet, the class from
    swamla.data.config is handed to train_config directly."""
    package = pytest.importorskip("swamla.data")
    if hasattr(package, "DataConfig"):
        return package.DataConfig
    cls = importlib.import_module("swamla.data.config").DataConfig
    monkeypatch.setattr(tc, "data_config_class", lambda: cls)
    return cls


def _arg(value):
    """CLI text for a field value (the inverse of the generated converters)."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if value is None:
        return ["none"]
    if isinstance(value, dict):
        return [json.dumps(value)]
    if isinstance(value, tuple):
        return list(value)
    return [str(value)]


# ------------------------------------------------------------------------------ defaults
def test_defaults_are_the_seeds():
    cfg = parse_args([])
    assert cfg.model == load_preset("small") and cfg.model.block_size == 2048
    assert (cfg.batch_size, cfg.learning_rate, cfg.min_lr, cfg.weight_decay) == (8, 1e-4, 1e-5, 0.1)
    assert (cfg.beta1, cfg.beta2, cfg.warmup_iters, cfg.grad_clip) == (0.9, 0.95, 400, 1.0)
    assert (cfg.max_iters, cfg.optimizer_type, cfg.remat_policy) == (100000, "adamw", "none")
    assert cfg == TrainConfig()
    assert cfg.mesh_shape(8) == (1, 8, 1)  # all devices on fsdp by default


# ------------------------------------------------------------------ the original project's flags
SEED_FLAGS = [  # (flags, where the value lands, expected)
    (["--size", "base"], lambda c: c.model, load_preset("base")),
    (["--size", "medium"], lambda c: c.model, load_preset("base")),
    (["--batch_size", "4"], lambda c: c.batch_size, 4),
    (["--block_size", "1024"], lambda c: c.model.block_size, 1024),
    (["--dropout", "0.1"], lambda c: c.model.dropout, 0.1),
    (["--swa_layers_per_cycle", "3"], lambda c: c.model.swa_layers_per_cycle, 3),
    (["--mla_layers_per_cycle", "2"], lambda c: c.model.mla_layers_per_cycle, 2),
    (["--swa_window", "128"], lambda c: c.model.swa_window, 128),
    (["--swa_sink_size", "0"], lambda c: c.model.swa_sink_size, 0),
    (["--mla_q_lora_rank", "64"], lambda c: c.model.q_lora_rank, 64),
    (["--mla_kv_lora_rank", "128"], lambda c: c.model.kv_lora_rank, 128),
    (["--mla_qk_nope_head_dim", "64"], lambda c: c.model.qk_nope_head_dim, 64),
    (["--mla_qk_rope_head_dim", "32"], lambda c: c.model.qk_rope_head_dim, 32),
    (["--mla_v_head_dim", "96"], lambda c: c.model.v_head_dim, 96),
    (["--max_iters", "500"], lambda c: c.max_iters, 500),
    (["--learning_rate", "3e-4"], lambda c: c.learning_rate, 3e-4),
    (["--min_lr", "0"], lambda c: c.min_lr, 0.0),
    (["--weight_decay", "0.05"], lambda c: c.weight_decay, 0.05),
    (["--beta1", "0.8"], lambda c: c.beta1, 0.8),
    (["--beta2", "0.99"], lambda c: c.beta2, 0.99),
    (["--warmup_iters", "10"], lambda c: c.warmup_iters, 10),
    (["--grad_clip", "0.5"], lambda c: c.grad_clip, 0.5),
    (["--gradient_accumulation_steps", "4"], lambda c: c.gradient_accumulation_steps, 4),
    (["--gradient_checkpointing"], lambda c: (c.gradient_checkpointing, c.remat_policy),
     (True, "full")),
    (["--optimizer_type", "lion"], lambda c: c.optimizer_type, "lion"),
    (["--use_fp8"], lambda c: c.use_fp8, True),
    (["--tokenizer_name", "gpt2-large"], lambda c: c.data.tokenizer_name, "gpt2-large"),
    (["--num_workers", "0"], lambda c: c.data.num_workers, 0),
    (["--output_dir", "runs/a"], lambda c: c.output_dir, "runs/a"),
    (["--log_interval", "1"], lambda c: c.log_interval, 1),
    (["--eval_interval", "50"], lambda c: c.eval_interval, 50),
    (["--save_interval", "200"], lambda c: c.save_interval, 200),
    (["--wandb_project", "swamla"], lambda c: c.wandb_project, "swamla"),
    (["--wandb_run_name", "run-1"], lambda c: c.wandb_run_name, "run-1"),
    (["--compile"], lambda c: c.compile, True),
]


@pytest.mark.parametrize("argv,get,expected", SEED_FLAGS, ids=[a[0] for a, _, _ in SEED_FLAGS])
def test_seed_flag_lands_in_its_field(argv, get, expected):
    assert get(parse_args(argv)) == expected


def test_every_seed_alias_is_tested():
    tested = {argv[0][2:] for argv, _, _ in SEED_FLAGS}
    assert set(ORIGINAL_FLAG_ALIASES) <= tested


def test_seed_command_line():
    cfg = parse_args("--size small --batch_size 8 --block_size 2048 --optimizer_type lion "
                     "--gradient_checkpointing --mla_kv_lora_rank 512".split())
    assert (cfg.batch_size, cfg.model.block_size, cfg.optimizer_type) == (8, 2048, "lion")
    assert cfg.model.kv_lora_rank == 512 and cfg.gradient_checkpointing


# ------------------------------------------------------------------------------ generated flags
def test_every_field_has_its_own_flag_and_parses(data_config):
    table = tc.flag_table()
    cfg = TrainConfig(model=load_preset("tiny"),
                      data=data_config(source="files", train_paths=("a",)))
    argv = ["--size", "tiny"]
    for f in dataclasses.fields(ModelConfig):
        assert f"model.{f.name}" in table[f"model.{f.name}"]
        argv += [f"--model.{f.name}", *_arg(getattr(cfg.model, f.name))]
    for f in dataclasses.fields(data_config):
        assert f"data.{f.name}" in table[f"data.{f.name}"]
        argv += [f"--data.{f.name}", *_arg(getattr(cfg.data, f.name))]
    for f in tc.train_fields():
        assert table[f.name][0] == f.name
        argv += [f"--{f.name}", *_arg(getattr(cfg, f.name))]
    assert parse_args(argv) == cfg


def test_flat_names_reach_model_and_data():
    cfg = parse_args(["--n_layer", "6", "--rope_theta", "500000", "--source", "files",
                      "--train_paths", "a.jsonl", "b.jsonl", "--val_fraction", "0.1"])
    assert (cfg.model.n_layer, cfg.model.rope_theta) == (6, 500000.0)
    assert cfg.data.source == "files" and cfg.data.train_paths == ("a.jsonl", "b.jsonl")
    assert cfg.data.val_fraction == 0.1


def test_model_overrides_apply_before_derived_defaults():
    cfg = parse_args(["--size", "tiny", "--n_embd", "128"])
    assert cfg.model.mlp_hidden == 4 * 128


@pytest.mark.parametrize("argv,expected", [
    (["--tensorboard"], True), (["--no-tensorboard"], False), (["--tensorboard", "true"], True),
    (["--tensorboard=false"], False), (["--tensorboard", "0"], False),
    (["--tensorboard", "--no-tensorboard"], False),
])
def test_boolean_forms(argv, expected):
    assert parse_args(argv).tensorboard is expected


def test_boolean_forms_on_model_and_data_fields():
    cfg = parse_args(["--model.bias", "--no-shuffle", "--use_dyt=true"])
    assert cfg.model.bias and cfg.model.use_dyt and not cfg.data.shuffle


def test_negative_and_json_values():
    cfg = parse_args(["--mesh_data", "-1", "--mesh_fsdp", "2", "--rope_scaling",
                      '{"type": "linear", "factor": 2.0}', "--wandb_project", "none"])
    assert (cfg.mesh_data, cfg.mesh_fsdp) == (-1, 2) and cfg.mesh_shape(8) == (4, 2, 1)
    assert cfg.model.rope_scaling == {"type": "linear", "factor": 2.0}
    assert cfg.wandb_project is None


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("argv,match", [
    (["--lerning_rate", "1e-3"], "did you mean --learning_rate"),
    (["--batch_size", "eight"], "--batch_size.*expected an integer"),
    (["--learning_rate", "fast"], "--learning_rate.*expected a number"),
    (["--compile", "maybe"], "--compile.*expected true or false"),
    (["--rope_scaling", "[1]"], "expected a JSON object"),
    (["--size", "huge"], "unknown preset 'huge'"),
    (["--n_layer", "0"], "n_layer must be >= 1"),
    (["--source", "files"], "data: source='files' needs train_paths"),
    (["--max_iters"], "--max_iters: expected one argument"),
])
def test_cli_errors_name_the_flag(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


@pytest.mark.parametrize("field,value,match", [
    ("learning_rate", -1e-4, "learning_rate must be > 0"),
    ("learning_rate", 0.0, "learning_rate must be > 0"),
    ("min_lr", 1e-3, r"min_lr \(0.001\) must be <= learning_rate"),
    ("optimizer_type", "sgd", "optimizer_type must be one of"),
    ("compute_dtype", "float16", "compute_dtype must be one of"),
    ("eval_interval", 0, "eval_interval must be >= 1"),
    ("save_interval", -5, "save_interval must be >= 1"),
    ("batch_size", "8", "batch_size must be an integer"),
    ("batch_size", 8.0, "batch_size must be an integer"),
    ("beta2", 1.0, "beta2 must be < 1"),
    ("grad_clip", float("nan"), "grad_clip must be a finite number"),
    ("compile", "yes", "compile must be true or false"),
    ("mesh_tensor", 0, "mesh_tensor must be >= 1, or -1"),
    ("mesh_data", -1, "at most one of mesh_data, mesh_fsdp, mesh_tensor may be -1"),
    ("remat_policy", "dots_saveable", "remat_policy 'dots_saveable' contradicts"),
    ("remat_policy", "everything", "remat_policy must be one of"),
    ("output_dir", "", "output_dir must be a non-empty string"),
    ("coordinator_address", "localhost", "coordinator_address must be host:port"),
    ("process_id", 4, r"process_id \(4\) must be < num_processes"),
])
def test_invalid_values_name_the_field(field, value, match):
    base = {"num_processes": 4} if field == "process_id" else {}
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({**base, field: value})


def test_fp8_needs_bfloat16():
    with pytest.raises(ConfigError, match="use_fp8 needs compute_dtype 'bfloat16'"):
        parse_args(["--use_fp8", "--compute_dtype", "float32"])


def test_warmup_longer_than_run_is_said_by_the_run_not_the_config(caplog):
    """The config is built several times a run; the trainers call warn_short_run once (both
    trainers' runs: tests/test_trainer_contract.py)."""
    import logging

    from swamla.schedule import warn_short_run

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short, long = parse_args(["--max_iters", "100"]), parse_args(["--max_iters", "400"])
    with caplog.at_level(logging.WARNING, logger="swamla.schedule"):
        warn_short_run(long)
        assert not caplog.records
        warn_short_run(short)
    assert [r.getMessage() for r in caplog.records] == [
        "warmup_iters (400) > max_iters (100): the learning rate rises linearly for the whole run "
        "and its last update uses 2.48e-05, not learning_rate 0.0001; set --warmup_iters 100 or "
        "less to reach it"]


def test_mesh_that_does_not_fit():
    with pytest.raises(ConfigError, match="does not fit 6 devices"):
        parse_args(["--mesh_tensor", "4"]).mesh_shape(6)
    with pytest.raises(ConfigError, match="does not fit 8 devices"):
        parse_args(["--mesh_fsdp", "2"]).mesh_shape(8)


# ------------------------------------------------------------------------------ config file
def _write(tmp_path, obj, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


def test_file_overrides_defaults_and_flags_override_file(tmp_path):
    path = _write(tmp_path, {"size": "tiny", "model": {"n_layer": 6, "dropout": 0.1},
                             "data": {"num_workers": 1, "prefetch": 8},
                             "learning_rate": 3e-4, "batch_size": 4})
    cfg = parse_args(["--config", path, "--learning_rate", "2e-4", "--dropout", "0.2",
                      "--num_workers", "2"])
    assert (cfg.learning_rate, cfg.batch_size) == (2e-4, 4)
    assert (cfg.model.n_layer, cfg.model.dropout, cfg.model.n_embd) == (6, 0.2, 64)
    assert (cfg.data.num_workers, cfg.data.prefetch) == (2, 8)


def test_cli_size_replaces_the_files_model(tmp_path):
    path = _write(tmp_path, {"size": "tiny", "model": {"n_layer": 6}})
    assert parse_args(["--config", path, "--size", "small"]).model == load_preset("small")
    cfg = parse_args(["--config", path, "--size", "small", "--n_layer", "3"])
    assert cfg.model == load_preset("small", n_layer=3)


@pytest.mark.parametrize("content,match", [
    ({"learning_rat": 1e-4}, "unknown key 'learning_rat'"),
    ({"n_layer": 4}, "'n_layer'; it is a model field: put it under \"model\""),
    ({"tokenizer_name": "gpt2"}, "it is a data field"),
    ({"model": {"n_layers": 4}}, r"unknown config field\(s\) \['n_layers'\]"),
    ({"data": {"tokeniser": "gpt2"}}, r"unknown data field\(s\) \['tokeniser'\]"),
    ({"model": "tiny"}, "'model' must be an object of fields"),
])
def test_unknown_keys_in_file_are_errors(tmp_path, content, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(["--config", _write(tmp_path, content)])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        parse_args(["--config", str(bad)])


def test_size_may_be_a_model_config_file(tmp_path):
    model = load_preset("tiny", n_layer=5)
    model.save(tmp_path / "config.json")
    assert parse_args(["--size", str(tmp_path / "config.json")]).model == model
    assert parse_args(["--size", str(tmp_path)]).model == model


# ------------------------------------------------------------------------------ round trips
def _nondefault(data_config):
    return TrainConfig(model=load_preset("tiny", q_lora_rank=16, rope_scaling={"type": "linear",
                                                                                 "factor": 4.0}),
                       data=data_config(source="files", train_paths=("x/*.jsonl",),
                                        val_paths=("v.jsonl",), num_workers=0),
                       batch_size=2, learning_rate=6e-4, optimizer_type="lion", fsdp=True,
                       gradient_checkpointing=True, remat_policy="dots_saveable", mesh_data=2,
                       mesh_fsdp=-1, resume="none", wandb_project="p", num_processes=2,
                       process_id=1, coordinator_address="10.0.0.1:1234", max_iters=1000)


def test_round_trip_through_dict_json_file_and_cli(tmp_path, data_config):
    cfg = _nondefault(data_config)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save(tmp_path / "train_config.json")
    assert TrainConfig.load(tmp_path / "train_config.json") == cfg
    assert parse_args(["--config", str(tmp_path / "train_config.json")]) == cfg
    assert cfg.to_dict()["data"]["train_paths"] == ["x/*.jsonl"]


def test_replace_and_describe(data_config):
    cfg = _nondefault(data_config)
    assert cfg.replace(batch_size=3).batch_size == 3
    with pytest.raises(ConfigError, match="unknown train config field"):
        cfg.replace(batchsize=3)
    text = cfg.describe(data_parallel_size=4)
    assert "optimizer_type='lion'*" in text and "beta1=0.9," in text
    assert f"{2 * 4 * 1} sequences = {8 * 256:,} tokens per step" in text
    assert cfg.global_batch_size(4) == 8 and cfg.tokens_per_step(4) == 8 * 256


def test_flags_markdown_lists_every_flag():
    text = tc.flags_markdown()
    for names in tc.flag_table().values():
        for n in names:
            assert f"`--{n}`" in text
    assert "| `--learning_rate` | `0.0001` |" in text


def test_hyphenated_flags_read_as_their_fields():
    """Other tools (swamla.data.prepare among them) spell flags with hyphens."""
    cfg = parse_args(["--size", "tiny", "--train-paths", "a.jsonl", "b.jsonl", "--no-progress-bar",
                      "--learning-rate=3e-3", "--model.swa-window", "16"])
    assert cfg.data.train_paths == ("a.jsonl", "b.jsonl") and cfg.progress_bar is False
    assert cfg.learning_rate == 3e-3 and cfg.model.swa_window == 16
    with pytest.raises(ConfigError, match=r"unknown argument.*'--train-pathz'.*did you mean "
                       r"--train_paths"):
        parse_args(["--train-pathz", "a"])


def test_help_prints_every_flag_cleanly():
    text = tc.build_parser().format_help()  # argparse %-formats each help string
    assert "~20% slower" in text and "~15% slower" in text and "'option_strings'" not in text


def test_a_resume_may_change_only_training_time_model_fields():
    saved = load_preset("tiny")
    tc.check_resumed_model(saved, saved.replace(dropout=0.1, block_size=128, label_smoothing=0.1),
                           "ckpt")
    with pytest.raises(ConfigError, match=r"ckpt was trained with another model: swa_window=32 "
                       r"there, 8 in this run, rope_theta=10000.0 there, 500.0 in this run"):
        tc.check_resumed_model(saved, saved.replace(swa_window=8, rope_theta=500.0), "ckpt")


def test_both_trainers_resume_through_one_check():
    """check_resumed_state is what either trainer checks before loading a saved state."""
    cfg = TrainConfig(model=load_preset("tiny"), max_iters=10)
    tc.check_resumed_state(cfg, "ckpt", model=cfg.model, optimizer_type="adamw", step=10)
    with pytest.raises(ConfigError, match=r"ckpt holds lion moments but optimizer_type is "
                       r"'adamw'; resume with --optimizer_type lion"):
        tc.check_resumed_state(cfg, "ckpt", model=cfg.model, optimizer_type="lion", step=3)
    with pytest.raises(ConfigError, match="ckpt is at step 11, past max_iters 10"):
        tc.check_resumed_state(cfg, "ckpt", model=cfg.model, optimizer_type="adamw", step=11)
    with pytest.raises(ConfigError, match="ckpt was trained with another model: swa_window=8"):
        tc.check_resumed_state(cfg, "ckpt", model=cfg.model.replace(swa_window=8),
                               optimizer_type="adamw", step=3)
    with pytest.raises(ValueError, match=r"ckpt \(resumed with this run's model config\) does "
                       "not match its config.json: missing tensors"):
        tc.check_resumed_state(cfg, "ckpt", model=cfg.model, optimizer_type="adamw", step=3,
                               params={})


def test_the_shared_command_line(capsys, monkeypatch):
    """Both launchers run swamla.train_cli.main: --help and bad flags answer before any backend
    is imported; input errors exit 2 with 'error: ...'."""
    import sys

    from swamla import train_cli

    monkeypatch.delitem(sys.modules, "swamla_jax.train", raising=False)
    monkeypatch.delitem(sys.modules, "swamla_torch.train", raising=False)
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(["--help"], backend="jax")
    assert exit_.value.code == 0 and "--max_iters" in capsys.readouterr().out
    for backend in train_cli.BACKENDS:
        assert train_cli.main(["--bogus_flag", "1"], backend=backend) == 2
        assert "error: unknown argument(s) ['--bogus_flag'" in capsys.readouterr().err
    assert "swamla_jax.train" not in sys.modules and "swamla_torch.train" not in sys.modules
    with pytest.raises(ValueError, match="backend must be one of"):
        train_cli.main([], backend="tf")
