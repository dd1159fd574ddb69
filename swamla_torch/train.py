"""The PyTorch trainer: ``train(cfg)`` on one device or under ``torchrun`` (DDP or FSDP2).

    python train_torch.py --size tiny --source files --train_paths data/*.jsonl --max_iters 200
    torchrun --nproc_per_node=8 train_torch.py --size base --compile [--fsdp]

It shares with the JAX trainer the config and command line (``swamla.train_config``), the data
(``swamla.data``), the schedule (``swamla.schedule.lr_at``), the optimizer definitions (optax's;
``swamla_torch.optim``), the metrics, logs and plots (``swamla.metrics``) and the checkpoint format
(``swamla.train_state``), so a run moves between frameworks with ``--resume DIR``.

One optimizer step: ``gradient_accumulation_steps`` micro-batches (loss / k each; gradients
all-reduced on the last only), the global gradient norm, a skip if the loss or norm is not finite
(``max_bad_steps`` in a row stop the run), clipping, ``lr_at(step - skipped_steps)``, the update.
``step`` counts iterations done, skipped ones included, and the metrics logged are those of the
JAX trainer (``swamla.metrics`` defines both).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from swamla.config import check_token_ids
from swamla.layout import count_params
from swamla.data import DataError, build_loader, merge_states
from swamla.data.packing import document_targets
from swamla.flops import mfu, peak_flops
from swamla.hub import check_run_export, wants_hf_export
from swamla.metrics import (PLOT_FILE, MetricsLogger, ProgressBar, check_logging_packages,
                            eval_metrics, plot_metrics, run_result, skipped_step_message,
                            too_many_skipped_message, train_metrics)
from swamla.plan import resolve_plan
from swamla.portable import (CheckpointError, copy_portable, load_portable,
                             remove_stale_temporaries)
from swamla.schedule import lr_at, warn_short_run
from swamla.signals import StopSignal
from swamla.train_config import (TrainConfig, TrainingError, check_device, check_output_dir,
                                 check_resume_target, check_resumed_state, end_of_run_write,
                                 resume_source, save_failed)
from swamla.train_state import is_train_state, load_train_state, save_train_state
from swamla_torch import distributed
from swamla_torch.checkpoint import (CHECKPOINT_DIR, Saves, checkpoint_dir, is_checkpoint,
                                     is_sharded_checkpoint,
                                     latest_checkpoint, load_checkpoint, restore, save_checkpoint,
                                     set_rng_state, to_train_state)
from swamla_torch.distributed import DistEnv, Parallel, all_reduce_sum
from swamla_torch.model import SWAMLA
from swamla_torch.optim import build_optimizer, clip_grads_, global_grad_norm

log = logging.getLogger(__name__)

EXPORT_DIR = "export"


def export_train_state(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the portable training state of a PyTorch checkpoint (its RNG states dropped); a
    sharded one is read and written one tensor at a time."""
    if is_sharded_checkpoint(checkpoint):
        return to_train_state(checkpoint, out, with_rng=False)
    cfg, params, moments, meta = load_train_state(checkpoint)
    return save_train_state(out, cfg, params, moments, meta)


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint or training state to continue from, per ``cfg.resume``."""
    latest = latest_checkpoint(cfg.output_dir)
    check_resume_target(cfg.resume, latest, cfg.output_dir)
    if cfg.resume in ("none", "auto"):
        return latest if cfg.resume == "auto" else None
    return resume_source(cfg.resume, accepts=is_checkpoint)


def train(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns ``swamla.metrics.run_result``: the step reached, the last
    training and evaluation records, the paths written."""
    env = distributed.setup()
    try:
        with StopSignal() as stop:
            return _Run(cfg, env, stop).run()
    finally:
        distributed.teardown(env)


def _compute_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float32


def build_model(cfg: TrainConfig, device: torch.device) -> SWAMLA:
    """The model as training runs it (on the CPU, not yet wrapped), its compute plan (``.plan``:
    attention kernel, FP8, recomputation, loss chunk) resolved for ``device``: one place, shared
    with ``benchmarks/bench_train.py``. Raises ConfigError for choices this device cannot run."""
    plan = resolve_plan("torch", on_gpu=device.type == "cuda", compute_dtype=cfg.compute_dtype,
                        attention_impl=cfg.attention_impl, mlp_impl=cfg.mlp_impl,
                        fp8=cfg.use_fp8, remat_policy=cfg.remat_policy,
                        loss_chunk=cfg.loss_chunk, dropout=cfg.model.dropout)
    raw = SWAMLA(cfg.model, plan)
    raw.check_inputs = False  # batches are checked on the host (_batch): no device sync
    return raw


