"""The JAX trainer: SWA-MLA on one GPU, a multi-GPU host or many hosts, through jax.sharding.

``train(cfg)`` runs a whole job from a TrainConfig (``train_jax.py`` only parses flags). One
jitted step with buffer donation does gradient accumulation as a scan, global-norm clipping,
AdamW or Lion, and skips non-finite updates. Parameters, gradients and optimizer state are laid
out on a (data, fsdp, tensor) mesh by ``swamla_jax.sharding``'s rules table; each process feeds
its own rows of the global batch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils

from swamla.config import ConfigError, ModelConfig, check_token_ids
from swamla.layout import count_params
from swamla.data import DataError, build_loader, merge_states
from swamla.data.packing import document_targets
from swamla.flops import mfu, peak_flops
from swamla.hub import check_run_export, wants_hf_export
from swamla.metrics import (PLOT_FILE, MetricsLogger, ProgressBar, check_logging_packages,
                            eval_metrics, plot_metrics, run_result, skipped_step_message,
                            too_many_skipped_message, train_metrics)
from swamla.plan import resolve_plan
from swamla.portable import remove_stale_temporaries
from swamla.schedule import lr_at, warn_short_run
from swamla.signals import StopSignal
from swamla.train_config import (TrainConfig, TrainingError, check_device, check_output_dir,
                                 check_resume_target, check_resumed_state, end_of_run_write,
                                 resume_source)
from swamla.train_state import load_train_state, save_train_state
from swamla_jax import sharding
from swamla_jax.checkpoint import Checkpointer, abstract_with_shardings
from swamla_jax.convert import (Model, from_portable_tensors, init_params, save_pretrained,
                                to_portable_tensors)
from swamla_jax.model import SWAMLA
from swamla_jax.optim import build_optimizer, moments_of, with_moments

log = logging.getLogger("swamla_jax.train")


class NonFiniteError(TrainingError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@struct.dataclass
class TrainState:
    step: jax.Array  # iterations done, skipped ones included (swamla.metrics)
    params: Any
    opt_state: Any
    rng: jax.Array  # raw key data, so Orbax stores it as plain uint32
    bad_steps: jax.Array  # consecutive non-finite steps


def _shard_like_params(tree, param_shardings, mesh):
    """Shardings for an optimizer-state tree: a leaf whose dict path is a parameter's gets that
    parameter's sharding (moments mirror params); anything else is replicated."""
    by_path = {tuple(k.key for k in path): sh
               for path, sh in jax.tree_util.tree_leaves_with_path(param_shardings)}

    def pick(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        sh = by_path.get(keys)
        return sh if sh is not None and len(leaf.shape) == len(sh.spec) else sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


class Trainer:
    """Everything compiled for one (config, mesh): module, optimizer, shardings, step functions."""

    def __init__(self, cfg: TrainConfig, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.plan = resolve_plan(
            "jax", on_gpu=jax.default_backend() == "gpu", compute_dtype=cfg.compute_dtype,
            attention_impl=cfg.attention_impl, mlp_impl=cfg.mlp_impl, fp8=cfg.use_fp8,
            fuse_projections=cfg.fuse_projections, remat_policy=cfg.remat_policy,
            scan_layers=cfg.scan_layers, loss_chunk=cfg.loss_chunk, dropout=cfg.model.dropout,
            tensor_parallel=mesh.shape["tensor"] > 1)
        self.module = SWAMLA(cfg.model, self.plan)
        boxed = jax.eval_shape(lambda: init_params(self.module, cfg.seed))
        self.param_shardings = sharding.param_shardings(boxed, mesh)
        self.param_shapes = sharding.unbox_values(boxed)
        self.tx = build_optimizer(cfg, self.param_shapes)
        shapes = jax.eval_shape(self._fresh_state)
        self.state_shardings = TrainState(
            step=sharding.replicated(mesh), params=self.param_shardings,
            opt_state=_shard_like_params(shapes.opt_state, self.param_shardings, mesh),
            rng=sharding.replicated(mesh), bad_steps=sharding.replicated(mesh))
        self.state_shapes = shapes
        self.batch_sharding = sharding.batch_sharding(mesh, leading=1)
        self.init_state = jax.jit(self._fresh_state, out_shardings=self.state_shardings)
        self.train_step = jax.jit(self._train_step, donate_argnums=0,
                                  in_shardings=(self.state_shardings, self.batch_sharding),
                                  out_shardings=(self.state_shardings, None))
        self.eval_step = jax.jit(self._eval_loss, in_shardings=(self.param_shardings,
                                                                 self.batch_sharding))

    def abstract_state(self):
        return abstract_with_shardings(self.state_shapes, self.state_shardings)

    def _fresh_state(self):
        params = nn.meta.unbox(init_params(self.module, self.cfg.seed))
        return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                          opt_state=self.tx.init(params),
                          rng=jax.random.key_data(jax.random.key(self.cfg.seed + 1)),
                          bad_steps=jnp.zeros([], jnp.int32))

    def _loss(self, params, batch, rng, train: bool):
        """Mean loss of one micro-batch (inputs, targets[, segment_ids]), each (B, T)."""
        inputs, targets, *segments = batch
        return self.module.apply({"params": params}, inputs, targets,
                                 segment_ids=segments[0] if segments else None,
                                 deterministic=not train, rngs={"dropout": rng})[1]

    def _train_step(self, state: TrainState, batch):
        """One optimizer step over ``batch`` = (inputs, targets[, segment_ids]), each
        (k, B, T)."""
        k = batch[0].shape[0]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(self._loss)

        def micro(carry, xs):  # gradient accumulation: sum over micro-batches inside the step
            grads, loss = carry
            i, micro_batch = xs
            loss_i, g = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, i), True)
            return (jax.tree_util.tree_map(jnp.add, grads, g), loss + loss_i), None

        if k == 1:  # no accumulation buffer: a whole float32 copy of the parameters saved
            loss, grads = grad_fn(state.params, tuple(x[0] for x in batch),
                                  jax.random.fold_in(rng, 0), True)
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros([], jnp.float32)),
                                            (jnp.arange(k), batch))
            grads = jax.tree_util.tree_map(lambda g: g / k, grads)
            loss = loss / k
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(params, opt_state):
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A bad step is skipped whole. A cond rather than a select of new against old: the
        # select would be one more pass over every parameter and moment each step.
        params, opt_state = jax.lax.cond(ok, apply, lambda p, o: (p, o), state.params,
                                         state.opt_state)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            bad_steps=jnp.where(ok, 0, state.bad_steps + 1))
        return new_state, {"loss": loss, "grad_norm": grad_norm, "ok": ok,
                           "bad_steps": new_state.bad_steps}

    def _eval_loss(self, params, batch):
        return self._loss(params, tuple(x[0] for x in batch), jax.random.key(0), False)


