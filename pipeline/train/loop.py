"""``train_loop_per_worker``: what every Ray Train worker runs.

One function for all ranks: setup, then for each epoch, for each step, a
checkpoint when one is due (``pipeline.train.preempt.Control`` decides, the same
on every rank). Every rank evaluates its share of the validation split and calls
``ray.train.report`` at each checkpoint, with its own part of it (its RNGs and
loader position; rank 0 adds the model and optimizer, see
``pipeline.train.state``); rank 0 alone talks to MLflow. Validation sums (loss,
top-1, top-5, confusion matrix) are all-reduced, so the figures cover the whole
split exactly once: the loader pads the last batches with label -1, which every
metric skips. Weights that turn NaN or inf end the job before they are checkpointed
(``pipeline.train.guard``).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.metrics import ThroughputMeter
from pipeline.train.checkpoint import clear_stale_staging, load_state, result_weights, staging_dir, unwrap
from pipeline.train.config import MLFLOW_MODEL_SCHEMES, TrainConfig, config_from_dict
from pipeline.train.console import WorkerConsole
from pipeline.train.coverage import log_coverage
from pipeline.train.guard import DivergedInLoop, nonfinite, record_divergence
from pipeline.train.models import build_model, head_name, load_backbone
from pipeline.train.preempt import Control
from pipeline.train.resume import log_missed_epoch, resume_checkpoint
from pipeline.train.state import RunState, keep_best, load_rank_file, local_best
from pipeline.train.step import (TrainStep, WarmupCosine, augment, batch_to, build_optimizer, loader_device,
                                 param_groups, precision_context, setup_torch)

VAL_METRICS = ("val_loss", "val_top1", "val_top5")  # an epoch's figures when it validates (train.val_every_epochs)


def _init_weights(model: nn.Module, source: str, tracking_uri: str | None) -> list[str]:
    """Backbone weights from a checkpoint directory/file or an MLflow model URI; returns the head keys replaced."""
    if source.startswith(MLFLOW_MODEL_SCHEMES):
        from pipeline.train.tracking import load_mlflow_model, resolve_tracking_uri

        state = load_mlflow_model(source, tracking_uri or resolve_tracking_uri(None)).state_dict()
    else:
        state = result_weights(load_state(source))
    return load_backbone(model, state)


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast, num_classes: int,
             in_dtype: torch.dtype | None, memory_format: torch.memory_format) -> dict[str, Any]:
    """Loss, top-1, top-5 and confusion matrix over ``loader``, summed over all ranks; labels < 0 are padding."""
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    cells = num_classes * num_classes
    confusion = torch.zeros(cells + 1, dtype=torch.int64, device=device)  # + a slot for the padding
    for x, y in loader:
        x, y = batch_to(x, y, device, in_dtype, memory_format)
        with autocast:
            logits = model(x)
        logits = logits.float()
        valid = y >= 0
        top = logits.topk(k, dim=1).indices
        hit = top == y.unsqueeze(1)
        sums[0] += F.cross_entropy(logits, y, ignore_index=-1, reduction="sum")
        sums[1] += (hit[:, 0] & valid).sum()
        sums[2] += (hit.any(dim=1) & valid).sum()
        sums[3] += valid.sum()
        # No boolean indexing or bincount: both wait for the GPU to size their output.
        cell = torch.where(valid, y * num_classes + top[:, 0], cells)
        confusion.index_add_(0, cell, torch.ones_like(cell))
    confusion = confusion[:cells]
    _all_reduce_(sums)
    _all_reduce_(confusion)
    loss, top1, top5, count = sums.tolist()  # host sync: once per evaluation
    count = max(count, 1.0)
    return {
        "val_loss": loss / count, "val_top1": top1 / count, "val_top5": top5 / count, "val_samples": int(count),
        "confusion": confusion.view(num_classes, num_classes).cpu(),
    }


@dataclasses.dataclass
class _Worker:
    """One rank's job, built once by ``_setup``: loaders, model, step, resumable state, tracker."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    train_loader: Any
    val_loader: Any
    model: nn.Module  # DDP-wrapped
    step: TrainStep
    state: RunState
    control: Control
    tracker: Any
    meta: dict[str, Any]
    steps_per_epoch: int
    storage_dir: str
    console: WorkerConsole
    checkpoint_s: float = 0.0  # this epoch's time in mid-epoch checkpoints, and how many
    checkpoints: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config["cfg"]`` is ``TrainConfig.to_dict()`` with absolute paths."""
    w = _setup(loop_config)
    try:
        val: dict[str, Any] = {}
        for epoch in range(w.state.epoch, w.cfg.train.epochs):
            meter = _train_epoch(w, epoch)
            if meter is None:
                reason = w.control.stop_reason or "stop requested"
                _say(w, f"stopped at step {w.state.global_step} ({reason})")  # the driver says how to continue
                w.tracker.end("KILLED", reason=reason)
                return
            val = _end_epoch(w, epoch, meter)
        _finish(w, val)
    except DivergedInLoop as exc:  # every rank, at the same step: end without a retry (it would diverge again)
        w.tracker.end("FAILED", reason=str(exc))
        if w.is_main:
            record_divergence(w.storage_dir, exc)  # for the driver's line (pipeline.train.guard)
    except Exception as exc:
        w.tracker.end("FAILED", reason=f"{type(exc).__name__}: {exc}"[:500])
        raise


def _setup(loop_config: dict[str, Any]) -> _Worker:
    """Everything before the first step: data, model, optimizer, step, the restored state, tracking."""
    import ray.train
    import ray.train.torch

    from pipeline.data import make_loader
    from pipeline.data.presets import get_preset
    from pipeline.shard.manifest import read_manifest
    from pipeline.train.topology import realign_schedule, setup_worker
    from pipeline.train.lineage import code_tags, dataset_inputs
    from pipeline.train.sysmetrics import start_node_monitor
    from pipeline.train.tracking import NullTracker, Tracker, spool_dir_for

    cfg: TrainConfig = config_from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    is_main = rank == 0
    cfg, layout = setup_worker(cfg, loop_config)  # fails naming this node if it cannot see the data; prints ranks
    device = ray.train.torch.get_device()
    setup_torch(cfg, device)
    clear_stale_staging()  # checkpoint parts a killed worker left in this node's temp directory

    shards = cfg.data.shards
    manifest = read_manifest(shards)
    loader_kw = dict(rank=rank, world_size=world, backend=cfg.data.backend,
                     device=loader_device(cfg.data.device, device), preset=cfg.data.preset, seed=cfg.train.seed,
                     threads=layout.loader_threads)
    train_loader = make_loader(shards, "train", batch_size=cfg.train.batch_size, **loader_kw)
    val_loader = make_loader(shards, cfg.data.val_split, batch_size=cfg.train.batch_size, train=False, **loader_kw)
    in_channels, image_size, _ = get_preset(train_loader.preset).output_shape()

    model = build_model(cfg.model.name, train_loader.num_classes, in_channels, image_size, cfg.model.dropout,
                        cfg.model.width)
    meta = {"model": cfg.model.name, "num_classes": train_loader.num_classes, "in_channels": in_channels,
            "image_size": image_size, "dropout": cfg.model.dropout, "width": cfg.model.width,
            "classes": list(train_loader.classes), "class_labels": list(train_loader.class_labels),
            "ema_decay": cfg.train.ema_decay,
            "preset": train_loader.preset, "shards": str(shards), "run_name": cfg.run.name}

    # Ray's registered checkpoint, or a newer complete one on storage it never heard of (a lost node).
    checkpoint = resume_checkpoint(loop_config["run_key"], ray.train.get_checkpoint())
    saved = rank_saved = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved, rank_saved = load_state(d), load_rank_file(d, rank)
            best = saved.get("best", {})
            if (is_main and best.get("value") is not None and best.get("epoch") == saved["epoch"]
                    and saved["step_in_epoch"] == 0):
                # Resuming right after the best epoch's checkpoint: a fault may have come before its copy
                # (``_end_epoch``), and no later epoch would make it again, so copy it (again) now.
                keep_best(d, loop_config["run_key"])
        model.load_state_dict(saved["model"])
    elif cfg.train.init_from:
        replaced = _init_weights(model, cfg.train.init_from, loop_config.get("tracking_uri"))
        if is_main:
            head = ", ".join(replaced) or "same shape, loaded too"
            print(f"[pipeline] init from {cfg.train.init_from}: backbone loaded, new head ({head})")

    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)  # before DDP wraps it
    head_prefix = head_name(model) + "."
    backbone_params = [p for n, p in model.named_parameters() if not n.startswith(head_prefix)]
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = min(len(train_loader), cfg.train.max_steps_per_epoch or len(train_loader))
    schedule = WarmupCosine(optimizer, cfg.optim, cfg.train.epochs * steps_per_epoch, steps_per_epoch)
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    step = TrainStep.from_config(model, optimizer, cfg, device, schedule, frozen_params=backbone_params)
    meta["precision"] = step.precision  # pipeline evaluate's default
    state = RunState(model, step, train_loader, rank=rank, world_size=world, keep_best_by=cfg.run.keep_best_by)
    control = Control.for_worker(loop_config["run_key"], rank, world, cfg.run)  # and SIGTERM to this worker
    restart_note = None
    if saved is not None:
        state.load_state_dict(saved)
        realign_schedule(schedule, saved, world, steps_per_epoch)  # after an elastic resize
        restart_note = state.load_rank_state(rank_saved)

    tracker: Any = NullTracker()
    if is_main and cfg.tracking.enabled:
        tracker = Tracker(loop_config["tracking_uri"], cfg.tracking.experiment, loop_config.get("artifact_location"),
                          flush_timeout_s=cfg.tracking.flush_timeout_s)
        tracker.start(loop_config["run_key"], cfg.run.name, cfg.to_dict(),
                      tags={"pipeline.model": cfg.model.name, "pipeline.shards": str(shards),
                            "pipeline.precision": step.precision,
                            **code_tags(loop_config.get("code", {})), **loop_config.get("run_tags", {})},
                      datasets=dataset_inputs(shards, manifest,
                                              {"train": "training", cfg.data.val_split: "validation"}))
        layout.log(tracker, state.epoch)
        log_missed_epoch(tracker, checkpoint, state.epoch, state.step_in_epoch)
        if not tracker.resumed:
            import yaml

            tracker.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
            tracker.log_dict(manifest, "data/index.json")
    if cfg.tracking.enabled:  # this node's CPU/memory/disk/network/GPU series, from its local rank 0
        start_node_monitor(spool_dir_for(loop_config["run_key"]), ctx.get_local_rank(),
                           cfg.tracking.system_metrics_interval_s)
    w = _Worker(cfg, rank, world, device, train_loader, val_loader, model, step, state, control, tracker, meta,
                steps_per_epoch, loop_config["run_key"], WorkerConsole(loop_config.get("console", "stdout"), is_main))
    if _agree_any(restart_note is not None, device):
        # A rank that cannot continue the epoch (another world size, no saved position) makes all restart it.
        why = restart_note or "another rank cannot continue it"
        _say(w, f"epoch {state.epoch + 1} restarts from its first batch ({why}); its first "
                f"{state.step_in_epoch} steps are trained again under new step numbers")
        state.restart_epoch()
        if step.schedule is not None:  # its steps are trained again, and so is its stretch of the lr schedule
            step.schedule.step_num = state.epoch * steps_per_epoch
    if control.note:
        _say(w, control.note)
    where = ("starting" if saved is None else f"resuming at epoch {state.epoch + 1} step {state.step_in_epoch}"
             if state.step_in_epoch else f"resuming after epoch {state.epoch}")
    _say(w, f"{cfg.run.name}: {where}; {world} worker(s) × batch {cfg.train.batch_size}, {steps_per_epoch} "
            f"steps/epoch, {train_loader.num_samples} train / {val_loader.num_samples} val, "
            f"{train_loader.backend} loader on {device}, precision {step.precision}"
            f"{' (auto)' if cfg.train.precision == 'auto' else ''}")
    return w


def _train_epoch(w: _Worker, epoch: int) -> ThroughputMeter | None:
    """Train ``epoch`` from the state's position; checkpoint when due. None when a stop was asked for."""
    cfg, st = w.cfg, w.state
    w.train_loader.set_epoch(epoch)
    w.model.train()
    w.step.frozen = epoch < cfg.train.freeze_backbone_epochs
    meter, window = ThroughputMeter(), ThroughputMeter()
    st.begin_epoch(w.device)
    w.checkpoint_s, w.checkpoints = 0.0, 0
    meter.start()
    window.start()
    for step, (x, y) in enumerate(w.train_loader, start=st.step_in_epoch):
        if step >= w.steps_per_epoch:
            break
        meter.data_ready()
        window.data_ready()
        loss = w.step(x, y)
        st.add_step(loss, y.shape[0])
        meter.step_done(y.shape[0])
        window.step_done(y.shape[0])
        w.console.step(epoch + 1, cfg.train.epochs, step + 1, w.steps_per_epoch)  # the TTY bar; ≤ 2 sends/s
        if st.global_step % cfg.train.log_every_steps == 0:
            _log_step(w, epoch, step, loss, window)
            _check_weights(w, buffers=False)  # the parameters, equal on every rank: no collective needed
        due, stop = w.control.poll(st.global_step)
        if stop or (due and st.step_in_epoch < w.steps_per_epoch):  # an epoch's end checkpoints anyway
            t0 = time.perf_counter()
            _checkpoint(w, {"epoch": st.epoch, "global_step": st.global_step, "step_in_epoch": st.step_in_epoch,
                            "stopped": int(stop)})  # the driver tells a stop from a job that ended anyway
            w.checkpoint_s, w.checkpoints = w.checkpoint_s + time.perf_counter() - t0, w.checkpoints + 1
        if stop:
            return None
    return meter


