"""Mixtures of sources with weights: realized proportions, resume, process-count invariance, the
per-source token counts, and the syntax on the command line and in a config file."""

import json

import numpy as np
import pytest
from conftest import make_docs, write_jsonl
from test_data_packing import global_batches, rows_of

from swamla.data import DataConfig, DataError, ShardWriter, build_loader, merge_states
from swamla.train_config import ConfigError, parse_args

EOS = 50256
BASES = (0, 1000, 2000)  # each shards source's token ids lie in [base, base + 500)


def _shards(directory, base, n_docs=60, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_docs), ("val", 4)):
        w = ShardWriter(directory, split, tokenizer_name="gpt2", vocab_size=50257, eos_id=EOS)
        for _ in range(n):
            w.add(np.append(rng.integers(base, base + 500, rng.integers(5, 40)), EOS))
        w.close()
    return str(directory)


@pytest.fixture
def three(tmp_path):
    return [_shards(tmp_path / f"s{i}", base, seed=i) for i, base in enumerate(BASES)]


@pytest.fixture
def with_text(tmp_path, three):
    """Two shards sources and a text file, as a mixture config."""
    text = write_jsonl(tmp_path / "t.jsonl", make_docs(80, hi=30))
    return DataConfig(mixture=(f"{three[0]}:2", f"{three[1]}:1", f"{text}:1"), num_workers=0,
                      val_fraction=0.05, cache_dir=str(tmp_path / "cache"))


def _source_of(row):
    ids = row[row != EOS]
    return int(ids.max() // 1000)


def test_realized_proportions_match_the_weights(three):
    cfg = DataConfig(mixture=(f"{three[0]}:0.6", f"{three[1]}:0.3", f"{three[2]}:0.1"))
    R, n = 8, 250
    with build_loader(cfg, batch_size=R, block_size=16, seed=3) as loader:
        counts = np.zeros(3)
        for _ in range(n):
            for row in next(loader).inputs:
                counts[_source_of(row)] += 1
        tokens = loader.token_counts()
    p = np.array([0.6, 0.3, 0.1])
    sigma = np.sqrt(R * n * p * (1 - p))
    assert np.all(np.abs(counts - R * n * p) < 4 * sigma), (counts, R * n * p)
    assert [tokens[s] for s in three] == list((counts * 16).astype(int))
    assert loader.token_metrics() == {f"tokens[{s}]": tokens[s] for s in three}


def test_resume_continues_the_same_sequence(with_text, tokenizer):
    kw = dict(batch_size=4, block_size=16, seed=1, tokenizer=tokenizer)
    with build_loader(with_text, **kw) as a:
        full = [rows_of(next(a)) for _ in range(12)]
    with build_loader(with_text, **kw) as a:
        for _ in range(5):
            next(a)
        state = json.loads(json.dumps(a.state_dict()))
        tokens = a.token_counts()
    with build_loader(with_text, **kw) as b:
        b.load_state_dict(state)
        assert b.token_counts() == tokens
        for i in range(5, 12):
            np.testing.assert_array_equal(rows_of(next(b)), full[i])


def test_one_and_two_processes_give_the_same_batches(with_text, tokenizer):
    one = global_batches(with_text, tokenizer, 1, 8)
    two = global_batches(with_text, tokenizer, 2, 8)
    for x, y in zip(one, two):
        np.testing.assert_array_equal(x, y)
    # Two processes' states, merged, restore one process at the same point.
    states = []
    for p in range(2):
        with build_loader(with_text, batch_size=2, block_size=16, seed=7, process_index=p,
                          process_count=2, tokenizer=tokenizer) as loader:
            for _ in range(3):
                next(loader)
            states.append(loader.state_dict())
    with build_loader(with_text, batch_size=4, block_size=16, seed=7,
                      tokenizer=tokenizer) as loader:
        loader.load_state_dict(merge_states(states))
        np.testing.assert_array_equal(rows_of(next(loader)), one[3])


def test_validation_mixes_each_sources_own_split(three):
    cfg = DataConfig(mixture=(f"{three[0]}:1", f"{three[2]}:1"))
    with build_loader(cfg, "val", batch_size=8, block_size=16) as a, \
            build_loader(cfg, "val", batch_size=8, block_size=16) as b:
        first = [next(a).inputs for _ in range(4)]
        assert all((x == next(b).inputs).all() for x in first)  # the same batches every time
    assert {_source_of(r) for x in first for r in x} == {0, 2}


def test_mixture_syntax_on_the_command_line_and_in_a_config(three, tmp_path):
    cfg = parse_args(["--mixture", f"{three[0]}:0.7", f"{three[1]}",
                      "hf:HuggingFaceFW/fineweb-edu/CC-MAIN-2024-10:0.5"])
    assert cfg.data.mixture == (f"{three[0]}:0.7", three[1],
                                "hf:HuggingFaceFW/fineweb-edu/CC-MAIN-2024-10:0.5")
    (tmp_path / "c.json").write_text(json.dumps({"data": {"mixture": [f"{three[0]}:3"]}}))
    assert parse_args(["--config", str(tmp_path / "c.json")]).data.mixture == (f"{three[0]}:3",)
    for bad, message in ((["--mixture", "a:-1"], "weight must be a number > 0"),
                         (["--mixture", "hf:fineweb"], "hf:OWNER/NAME"),
                         (["--mixture", "a", "--train_paths", "b"], "mixture replaces source")):
        with pytest.raises(ConfigError, match=message):
            parse_args(bad)


def test_sources_with_different_eos_are_refused(three, tmp_path):
    w = ShardWriter(tmp_path / "other", "train", tokenizer_name="gpt2", vocab_size=50257,
                    eos_id=0)
    w.add(np.arange(1, 200))
    w.close()
    with pytest.raises(DataError, match="different EOS ids"):
        build_loader(DataConfig(mixture=(three[0], str(tmp_path / "other"))), batch_size=1,
                     block_size=8)


def test_a_trainer_logs_tokens_per_source(tmp_path):
    """The PyTorch trainer on a mixture: each log record carries the tokens read per source."""
    torch = pytest.importorskip("torch")
    from swamla.metrics import read_metrics
    from swamla.train_config import TrainConfig
    from swamla_torch.train import train

    dirs = []
    for i in range(2):
        w = ShardWriter(tmp_path / f"m{i}", "train", tokenizer_name="gpt2", vocab_size=512,
                        eos_id=511)
        v = ShardWriter(tmp_path / f"m{i}", "val", tokenizer_name="gpt2", vocab_size=512,
                        eos_id=511)
        for _ in range(40):
            w.add(np.append(np.arange(i * 200, i * 200 + 30), 511))
        v.add(np.append(np.arange(50), 511))
        w.close()
        v.close()
        dirs.append(str(tmp_path / f"m{i}"))
    cfg = TrainConfig.from_dict({
        "size": "tiny", "model": {"vocab_size": 512, "n_layer": 3, "block_size": 16},
        "data": {"mixture": [f"{dirs[0]}:3", f"{dirs[1]}:1"]}, "batch_size": 2,
        "max_iters": 2, "compute_dtype": "float32", "eval_interval": 2, "eval_iters": 1,
        "log_interval": 1, "progress_bar": False, "output_dir": str(tmp_path / "run")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    for r in records:
        assert sum(r[f"tokens[{d}]"] for d in dirs) == r["step"] * 2 * 16