# ------------------------------------------------------------------------------------- the run
def _process_rows(cfg: TrainConfig, mesh) -> int:
    """Rows of each micro-batch this process loads: its share of batch_size * data-parallel."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = cfg.batch_size * dp
    if rows % jax.process_count():
        raise ConfigError(f"batch_size * data-parallel devices = {rows} must be divisible by the "
                          f"{jax.process_count()} processes")
    return rows // jax.process_count()


def _next_batch(loader, k: int, vocab_size: int, documents: bool = False):
    """k micro-batches stacked as (k, B, T) int32, token ids checked on the host: (inputs,
    targets), and with ``documents`` (``--doc_mask``) the segment ids, the targets that cross
    into the next document then -100 (SPEC 3.3)."""
    batches = [next(loader) for _ in range(k)]
    inputs = np.stack([b.inputs for b in batches])
    targets = np.stack([b.targets for b in batches])
    try:
        check_token_ids(inputs, vocab_size)
        check_token_ids(targets, vocab_size)
    except ValueError as e:
        raise DataError(f"{loader.split} batch: {e}") from e
    if not documents:
        return inputs, targets
    return (inputs, document_targets(inputs, targets, loader.eos_id),
            np.stack([b.segment_ids for b in batches]))


def _to_global(trainer: Trainer, local):
    return tuple(jax.make_array_from_process_local_data(trainer.batch_sharding, x) for x in local)


def _gather_data_state(loader) -> dict:
    """The loader position of every process merged into one state (text sources keep per-row
    positions per process; shards are global already, and merging is then the identity)."""
    state = loader.state_dict()
    if jax.process_count() == 1:
        return state
    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([blob.size]))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:blob.size] = blob
    every = multihost_utils.process_allgather(padded)
    states = [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(every, lengths.ravel())]
    return merge_states(states)


def _peak_memory_bytes() -> int | None:
    """Peak bytes in use on this process's first device since it started (None on CPU)."""
    return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


