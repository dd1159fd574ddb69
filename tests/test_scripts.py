"""scripts/: the launch script's arguments and working directory; check_setup's data check."""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from swamla.data import DataError
from swamla.data.synthetic import write_synthetic_shards

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never touch the network


# ---------------------------------------------------------------- scripts/train_swa_mla.sh
@pytest.fixture
def launch(tmp_path):
    """``launch(*args)``: run the launch script from tmp_path/work with a stub interpreter;
    returns (the stub's working directory, its argv after the interpreter)."""
    record = tmp_path / "argv.json"
    stub = tmp_path / "python_stub"
    stub.write_text("#!/bin/sh\n"
                    f"exec python3 -c 'import json, os, sys; json.dump([os.getcwd(), "
                    f"sys.argv[1:]], open(\"{record}\", \"w\"))' \"$@\"\n")
    stub.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()

    def run(*args):
        env = {**os.environ, "PYTHON": str(stub), "SWAMLA_FP8": "0"}
        subprocess.run([str(ROOT / "scripts/train_swa_mla.sh"), *args], cwd=work, env=env,
                       check=True, timeout=30)
        cwd, argv = json.loads(record.read_text())
        assert argv[0] == str(ROOT / "train_jax.py")
        return cwd, argv[1:]
    return run


def _flags(*values):
    names = ("--size", "--batch_size", "--block_size", "--output_dir", "--resume",
             "--optimizer_type")
    return [x for pair in zip(names, values) for x in pair]


def test_launch_positionals_are_optional_and_end_at_double_dash(launch, tmp_path):
    """Before: `tiny 2 64 -- ...` gave --output_dir -- and the cwd was the repository root."""
    cwd, argv = launch("tiny", "2", "64", "--", "--source", "shards", "--train_paths", "data/fw")
    assert cwd == str(tmp_path / "work")  # relative paths stay the user's
    assert argv == _flags("tiny", "2", "64", "out/tiny", "auto", "adamw") + [
        "--source", "shards", "--train_paths", "data/fw"]
    full = ("base", "8", "2048", "out/base", "auto", "lion")
    assert launch(*full, "--", "--max_iters", "5")[1] == _flags(*full) + ["--max_iters", "5"]
    assert launch(*full, "--max_iters", "5")[1] == _flags(*full) + ["--max_iters", "5"]
    assert launch()[1] == _flags("small", "8", "2048", "out/small", "auto", "adamw")
    assert launch("tiny", "--max_iters", "5")[1] == _flags(
        "tiny", "8", "2048", "out/tiny", "auto", "adamw") + ["--max_iters", "5"]


# ---------------------------------------------------------------- scripts/check_setup.py
@pytest.fixture(scope="module")
def check_setup():
    spec = importlib.util.spec_from_file_location("check_setup", ROOT / "scripts/check_setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_check_reads_absolute_paths_and_globs(check_setup, tmp_path):
    """Before: absolute paths failed in Path().glob, and only existence was checked."""
    text = tmp_path / "corpus.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i} " + "word " * 40}) + "\n"
                            for i in range(20)))
    shards = write_synthetic_shards(tmp_path / "shards", n_docs=50)
    for paths in ([str(text)], [str(tmp_path / "*.jsonl")], [str(shards)],
                  [str(shards / "train_*.bin")]):
        detail = check_setup.data(paths, "gpt2", cache_dir=str(tmp_path / "cache"))
        assert "first 64 tokens read" in detail, paths
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="blank.jsonl holds no text"):
        check_setup.data([str(tmp_path / "blank.jsonl")], "gpt2",
                         cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        check_setup.data([str(tmp_path / "missing.jsonl")], "gpt2")


def test_a_failed_data_check_fails_the_setup(check_setup, tmp_path, monkeypatch, capsys):
    """Before: 'FAIL data' was printed, then 'setup OK' and exit status 0."""
    for name, value in (("_version", lambda name: "stub"), ("devices", lambda: "stub"),
                        ("tokenizer", lambda name: "stub"), ("one_step", lambda tmp, b: "stub")):
        monkeypatch.setattr(check_setup, name, value)
    assert check_setup.main([]) == 0  # offline, FineWeb cannot be read: optional, so skipped
    assert "skip  data: DataError: " in capsys.readouterr().out
    assert check_setup.main(["--data", str(tmp_path / "missing.jsonl")]) == 1
    out = capsys.readouterr().out
    assert "FAIL  data: DataError: " in out and "setup has problems" in out


def test_tokenizer_check_accepts_other_tokenizers(check_setup, tmp_path):
    """Before: any tokenizer but GPT-2 failed ("expected [15496, 995]")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "Hello": 1, "world": 2, "</s>": 3},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(tmp_path)
    assert "'Hello world' = [1, 2]" in check_setup.tokenizer(str(tmp_path))
    assert "'Hello world' = [15496, 995]" in check_setup.tokenizer("gpt2")
