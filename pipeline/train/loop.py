"""``train_loop_per_worker``: what every Ray Train worker runs.

One function for all ranks. Every rank trains, evaluates its share of the
validation split and calls ``ray.train.report`` once per epoch; rank 0 alone
writes checkpoints and talks to MLflow. Validation sums (loss, top-1, top-5,
confusion matrix) are all-reduced, so the figures cover the whole split exactly
once: the loader pads the last batches with label -1, which every metric skips.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.metrics import ThroughputMeter
from pipeline.train.checkpoint import load_state, save_checkpoint, unwrap
from pipeline.train.config import TrainConfig, config_from_dict
from pipeline.train.models import build_model, head_name, load_backbone
from pipeline.train.step import (TrainStep, WarmupCosine, augment, build_optimizer, param_groups,
                                 precision_context, setup_torch)

def _init_weights(model: nn.Module, source: str, tracking_uri: str | None) -> list[str]:
    """Backbone weights from a checkpoint directory/file or an MLflow model URI; returns the head keys replaced."""
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow.pytorch

        from pipeline.train.tracking import resolve_tracking_uri

        mlflow.set_tracking_uri(tracking_uri or resolve_tracking_uri(None))
        state = unwrap(mlflow.pytorch.load_model(source, map_location="cpu")).state_dict()
    else:
        state = load_state(source)["model"]
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
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for x, y in loader:
        x = x.to(device, dtype=in_dtype, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
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
        yv = y[valid]
        confusion += torch.bincount(yv * num_classes + top[valid, 0], minlength=num_classes * num_classes)
    _all_reduce_(sums)
    _all_reduce_(confusion)
    loss, top1, top5, count = sums.tolist()  # host sync: once per evaluation
    count = max(count, 1.0)
    return {
        "val_loss": loss / count, "val_top1": top1 / count, "val_top5": top5 / count, "val_samples": int(count),
        "confusion": confusion.view(num_classes, num_classes).cpu(),
    }


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config["cfg"]`` is ``TrainConfig.to_dict()`` with absolute paths."""
    import ray.train
    import ray.train.torch

    from pipeline.data import make_loader
    from pipeline.data.presets import get_preset
    from pipeline.shard.manifest import read_manifest
    from pipeline.train.topology import setup_worker
    from pipeline.train.tracking import NullTracker, Tracker

    cfg: TrainConfig = config_from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    is_main = rank == 0
    cfg, layout = setup_worker(cfg, loop_config)  # fails naming this node if it cannot see the data; prints ranks
    device = ray.train.torch.get_device()
    setup_torch(cfg, device)

    shards = cfg.data.shards
    manifest = read_manifest(shards)
    loader_kw = dict(rank=rank, world_size=world, backend=cfg.data.backend, device=cfg.data.device,
                     preset=cfg.data.preset, seed=cfg.train.seed, threads=layout.loader_threads)
    train_loader = make_loader(shards, "train", batch_size=cfg.train.batch_size, **loader_kw)
    val_loader = make_loader(shards, cfg.data.val_split, batch_size=cfg.train.batch_size, **loader_kw)
    num_classes = train_loader.num_classes
    classes = list(train_loader.classes)
    in_channels, image_size, _ = get_preset(train_loader.preset).output_shape()

    model = build_model(cfg.model.name, num_classes, in_channels, image_size, cfg.model.dropout)
    meta = {"model": cfg.model.name, "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
            "dropout": cfg.model.dropout, "classes": classes, "preset": train_loader.preset,
            "shards": str(shards), "run_name": cfg.run.name}

    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
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

    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    schedule = WarmupCosine(optimizer, cfg.optim, cfg.train.epochs * steps_per_epoch, steps_per_epoch)
    start_epoch, global_step = 0, 0
    best = {"metric": cfg.run.keep_best_by, "value": None, "epoch": 0}
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    train_step = TrainStep.from_config(model, optimizer, cfg, device, schedule, frozen_params=backbone_params)
    autocast, scaler, in_dtype = train_step.autocast, train_step.scaler, train_step.in_dtype
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        best = dict(state.get("best", best))
    eval_model = unwrap(model)

    tracker: Any = NullTracker()
    if is_main and cfg.tracking.enabled:
        tracker = Tracker(loop_config["tracking_uri"], cfg.tracking.experiment, loop_config.get("artifact_location"))
        tracker.start(loop_config["run_key"], cfg.run.name, cfg.to_dict(),
                      tags={"pipeline.model": cfg.model.name, "pipeline.shards": str(shards)})
        layout.log(tracker, start_epoch)
        if not tracker.resumed:
            import yaml

            tracker.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
            tracker.log_dict(manifest, "data/index.json")
    if is_main:
        where = f"resuming after epoch {start_epoch}" if state is not None else "starting"
        print(f"[pipeline] {cfg.run.name}: {where}; {world} worker(s) × batch {cfg.train.batch_size}, "
              f"{steps_per_epoch} steps/epoch, {train_loader.num_samples} train / {val_loader.num_samples} val, "
              f"{train_loader.backend} loader on {device}, precision {cfg.train.precision}")

    val: dict[str, Any] = {}
    log_every = cfg.train.log_every_steps
    for epoch in range(start_epoch, cfg.train.epochs):
        t_epoch = time.perf_counter()
        train_loader.set_epoch(epoch)
        model.train()
        train_step.frozen = epoch < cfg.train.freeze_backbone_epochs
        meter, window = ThroughputMeter(), ThroughputMeter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        lr = schedule.lr_at(schedule.step_num)
        meter.start()
        window.start()
        for step, (x, y) in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            meter.data_ready()
            window.data_ready()
            loss = train_step(x, y)
            lr = train_step.lr
            loss_sum += loss * y.shape[0]
            seen += y.shape[0]
            global_step += 1
            meter.step_done(y.shape[0])
            window.step_done(y.shape[0])
            if global_step % log_every == 0:
                step_loss = loss.item()  # host sync: only every log_every steps
                w = window.total()
                tracker.log_step(global_step, {"step_train_loss": step_loss, "step_lr": lr,
                                               "step_images_per_s": w.images_per_s * world})
                if is_main:
                    print(f"[pipeline] epoch {epoch + 1} step {step + 1}/{steps_per_epoch} loss {step_loss:.4f} "
                          f"lr {lr:.3g} {w.images_per_s * world:.0f} img/s data-wait {w.data_wait_frac:.0%}")
                window.reset()
                window.start()

        # Train loss over all ranks; images/s over all ranks (each rank reports its own rate).
        thr = meter.total()
        agg = _all_reduce_(torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device),
                                        torch.tensor(thr.images_per_s, dtype=torch.float64, device=device),
                                        torch.tensor(thr.data_wait_frac, dtype=torch.float64, device=device)]))
        train_loss, samples, images_per_s, wait = agg.tolist()  # host sync: once per epoch
        val = evaluate(eval_model, val_loader, device, autocast, num_classes, in_dtype, memory_format)
        metrics = {
            "epoch": epoch + 1, "train_loss": train_loss / max(samples, 1), "train_images_per_s": images_per_s,
            "world_size": world, "data_wait_frac": wait / world, "step_time_s": thr.step_time_s, "lr": lr,
            "val_loss": val["val_loss"], "val_top1": val["val_top1"], "val_top5": val["val_top5"],
            "epoch_time_s": time.perf_counter() - t_epoch,
        }
        score = metrics[best["metric"]]
        higher_is_better = best["metric"] == "val_top1"
        improved = best["value"] is None or (score > best["value"] if higher_is_better else score < best["value"])
        if improved:
            best = {"metric": best["metric"], "value": score, "epoch": epoch + 1}
        train_state = {
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "schedule": schedule.state_dict(), "epoch": epoch + 1, "global_step": global_step, "best": best,
        }
        ckpt_meta = {**meta, "epoch": epoch + 1, "metrics": {k: v for k, v in metrics.items() if k != "epoch"}}
        if is_main:
            print(f"[pipeline] epoch {epoch + 1}/{cfg.train.epochs}: train_loss {metrics['train_loss']:.4f} "
                  f"val_loss {metrics['val_loss']:.4f} val_top1 {metrics['val_top1']:.4f} "
                  f"val_top5 {metrics['val_top5']:.4f} {images_per_s:.0f} img/s "
                  f"data-wait {metrics['data_wait_frac']:.0%} ({metrics['epoch_time_s']:.1f} s)")
            with tempfile.TemporaryDirectory(prefix="pipeline-ckpt-") as tmp:
                save_checkpoint(tmp, train_state, ckpt_meta)
                # The checkpoint is persisted before MLflow hears of the epoch: a crash in between
                # leaves the epoch unlogged rather than logged twice (the resumed run skips it).
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
                tracker.log_epoch(epoch + 1, {k: v for k, v in metrics.items() if k != "epoch"})
                if improved:
                    tracker.log_artifacts(tmp, "best_checkpoint")
        else:
            ray.train.report(metrics)

    if not val:
        # Started again with no epochs left: report the current model's figures once, no checkpoint.
        val = evaluate(eval_model, val_loader, device, autocast, num_classes, in_dtype, memory_format)
        figures = {k: val[k] for k in ("val_loss", "val_top1", "val_top5")}
        ray.train.report({"epoch": start_epoch, **figures})
    if is_main and cfg.tracking.enabled:
        _log_final(tracker, eval_model, classes, val["confusion"], cfg, in_channels, image_size)
        tracker.end("FINISHED")


def _log_final(tracker, model: nn.Module, classes: list[str], confusion: torch.Tensor, cfg: TrainConfig,
               in_channels: int, image_size: int) -> None:
    """End-of-job artifacts: confusion matrix PNG, per-class accuracy table, the final model."""
    import matplotlib.pyplot as plt

    from pipeline.train.tracking import confusion_figure, per_class_table

    cm = confusion.numpy()
    tracker.log_text(per_class_table(classes, cm), "eval/per_class_accuracy.csv")
    fig = confusion_figure(classes, cm)
    tracker.log_figure(fig, "eval/confusion_matrix.png")
    plt.close(fig)
    if cfg.tracking.log_model:
        model = model.float().cpu().eval()
        tracker.log_model(model, (in_channels, image_size, image_size), "model")


__all__ = ["TrainStep", "WarmupCosine", "augment", "build_optimizer", "evaluate", "param_groups",
           "precision_context", "setup_torch", "train_loop_per_worker"]