class _StopVote:
    """Whether any process was asked to stop (SIGTERM, SIGINT), the same answer on every process.

    One process reads its own flag. Several OR their flags on the devices, laid out like a token
    batch: each call queues a vote behind the step just queued and returns the vote queued one
    call earlier, so reading it waits only for the step before, never idling the device as a
    blocking all-gather per step would.
    """

    def __init__(self, stop: StopSignal, trainer: Trainer, rows: int):
        self.stop, self.rows, self.queued = stop, rows, None
        self.flags = trainer.batch_sharding
        self.any = jax.jit(jnp.any, out_shardings=sharding.replicated(trainer.mesh))

    def __call__(self) -> bool:
        """Called once after queuing each step: stop after this step?"""
        if jax.process_count() == 1:
            return self.stop.should_stop
        decided = self.queued is not None and bool(self.queued.addressable_data(0))
        local = np.full((1, self.rows, 1), self.stop.should_stop)
        self.queued = self.any(jax.make_array_from_process_local_data(self.flags, local))
        return decided


def evaluate(trainer: Trainer, params, loader, iters: int, vocab_size: int) -> dict[str, float]:
    """Mean validation loss over ``iters`` batches from the start of the validation stream."""
    loader.reset()
    batches = (_next_batch(loader, 1, vocab_size, trainer.cfg.doc_mask) for _ in range(iters))
    losses = [trainer.eval_step(params, _to_global(trainer, batch)) for batch in batches]
    return eval_metrics(float(np.mean(jax.device_get(losses))))


def _resolve_resume(cfg: TrainConfig, ckpt: Checkpointer) -> int | Path | None:
    """A step of this run's checkpoints, a portable training state to import, or None."""
    latest = ckpt.latest_step()
    check_resume_target(cfg.resume, None if latest is None else f"step {latest}", ckpt.directory)
    if cfg.resume in ("none", "auto"):
        return latest if cfg.resume == "auto" else None
    return resume_source(cfg.resume)


def _start(trainer: Trainer, ckpt: Checkpointer, train_loader, val_loader):
    """(resumed from, state, step, skipped steps) of a run about to start, every check done:
    the resume target, the model and optimizer state it was saved with, the data."""
    cfg = trainer.cfg
    start = _resolve_resume(cfg, ckpt)
    if isinstance(start, int):
        _check_same_run(ckpt.restore_meta(start), cfg, ckpt.directory / str(start))
    # An empty validation split fails now, not at the first evaluation (which starts the
    # stream over, so this batch is not lost).
    _next_batch(val_loader, 1, cfg.model.vocab_size)
    if start is None:
        return None, trainer.init_state(), 0, 0
    if isinstance(start, Path):
        state, meta = import_train_state(trainer, start)
        if meta["data_state"] is not None:
            train_loader.load_state_dict(meta["data_state"])
        log.info("imported %s training state %s at step %d", meta["framework"], start,
                 meta["step"])
        return start, state, int(meta["step"]), int(meta["bad_steps"])
    state, meta = ckpt.restore(start, trainer.abstract_state())
    train_loader.load_state_dict(meta["data_state"])
    log.info("resumed from %s at step %d", ckpt.directory / str(start), meta["step"])
    return start, state, int(meta["step"]), int(meta["skipped_total"])


