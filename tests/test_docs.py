"""The README documents every flag and its two commands are the ones CI runs."""

from pathlib import Path

from swamla.train_config import flag_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_flag_is_in_the_readme():
    missing = [f"--{name}" for names in flag_table().values() for name in names
               if f"`--{name}`" not in README]
    assert not missing, f"README lacks flags {missing}: regenerate from flags_markdown()"


def test_seed_flags_are_documented():
    for flag in ("--size", "--batch_size", "--block_size", "--dropout", "--swa_layers_per_cycle",
                 "--mla_layers_per_cycle", "--swa_window", "--swa_sink_size", "--mla_q_lora_rank",
                 "--mla_kv_lora_rank", "--mla_qk_nope_head_dim", "--mla_qk_rope_head_dim",
                 "--mla_v_head_dim", "--max_iters", "--learning_rate", "--min_lr",
                 "--weight_decay", "--beta1", "--beta2", "--warmup_iters", "--grad_clip",
                 "--gradient_accumulation_steps", "--gradient_checkpointing", "--optimizer_type",
                 "--use_fp8", "--tokenizer_name", "--num_workers", "--output_dir",
                 "--log_interval", "--eval_interval", "--save_interval", "--wandb_project",
                 "--wandb_run_name", "--compile"):
        assert f"`{flag}`" in README, flag


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 -e ".[all]" && python -m pytest -q'
    assert command in README and command in ci
