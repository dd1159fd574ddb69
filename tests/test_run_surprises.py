"""What a user hits around a run, in both trainers: a hub that never answers, a full disk, a
resume that would change the run.

A stalled hub is a real local TCP server that accepts connections and never answers, reached
through ``HF_ENDPOINT``. A full disk is the file system refusing large files (``RLIMIT_FSIZE``:
every write past the limit fails with EFBIG, as it fails with ENOSPC on a full disk) in the
library that really writes them.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


class StalledHub:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            self.connections.append(conn)

    def close(self):
        self.server.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def stalled_hub(monkeypatch):
    hub = StalledHub()
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    yield hub
    hub.close()


# ------------------------------------------------------------------ a hub that never answers
def test_the_default_tokenizer_needs_no_network(stalled_hub, caplog):
    from swamla.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

    loaded = []
    with caplog.at_level("INFO", logger="swamla.tokenizer"):
        for name in (DEFAULT_TOKENIZER, "gpt2"):  # in a thread: a wait on the hub fails, not hangs
            worker = threading.Thread(target=lambda n=name: loaded.append(load_tokenizer(n)),
                                      daemon=True)
            worker.start()
            worker.join(10)
    assert [tok.name for tok in loaded] == [DEFAULT_TOKENIZER] * 2, "waited on the hub"
    assert all(tok.encode("Hello world") == [15496, 995] for tok in loaded)
    assert "bundled files" in caplog.text and "no network" in caplog.text
    time.sleep(0.05)  # a connection in flight would be accepted by now
    assert stalled_hub.connections == []


def test_a_stalled_hub_ends_in_one_error_within_the_deadline(stalled_hub, tmp_path):
    """A hub tokenizer and an export's push, with SWAMLA_HUB_TIMEOUT=1: each logs what it waits
    for, then fails in one line naming the way to work without the hub. HF_ENDPOINT is read
    when huggingface_hub is imported, hence a fresh interpreter."""
    export = tmp_path / "export_hf"
    export.mkdir()
    (export / "config.json").write_text("{}")
    code = textwrap.dedent(f"""
        import logging, sys, time
        from swamla.hub import push_export
        from swamla.tokenizer import load_tokenizer

        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        for call in (lambda: load_tokenizer("someone/a-tokenizer"),
                     lambda: push_export({str(export)!r}, "me/tiny")):
            start = time.perf_counter()
            try:
                call()
            except Exception as e:
                print(f"{{time.perf_counter() - start:.1f}} {{type(e).__name__}}: {{e}}")
    """)
    env = dict(os.environ, SWAMLA_HUB_TIMEOUT="1", HF_TOKEN="hf_test_token_never_sent",
               HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout + proc.stderr[-3000:]
    waited = [float(line.split()[0]) for line in lines]
    assert all(s < 10 for s in waited), lines
    tokenizer, push = (line.split(" ", 1)[1] for line in lines)
    assert tokenizer.startswith(f"TokenizerError: tokenizer 'someone/a-tokenizer' from the hub: "
                                f"the Hugging Face hub at {stalled_hub.url} did not answer within "
                                "1 s (SWAMLA_HUB_TIMEOUT sets the wait); to work without the "
                                "hub, pass a local tokenizer directory")
    assert "HF_HUB_OFFLINE=1" in tokenizer and "'openai-community/gpt2' (bundled" in tokenizer
    assert push.startswith("TrainingError: could not push to the Hub repo 'me/tiny': creating "
                           f"the Hub repo 'me/tiny': the Hugging Face hub at {stalled_hub.url} "
                           "did not answer within 1 s")
    assert f"the local export at {export} is complete and can be pushed later" in push
    assert ("waiting up to 1 s for tokenizer 'someone/a-tokenizer' from the hub" in proc.stderr
            and "waiting up to 1 s for creating the Hub repo 'me/tiny'" in proc.stderr)
    assert len(stalled_hub.connections) >= 2  # both went to the stalled hub


# ------------------------------------------------------------------ a full disk at the end
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from swamla.data.synthetic import write_synthetic_shards

    return write_synthetic_shards(tmp_path_factory.mktemp("shards"), n_docs=200, seed=0)


def flags(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--size", "tiny", "--n_layer", "2", "--swa_layers_per_cycle", "1",
            "--mla_layers_per_cycle", "1", "--block_size", "32", "--swa_window", "8",
            "--source", "shards", "--train_paths", str(shards), "--batch_size", "2",
            "--max_iters", "2", "--warmup_iters", "1", "--log_interval", "1",
            "--eval_interval", "1000", "--eval_iters", "1", "--save_interval", "1000",
            "--compute_dtype", "float32", "--loss_chunk", "0", "--no-progress_bar",
            "--output_dir", str(out), *extra]


@pytest.fixture
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest on a shared CPU
    yield
    torch.set_num_threads(threads)


def test_a_full_disk_at_a_pytorch_checkpoint_is_one_line(shards, tmp_path, monkeypatch, capsys,
                                                         one_torch_thread):
    """The file system refuses large files from the second save on (the JAX trainer's case is in
    tests/test_jax_train.py): one line naming the step, the space and the intact checkpoint, from
    which the run then resumes."""
    import resource

    import swamla_torch.train as module
    from swamla.train_cli import main

    save, saves = module.save_checkpoint, []
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)

    def second_save_on_a_full_disk(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # until the run ends: the shards are written in the background
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))
        return save(*args, **kwargs)

    out, argv = tmp_path / "run", flags(shards, tmp_path / "run", "--max_iters", "3",
                                        "--save_interval", "1", "--no-export_portable")
    monkeypatch.setattr(module, "save_checkpoint", second_save_on_a_full_disk)
    try:
        assert main(argv, backend="torch") == 1
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    err = capsys.readouterr().err
    ckpts = out / "checkpoints"
    # torch.save, inside DCP, loses the OS's errno: its zip writer reports the short write
    assert err.count("\n") == 1 and re.fullmatch(
        rf"error: could not save the checkpoint of step 2 in {ckpts}: .* \(torch.save could not "
        rf"write a file: a full disk or a file-size limit\): it needs about [\d.]+ [KM]iB, "
        rf"[\d.]+ [MG]iB free there\..* The last good checkpoint, "
        rf"{ckpts / 'step_00000001'}, is intact: free space \(or point --output_dir elsewhere\) "
        r"and resume with --resume auto\n", err), err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001"]
    monkeypatch.setattr(module, "save_checkpoint", save)
    assert main(argv, backend="torch") == 0
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step_0000000{i}" for i in (1, 2, 3)]


EXPORT_WRITER = {"jax": "save_pretrained", "torch": "copy_portable"}


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_full_disk_at_the_final_export_is_one_line(shards, tmp_path, backend, monkeypatch,
                                                    capsys, one_torch_thread):
    """The last checkpoint is written, then the file system refuses large files: the export's
    write fails inside safetensors. One line naming the export, the space it needs and what to
    do; launching the run again resumes at its last step and writes the export."""
    import importlib
    import resource

    from swamla.portable import load_portable
    from swamla.train_cli import main

    module = importlib.import_module(f"swamla_{backend}.train")
    writer = getattr(module, EXPORT_WRITER[backend])
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)

    def write_on_a_full_disk(*args, **kwargs):
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))  # no file over 1 MiB
        try:
            return writer(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)

    out = tmp_path / "run"
    monkeypatch.setattr(module, EXPORT_WRITER[backend], write_on_a_full_disk)
    assert main(flags(shards, out), backend=backend) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    ckpts = out / "checkpoints"
    kept = ckpts / ("2" if backend == "jax" else "step_00000002")
    assert re.fullmatch(
        rf"error: could not write the portable export {out / 'export'}: File too large \(errno "
        rf"27\): it needs about [\d.]+ MiB, [\d.]+ [MG]iB free there\. The trained weights are "
        rf"safe in {kept}: free space, then launch the run again: it resumes at its last step, "
        rf"trains nothing and writes the end-of-run files \(or write the export elsewhere: "
        rf"swamla-convert {out} DST --to portable\)\n", err), err
    assert not (out / "export").exists()  # nothing partial left in its place
    monkeypatch.setattr(module, EXPORT_WRITER[backend], writer)
    assert main(flags(shards, out), backend=backend) == 0
    assert load_portable(out / "export")[0].n_layer == 2


# ------------------------------------------------------------------ resume checks that agree
@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """{backend: output_dir} of one 2-step run of each trainer, checkpoints at steps 1 and 2."""
    import torch

    from swamla.train_config import parse_args

    root, threads = tmp_path_factory.mktemp("runs"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for backend in ("jax", "torch"):
            module = __import__(f"swamla_{backend}.train", fromlist=["train"])
            module.train(parse_args(flags(shards, root / backend, "--save_interval", "1",
                                          "--no-export_portable")))
    finally:
        torch.set_num_threads(threads)
    return {"jax": root / "jax", "torch": root / "torch"}


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_resume_that_would_change_the_run_is_refused_by_both(shards, runs, backend, capsys):
    """Another bf16_moments, or a max_iters below the checkpoint's step: exit status 2, one line
    naming the value to resume with, and the run's files as they were."""
    from swamla.train_cli import main

    out = runs[backend]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra, message in (
            (["--bf16_moments", "--max_iters", "4"], r"holds the optimizer state of "
             r"bf16_moments=False, this run has True\. Resume with --bf16_moments false"),
            (["--max_iters", "1"], r"is at step 2, past max_iters 1: resume with --max_iters 2 "
             r"or more")):
        assert main(flags(shards, out, "--no-export_portable", *extra), backend=backend) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err), err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_resume_takes_the_same_forms_in_both_trainers(shards, runs, backend, tmp_path,
                                                      one_torch_thread):
    """--resume PATH: a training state, or an earlier run's output_dir or checkpoints/ folder
    (its newest state), in either trainer; a JAX run's Orbax checkpoints are refused by both
    with the export that makes a training state of them."""
    import importlib

    from swamla.config import ConfigError
    from swamla.metrics import read_metrics
    from swamla.train_config import parse_args

    train = importlib.import_module(f"swamla_{backend}.train").train
    out = tmp_path / "moved"
    result = train(parse_args(flags(shards, out, "--max_iters", "3", "--no-export_portable",
                                    "--resume", str(runs["torch"]))))
    assert result["step"] == 3
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [3]
    jax_run = runs["jax"]
    for form in (jax_run, jax_run / "checkpoints", jax_run / "checkpoints" / "2"):
        with pytest.raises(ConfigError, match=rf"resume='{form}' is a JAX run's Orbax checkpoint, "
                           rf"not a training state: export one with python -m swamla.train_state "
                           rf"export-jax {jax_run} STATE, then --resume STATE"):
            train(parse_args(flags(shards, tmp_path / "refused", "--resume", str(form))))
    with pytest.raises(ConfigError, match=r"is neither a training state .* nor a run's "
                       "output_dir holding such checkpoints"):
        train(parse_args(flags(shards, tmp_path / "refused", "--resume", str(tmp_path))))
    assert not (tmp_path / "refused").exists()

    from swamla.train_config import resume_source  # what both trainers resolve PATH with

    torch_ckpts = runs["torch"] / "checkpoints"
    for form in (runs["torch"], torch_ckpts, torch_ckpts / "step_00000002"):
        assert resume_source(str(form)) == torch_ckpts / "step_00000002"
    # a mid-run PyTorch checkpoint is sharded: the PyTorch trainer resumes it, JAX names the export
    from swamla_torch.checkpoint import is_checkpoint

    sharded = torch_ckpts / "step_00000001"
    assert resume_source(str(sharded), accepts=is_checkpoint) == sharded
    with pytest.raises(ConfigError, match=rf"is a sharded PyTorch checkpoint, which only the "
                       rf"PyTorch trainer reads: make a training state of it with python -m "
                       rf"swamla.train_state export-torch {sharded} STATE"):
        resume_source(str(sharded))