def _check_same_run(meta: Mapping[str, Any], cfg: TrainConfig, where: Path) -> None:
    """The checks of ``check_resumed_state`` for a run continuing its own checkpoints (Orbax
    restores a tree of the saved structure: the optimizer and its moments' dtype stay)."""
    saved = meta["train_config"]
    check_resumed_state(cfg, str(where), model=ModelConfig.from_dict(saved["model"],
                                                                     source=str(where)),
                        optimizer_type=saved.get("optimizer_type", TrainConfig.optimizer_type),
                        step=int(meta["step"]),
                        bf16_moments=saved.get("bf16_moments", TrainConfig.bf16_moments))


def import_train_state(trainer: Trainer, path: Path):
    """A TrainState (and its meta) from a portable training state written by either trainer."""
    cfg = trainer.cfg
    model_cfg, params, moments, meta = load_train_state(path)
    check_resumed_state(cfg, str(path), model=model_cfg, optimizer_type=meta["optimizer_type"],
                        step=meta["step"], params=params)
    as_tree = lambda tensors: from_portable_tensors(  # noqa: E731
        cfg.model, tensors, trainer.param_shapes)
    tree = as_tree(params)
    mu = as_tree({k: moments[f"{k}.exp_avg"] for k in params})
    nu = (as_tree({k: moments[f"{k}.exp_avg_sq"] for k in params})
          if cfg.optimizer_type == "adamw" else None)
    if cfg.bf16_moments:
        cast = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), t)  # noqa: E731
        mu, nu = cast(mu), None if nu is None else cast(nu)
    step, updates = int(meta["step"]), int(meta["step"]) - int(meta["bad_steps"])

    def build(tree, mu, nu):
        state = trainer._fresh_state()
        opt_state = with_moments(state.opt_state, mu, nu, jnp.asarray(updates, jnp.int32))
        return state.replace(step=jnp.asarray(step, jnp.int32), params=tree, opt_state=opt_state)

    state = jax.jit(build, out_shardings=trainer.state_shardings)(tree, mu, nu)
    return state, meta


def restore_latest(run_dir: str | Path):
    """(TrainConfig, TrainState on one device, meta) of the newest checkpoint of a JAX run."""
    if not (Path(run_dir) / "train_config.json").is_file():
        raise ConfigError(f"{run_dir} is not a JAX run directory (no train_config.json)")
    cfg = TrainConfig.load(Path(run_dir) / "train_config.json")
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        trainer = Trainer(cfg, mesh)
        ckpt = Checkpointer(run_dir, cfg.keep_checkpoints, async_save=False)
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"{ckpt.directory} holds no checkpoint")
        state, meta = ckpt.restore(step, trainer.abstract_state())
        ckpt.close()
    return cfg, state, meta