def _log_step(w: _Worker, epoch: int, step: int, loss: torch.Tensor, window: ThroughputMeter) -> None:
    step_loss = loss.item()  # host sync: only every log_every_steps
    window.flush()  # the device's queued steps have run: their time belongs to this window
    lr, rate = w.step.lr, window.total()
    w.tracker.log_step(w.state.global_step, {"step_train_loss": step_loss, "step_lr": lr,
                                             "step_images_per_s": rate.images_per_s * w.world})
    w.console.step(epoch + 1, w.cfg.train.epochs, step + 1, w.steps_per_epoch, {
        "loss": step_loss, "lr": lr, "images_per_s": rate.images_per_s * w.world,
        "data_wait_frac": rate.data_wait_frac})
    window.reset()
    window.start()


def _end_epoch(w: _Worker, epoch: int, meter: ThroughputMeter) -> dict[str, Any]:
    """Epoch figures over all ranks, validation when due, the epoch checkpoint, MLflow; returns the validation
    result ({} for an epoch that ``train.val_every_epochs`` skips)."""
    st, device = w.state, w.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: once per epoch, so the meter's clock covers the queued work
    meter.flush()
    thr = meter.total()
    # Train loss over all ranks; images/s over all ranks (each rank reports its own rate).
    agg = _all_reduce_(torch.stack([st.loss_sum, torch.tensor(float(st.seen), dtype=torch.float64, device=device),
                                    torch.tensor(thr.images_per_s, dtype=torch.float64, device=device),
                                    torch.tensor(thr.data_wait_frac, dtype=torch.float64, device=device)]))
    train_loss, samples, images_per_s, wait = agg.tolist()
    t_eval = time.perf_counter()
    val = _validate(w) if w.cfg.train.validates_after(epoch + 1) else {}  # train.val_every_epochs
    metrics = {
        "epoch": epoch + 1, "train_loss": train_loss / max(samples, 1), "train_images_per_s": images_per_s,
        "world_size": w.world, "data_wait_frac": wait / w.world, "step_time_s": thr.step_time_s, "lr": w.step.lr,
        **{k: val[k] for k in VAL_METRICS if k in val},
        "epoch_time_s": thr.total_s + time.perf_counter() - t_eval,
        "checkpoint_s": w.checkpoint_s / max(w.checkpoints, 1), "checkpoints": w.checkpoints,  # mid-epoch ones
    }
    improved = st.end_epoch(metrics)
    w.console.epoch(epoch + 1, w.cfg.train.epochs, metrics)
    # The checkpoint is persisted before MLflow hears of the epoch: a crash in between
    # leaves the epoch unlogged rather than logged twice (the resumed run skips it).
    tmp = _checkpoint(w, metrics, keep=True)
    w.tracker.log_epoch(epoch + 1, {k: v for k, v in metrics.items() if k != "epoch"})
    log_coverage(w.tracker, epoch + 1, w.train_loader)  # every rank: the samples it read, gathered on rank 0
    if w.is_main and improved:
        keep_best(tmp, w.storage_dir)  # uploaded to MLflow once, at the end of the job
    shutil.rmtree(tmp, ignore_errors=True)
    return val