class _Run:
    """One training run's state; ``run()`` is the loop."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, stop: StopSignal):
        self.cfg, self.env, self.stop = cfg, env, stop
        self.out = Path(cfg.output_dir)
        fallback = check_device(cfg, backend="torch", on_gpu=env.device.type == "cuda",
                                gpu_build=torch.version.cuda is not None)
        if env.is_main:
            check_output_dir(cfg.output_dir)
            check_logging_packages(cfg)
            check_run_export(cfg)
            warn_short_run(cfg)
            if fallback:
                log.warning(fallback)
        resume_path = resolve_resume(cfg)
        self.resume = load_checkpoint(resume_path) if resume_path is not None else None
        self.step = self.resume.step if self.resume else 0
        self.bad_total = self.resume.meta["bad_steps"] if self.resume else 0

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        raw = build_model(cfg, env.device)
        self.attention_impl = raw.plan.attention_impl
        compute_dtype = _compute_dtype(cfg)
        if self.resume:
            self._check_resume(self.resume)
        self.par: Parallel = distributed.parallelize(raw.to(env.device), cfg, env)
        self.params = [p for p in raw.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(raw.named_parameters(), cfg, env.device)
        self.saves = Saves(env, cfg)
        if self.resume:
            restore(self.resume, raw, self.optimizer, cfg, self.saves)
        rng = self.resume.rng if self.resume else None
        if rng is not None and len(rng) == env.world_size:
            set_rng_state(rng[env.rank], env.device)
        else:  # dropout streams differ per rank
            torch.manual_seed(cfg.seed + env.rank)
        self.autocast = torch.autocast(env.device.type, dtype=compute_dtype,
                                       enabled=cfg.compute_dtype == "bfloat16")
        self.loader = self._loader("train")
        if self.resume and self.resume.meta["data_state"] is not None:
            self.loader.load_state_dict(self.resume.meta["data_state"])
        self.val_loader = self._loader("val")
        self._batch(self.val_loader)  # an empty validation split fails now, not at the first
        # evaluation (each evaluation starts the stream over)
        self.n_params = count_params(cfg.model)
        peak = peak_flops(env.device_name, "bf16")
        self.peak = peak * env.world_size if peak else None

    def _check_resume(self, resume) -> None:
        saved = resume.meta["train_config"] if self.cfg.resume == "auto" else None  # this run's
        check_resumed_state(self.cfg, str(resume.path), model=resume.model_config,
                            optimizer_type=resume.meta["optimizer_type"], step=resume.step,
                            params=resume.shapes, bf16_moments=None if saved is None else
                            saved.get("bf16_moments", TrainConfig.bf16_moments))

    def _loader(self, split: str):
        env, cfg = self.env, self.cfg
        return build_loader(cfg.data, split, batch_size=cfg.batch_size,
                            block_size=cfg.model.block_size, seed=cfg.seed,
                            process_index=env.rank, process_count=env.world_size)

    def _say(self, msg: str) -> None:
        if self.env.is_main:
            tqdm.write(msg)

    # ------------------------------------------------------------------ one step
    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a.astype(np.int64))
        if self.env.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.env.device, non_blocking=True)

    def _batch(self, loader):
        batch = next(loader)
        try:  # on the host, so the model need not sync the device (model.check_inputs)
            check_token_ids(batch.inputs, self.cfg.model.vocab_size)
            check_token_ids(batch.targets, self.cfg.model.vocab_size)
        except ValueError as e:
            raise DataError(f"{loader.split} batch after step {self.step}: {e}") from e
        if not self.cfg.doc_mask:
            return self._to_device(batch.inputs), self._to_device(batch.targets), None
        # SPEC 3.3: no target across a document boundary; attention kept within documents.
        targets = document_targets(batch.inputs, batch.targets, loader.eos_id)
        return (self._to_device(batch.inputs), self._to_device(targets),
                self._to_device(batch.segment_ids))

    def _train_step(self) -> tuple[float, float, bool]:
        """Forward/backward over the micro-batches, then the update unless non-finite.
        Returns (mean loss over the global batch, pre-clip grad norm, whether any rank was
        asked to stop)."""
        k = self.cfg.gradient_accumulation_steps
        loss_sum = torch.zeros((), device=self.env.device)
        for i in range(k):
            x, y, segments = self._batch(self.loader)
            with self.par.grad_sync(i == k - 1), self.autocast:
                _, loss = self.par.model(x, y, segments)
                (loss / k).backward()
            loss_sum += loss.detach()
        norm = global_grad_norm(self.params, sharded=self.par.fsdp)
        # One collective and one host sync per step: the loss and every rank's stop request.
        stats = all_reduce_sum(torch.stack([loss_sum / k, torch.tensor(
            float(self.stop.should_stop), device=self.env.device)]), self.env)
        loss, stop_votes, norm = torch.cat([stats, norm.reshape(1)]).tolist()
        loss /= self.env.world_size
        if math.isfinite(loss) and math.isfinite(norm):
            clip_grads_(self.params, norm, self.cfg.grad_clip)
            lr = lr_at(self.step - self.bad_total, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm, stop_votes > 0

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over ``eval_iters`` validation batches (the same batches every time)."""
        self.val_loader.reset()
        self.par.model.eval()
        total = torch.zeros((), device=self.env.device)
        for _ in range(self.cfg.eval_iters):
            x, y, segments = self._batch(self.val_loader)
            with self.autocast:
                total += self.par.model(x, y, segments)[1].float()
        self.par.model.train()
        loss = all_reduce_sum(total, self.env).item() / (self.cfg.eval_iters * self.env.world_size)
        return eval_metrics(loss)

    def save(self) -> Path:
        """Start the sharded save of this step (the previous one completed first); it is
        written in the background and completed by ``poll_saves`` or ``wait_saves``."""
        self.wait_saves()
        states = distributed.all_gather_objects(self.loader.state_dict(), self.env)
        try:
            path = save_checkpoint(checkpoint_dir(self.out, self.step), env=self.env,
                                   raw=self.par.raw, optimizer=self.optimizer, cfg=self.cfg,
                                   step=self.step, bad_steps=self.bad_total,
                                   data_state=merge_states(states), saves=self.saves)
        except (OSError, CheckpointError) as e:  # e.g. a full disk; the partial save is removed
            raise save_failed(self.step, e, latest_checkpoint(self.out),
                              directory=checkpoint_dir(self.out, self.step).parent) from e
        return path

    def poll_saves(self) -> None:
        self._saved(self.saves.poll)

    def wait_saves(self) -> None:
        self._saved(self.saves.wait)

    def _saved(self, complete) -> None:
        step = self.saves.pending_step
        try:
            path = complete()
        except (OSError, CheckpointError) as e:  # the partial save is removed
            raise save_failed(step, e, latest_checkpoint(self.out),
                              directory=self.out / CHECKPOINT_DIR) from e
        if path is not None:
            self._say(f"saved checkpoint {path}")

    def finish(self) -> Path | None:
        """The run's final checkpoint (step max_iters) as a portable training state, converted
        by the main process one tensor at a time; the other ranks are done."""
        final = checkpoint_dir(self.out, self.step)
        if not self.env.is_main:
            return None
        if not is_checkpoint(final) and self.resume and self.resume.step == self.step:
            if is_train_state(self.resume.path):  # imported at max_iters: nothing trained
                return self.resume.path
            source = self.resume.path
        else:
            source = final
        if is_sharded_checkpoint(source):
            try:
                to_train_state(source, final, with_rng=True)
            except (OSError, CheckpointError) as e:  # the sharded checkpoint is kept
                raise save_failed(self.step, e, final, directory=final.parent) from e
            self._say(f"wrote the portable training state {final}")
        return final

    def export(self, final: Path) -> tuple[Path | None, Path | None]:
        """The end-of-run exports asked for, read by the main process from the portable final
        checkpoint: (portable checkpoint, transformers export), None where not."""
        portable = hf = None
        kept, weights = latest_checkpoint(self.out), 4 * self.n_params  # float32 exports
        if self.cfg.export_portable:
            with end_of_run_write("portable export", self.out / EXPORT_DIR, self.cfg, kept,
                                  needed_bytes=weights):
                portable = copy_portable(final, self.out / EXPORT_DIR)
            self._say(f"exported portable checkpoint {portable}")
        if wants_hf_export(self.cfg):
            from swamla.hub import EXPORT_HF_DIR
            from swamla_torch.hf.export import export_run  # imports transformers

            with end_of_run_write("transformers export", self.out / EXPORT_HF_DIR, self.cfg, kept,
                                  needed_bytes=weights):
                hf = export_run(self.cfg, load_portable(final)[1], self.out)
            self._say(f"wrote the transformers export {hf}")
        return portable, hf

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save_to_run(self.out)
            for parent in (checkpoint_dir(self.out, 0).parent, self.out):  # a kill mid-save's
                for path in remove_stale_temporaries(parent):
                    self._say(f"removed {path}, left by a save that was killed")
        self._say(cfg.describe(env.world_size))
        self._say(f"device: {env.device_name} x {env.world_size}"
                  + (" (FSDP2)" if self.par.fsdp else " (DDP)" if self.par.ddp else "")
                  + f", attention {self.attention_impl}")
        if cfg.fsdp and not self.par.fsdp:
            self._say("fsdp: one process, nothing to shard; training unsharded")
        if self.resume:
            self._say(f"resumed from {self.resume.path} at step {self.step} (written by "
                      f"{self.resume.meta['framework']})")
        tokens_per_step = cfg.tokens_per_step(env.world_size)
        last: dict = {}  # the newest training record
        last_eval: dict = {}
        checkpoint = export = export_hf = plot = None
        stopped_early, in_a_row, last_saved = False, 0, (self.step if self.resume else None)
        # applied steps' losses, steps done and clock since the last record; the last grad norm
        window = {"losses": [], "steps": 0, "t": time.perf_counter(), "norm": float("nan")}
        logger = MetricsLogger.from_config(cfg, resume_step=self.step if self.resume else None,
                                           is_main=env.is_main)
        bar = ProgressBar(cfg.max_iters, self.step, enabled=cfg.progress_bar,
                          is_main=env.is_main)
        try:
            while self.step < cfg.max_iters:
                loss, norm, stop = self._train_step()
                self.step += 1
                self.poll_saves()
                window["steps"] += 1
                window["norm"] = norm
                if math.isfinite(loss) and math.isfinite(norm):
                    in_a_row = 0
                    window["losses"].append(loss)
                else:
                    in_a_row += 1
                    self.bad_total += 1
                    self._say(skipped_step_message(self.step, loss, norm, in_a_row,
                                                   self.bad_total, cfg.max_bad_steps))
                    if in_a_row >= cfg.max_bad_steps:
                        self.wait_saves()  # the checkpoint named is complete
                        raise TrainingError(too_many_skipped_message(
                            in_a_row, cfg.max_bad_steps, self.step, latest_checkpoint(self.out)))
                bar.update(1, {"loss": loss})
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                    last = self._window_metrics(window, tokens_per_step)
                    logger.log(self.step, {**last, **self.loader.token_metrics()})
                # saved before evaluating: a failing evaluation loses nothing
                if self.step % cfg.save_interval == 0 or self.step == cfg.max_iters:
                    checkpoint, last_saved = self.save(), self.step
                    window["t"] = time.perf_counter()
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                    last_eval = self.evaluate()
                    logger.log(self.step, last_eval)
                    window["t"] = time.perf_counter()  # eval time is not training time
                if stop:
                    self._say(f"stop requested at step {self.step}: saving and exiting")
                    if last_saved != self.step:
                        checkpoint = self.save()
                    stopped_early = True
                    break
            if not stopped_early:
                if last_saved != self.step:  # resumed at max_iters: nothing new to save
                    checkpoint = self.save()
            self.wait_saves()
        finally:
            bar.close()
            logger.close()
            self.loader.close()
            if self.val_loader is not None:
                self.val_loader.close()
        if env.is_main and logger.path.is_file():
            try:
                with end_of_run_write("loss plot", self.out / PLOT_FILE, cfg, checkpoint):
                    plot = plot_metrics(logger.path, self.out / PLOT_FILE)
            except ValueError as e:  # no loss recorded yet (e.g. resumed at max_iters)
                self._say(f"no plot: {e}")
        final = None if stopped_early else self.finish()
        # after the plot: a push that fails (TrainingError) leaves every local file written
        if final is not None and (cfg.export_portable or wants_hf_export(cfg)):
            export, export_hf = self.export(final)
        return run_result(step=self.step, skipped_steps=self.bad_total, train=last,
                          evaluation=last_eval, stopped_early=stopped_early,
                          checkpoint=checkpoint, export=export, export_hf=export_hf,
                          plot=plot)

    def _window_metrics(self, window: dict, tokens_per_step: int) -> dict:
        """The training record of the steps in ``window``, which then starts over."""
        now = time.perf_counter()
        tokens_per_s = window["steps"] * tokens_per_step / max(now - window["t"], 1e-9)
        losses = window["losses"]
        metrics = train_metrics(
            loss=sum(losses) / len(losses) if losses else None,
            lr=lr_at(max(self.step - self.bad_total - 1, 0), self.cfg),
            grad_norm=window["norm"], tokens_per_s=tokens_per_s,
            mfu=mfu(self.n_params, tokens_per_s, self.peak),
            peak_memory_bytes=(torch.cuda.max_memory_allocated(self.env.device)
                               if self.env.device.type == "cuda" else None),
            skipped_steps=self.bad_total)
        window.update(losses=[], steps=0, t=now)
        return metrics