def export_train_state(src: str | Path, dst: str | Path) -> Path:
    """Write the latest checkpoint of the JAX run in ``src`` as a portable training state."""
    cfg, state, meta = restore_latest(src)
    mu, nu, _ = moments_of(state.opt_state)
    tensors = lambda tree: to_portable_tensors(cfg.model, tree)  # noqa: E731
    moments = {f"{k}.exp_avg": v for k, v in tensors(mu).items()}
    if nu is not None:
        moments.update({f"{k}.exp_avg_sq": v for k, v in tensors(nu).items()})
    return save_train_state(dst, cfg.model, tensors(state.params), moments, {
        "format": "swamla-train-state", "version": 1, "step": int(meta["step"]),
        "optimizer_type": cfg.optimizer_type, "train_config": cfg.to_dict(),
        "data_state": meta["data_state"], "bad_steps": int(meta["skipped_total"]),
        "framework": "jax"})


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a whole training job; returns ``swamla.metrics.run_result``: the step reached, the
    last training and evaluation records, the paths written."""
    sharding.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    fallback = check_device(cfg, backend="jax", on_gpu=jax.default_backend() == "gpu",
                            gpu_build=_is_cuda_build())
    if jax.process_index() == 0:
        check_output_dir(cfg.output_dir)
        check_logging_packages(cfg)
        check_run_export(cfg)
        warn_short_run(cfg)
        if fallback:
            log.warning(fallback)
    if cfg.use_fp8 and jax.default_backend() != "gpu":
        log.warning("use_fp8 on %s: FP8 numerics are emulated (no FP8 GEMMs without an H100/H200)",
                    jax.default_backend())
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(cfg.mesh_shape(jax.device_count()))
    out = Path(cfg.output_dir)
    rows = _process_rows(cfg, mesh)
    T, k, vocab = cfg.model.block_size, cfg.gradient_accumulation_steps, cfg.model.vocab_size
    loader_kw = dict(batch_size=rows, block_size=T, seed=cfg.seed,
                     process_index=jax.process_index(), process_count=jax.process_count())

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        trainer = Trainer(cfg, mesh)
        train_loader = build_loader(cfg.data, "train", **loader_kw)
        val_loader = build_loader(cfg.data, "val", **loader_kw)
        ckpt = Checkpointer(out, cfg.keep_checkpoints)
        try:
            start, state, step, skipped_total = _start(trainer, ckpt, train_loader, val_loader)
        except BaseException:
            for closable in (ckpt, train_loader, val_loader):
                closable.close()
            raise
        if is_main:  # only now: a run that cannot start leaves the run directory as it was
            out.mkdir(parents=True, exist_ok=True)
            cfg.save_to_run(out)
            for path in remove_stale_temporaries(out):  # of an export killed mid-save
                log.info("removed %s, left by a save that was killed", path)

        n_params = count_params(cfg.model)
        tokens_per_step = rows * jax.process_count() * k * T
        peak = peak_flops(jax.devices()[0].device_kind)
        logger = MetricsLogger.from_config(cfg, resume_step=None if start is None else step,
                                           is_main=is_main)
        if is_main:
            log.info("%s\nparameters: %s | mesh %s | %d tokens per step", cfg.describe(
                mesh.shape["data"] * mesh.shape["fsdp"]), f"{n_params:,}", dict(mesh.shape),
                tokens_per_step)
            log.info("device: %s x %d (%s) in %d process(es), attention %s",
                     jax.default_backend(), jax.device_count(), jax.devices()[0].device_kind,
                     jax.process_count(), trainer.plan.attention_impl)
        bar = ProgressBar(cfg.max_iters, initial=step, enabled=cfg.progress_bar, is_main=is_main)

        def meta_now():
            return {"step": step, "skipped_total": skipped_total,
                    "data_state": _gather_data_state(train_loader), "train_config": cfg.to_dict()}

        last: dict[str, Any] = {}  # the newest training record
        last_eval: dict[str, Any] = {}
        saved = stopped_early = None
        # (step, metrics, a mixture's tokens per source) of the newest step, read once the next
        # one is queued
        pending = None
        mark = (time.perf_counter(), step)  # tokens/s counts the steps finished since mark
        losses: list[float] = []  # of the applied steps since the last record
        compiled = False

        def settle():
            """Wait for the pending step: count it if skipped, log it if a log step."""
            nonlocal pending, skipped_total, last, mark
            if pending is None:
                return
            at, metrics, tokens = pending
            pending = None
            ok, loss = _check_finite(metrics, cfg, at, skipped_total, ckpt)
            if ok:
                losses.append(loss)
            else:
                skipped_total += 1
            if at % cfg.log_interval and at != cfg.max_iters:
                return
            now = time.perf_counter()
            tok_s = tokens_per_step * (at - mark[1]) / (now - mark[0]) if at > mark[1] else None
            last = train_metrics(
                loss=float(np.mean(losses)) if losses else None,
                lr=lr_at(max(at - skipped_total - 1, 0), cfg),
                grad_norm=float(jax.device_get(metrics["grad_norm"])), tokens_per_s=tok_s,
                mfu=tok_s and mfu(n_params, tok_s / jax.device_count(), peak),
                peak_memory_bytes=_peak_memory_bytes(), skipped_steps=skipped_total)
            losses.clear()
            logger.log(at, {**last, **tokens})
            bar.update(0, {"loss": last["loss"]})
            mark = (now, at)

        def restart_clock():  # after eval, a save or compilation: only train steps count
            nonlocal mark
            mark = (time.perf_counter(), step)

        try:
            with StopSignal() as stop:
                stop_requested = _StopVote(stop, trainer, rows)
                while step < cfg.max_iters:
                    batch = _to_global(trainer, _next_batch(train_loader, k, vocab,
                                                            cfg.doc_mask))
                    state, metrics = trainer.train_step(state, batch)
                    step += 1
                    # Settle the previous step while this one runs: the host reads metrics,
                    # logs and fetches the next batch without leaving the device idle.
                    settle()
                    pending = (step, metrics, train_loader.token_metrics())
                    if not compiled:  # the first step waits anyway: keep compilation out
                        jax.block_until_ready(metrics)
                        restart_clock()
                        settle()
                        compiled = True
                    bar.update(1)
                    if step % cfg.save_interval == 0 or step == cfg.max_iters:
                        settle()  # saved before evaluating: a failing evaluation loses nothing
                        ckpt.save(step, state, meta_now())
                        saved = step
                        restart_clock()
                    if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                        settle()
                        last_eval = evaluate(trainer, state.params, val_loader, cfg.eval_iters,
                                             vocab)
                        logger.log(step, last_eval)
                        restart_clock()
                    if stop_requested():
                        settle()
                        log.warning("stop signal: saving step %d and exiting", step)
                        ckpt.save(step, state, meta_now(), wait=True)
                        saved, stopped_early = step, True
                        break
                settle()
        finally:
            bar.close()
            ckpt.close()
            train_loader.close()
            val_loader.close()
            logger.close()
        plot = export = export_hf = None
        kept = None if saved is None else ckpt.directory / str(saved)
        if is_main and logger.path.is_file():
            try:
                with end_of_run_write("loss plot", out / PLOT_FILE, cfg, kept):
                    plot = plot_metrics(logger.path, out / PLOT_FILE)
            except ValueError as e:  # no loss recorded yet (e.g. resumed at max_iters)
                log.info("no plot: %s", e)
        if (cfg.export_portable or wants_hf_export(cfg)) and step >= cfg.max_iters:
            params = multihost_utils.process_allgather(state.params, tiled=True)
            if is_main and cfg.export_portable:
                with end_of_run_write("portable export", out / "export", cfg, kept,
                                      needed_bytes=4 * n_params):
                    export = save_pretrained(Model(trainer.module, params), out / "export")
            if is_main and wants_hf_export(cfg):
                from swamla.hub import EXPORT_HF_DIR
                from swamla_torch.hf.export import export_run  # imports torch and transformers

                with end_of_run_write("transformers export", out / EXPORT_HF_DIR, cfg, kept,
                                      needed_bytes=4 * n_params):
                    export_hf = export_run(cfg, to_portable_tensors(cfg.model, params), out)
                log.info("wrote the transformers export %s", export_hf)
        return run_result(step=step, skipped_steps=skipped_total, train=last,
                          evaluation=last_eval, stopped_early=bool(stopped_early),
                          checkpoint=kept,
                          export=export, export_hf=export_hf, plot=plot)


def _is_cuda_build() -> bool:
    """Whether a CUDA plugin of jaxlib is installed (whatever it found at start)."""
    def installed(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent package (jax_plugins) is not there
            return False

    return any(installed(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                            "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"))


def _check_finite(metrics, cfg: TrainConfig, step: int, total: int, ckpt) -> tuple[bool, float]:
    """(whether update ``step`` was applied, its loss); ``total`` skipped before it. Raise once
    max_bad_steps non-finite steps came in a row."""
    ok, streak, loss, norm = jax.device_get((metrics["ok"], metrics["bad_steps"], metrics["loss"],
                                             metrics["grad_norm"]))
    if ok:
        return True, float(loss)
    streak = int(streak)
    log.warning(skipped_step_message(step, float(loss), float(norm), streak, total + 1,
                                     cfg.max_bad_steps))
    if streak >= cfg.max_bad_steps:
        latest = ckpt.latest_step()
        raise NonFiniteError(too_many_skipped_message(
            streak, cfg.max_bad_steps, step,
            None if latest is None else ckpt.directory / str(latest)))
    return False, float(loss)