def _validate(w: _Worker) -> dict[str, Any]:
    """The val split through the model (its weight average, if kept) with the training step's precision and
    memory format."""
    return evaluate(w.step.eval_model, w.val_loader, w.device, w.step.autocast, w.train_loader.num_classes,
                    w.step.in_dtype, w.step.memory_format)


def _checkpoint(w: _Worker, metrics: dict[str, Any], keep: bool = False) -> str:
    """Every rank writes its part and reports it: Ray Train merges the ranks' directories into one checkpoint."""
    import ray.train

    # BatchNorm statistics differ between ranks (rank 0's are the ones saved): rank 0 checks them, all agree.
    _check_weights(w, buffers=w.is_main, agree=True)
    tmp = staging_dir()
    try:
        w.state.save(tmp, {**w.meta, "epoch": w.state.epoch, "step_in_epoch": w.state.step_in_epoch,
                           "global_step": w.state.global_step, "world_size": w.world,  # pipeline.train.resume
                           "metrics": {k: v for k, v in metrics.items() if k != "epoch"}})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    w.control.checkpointed()
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _check_weights(w: _Worker, *, buffers: bool, agree: bool = False) -> None:
    """Raise ``DivergedInLoop`` if the model's weights hold NaN or inf (``pipeline.train.guard``); ``agree``: every
    rank raises if any rank found one (a collective: only where all ranks are at the same step)."""
    bad = nonfinite(unwrap(w.model), buffers=buffers)
    if (_agree_any(bad is not None, w.device) if agree else bad is not None):
        st = w.state
        epoch = st.epoch if st.step_in_epoch else st.epoch - 1  # an epoch's end has counted it already
        raise DivergedInLoop(st.global_step, epoch, bad or "on another rank")


def _finish(w: _Worker, val: dict[str, Any]) -> None:
    """Final figures, the best checkpoint and the model to MLflow, the run marked FINISHED."""
    import ray.train

    if not val:
        # Started again with no epochs left: report the current model's figures once, no checkpoint.
        val = _validate(w)
        ray.train.report({"epoch": w.state.epoch, **{k: val[k] for k in VAL_METRICS}})
    if w.is_main and w.cfg.tracking.enabled:
        with local_best(w.storage_dir) as best:
            if best is not None:
                w.tracker.log_artifacts(best, "best_checkpoint")
        _log_final(w.tracker, w.step.eval_model, w.meta, val["confusion"], w.cfg)
        w.tracker.end("FINISHED")


def _agree_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any."""
    t = torch.tensor([float(flag)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())  # host sync: at start-up and before each checkpoint


def _say(w: _Worker, line: str) -> None:
    w.console.line(line)  # rank 0's console; other ranks' consoles are silent


def _log_final(tracker, model: nn.Module, meta: dict, confusion: torch.Tensor, cfg: TrainConfig) -> None:
    """End-of-job artifacts: confusion matrix PNG, per-class accuracy table, the final model."""
    import matplotlib.pyplot as plt

    from pipeline.train.tracking import confusion_figure, per_class_table

    cm = confusion.numpy()
    classes, labels = meta["classes"], meta["class_labels"]
    in_channels, image_size = meta["in_channels"], meta["image_size"]
    tracker.log_text(per_class_table(labels, cm), "eval/per_class_accuracy.csv")
    fig = confusion_figure(labels, cm)
    tracker.log_figure(fig, "eval/confusion_matrix.png")
    plt.close(fig)
    if cfg.tracking.log_model:
        model = model.float().cpu().eval()
        tracker.log_model(model, (in_channels, image_size, image_size), cfg.model.name, classes=classes,
                          register=cfg.tracking.register_model)


__all__ = ["TrainStep", "WarmupCosine", "augment", "build_optimizer", "evaluate", "param_groups",
           "precision_context", "setup_torch", "train_loop_per_worker"]
