"""One training step, shared by the Ray worker loop and every training benchmark.

Everything a step does lives here, so a benchmark that calls ``TrainStep``
measures exactly what ``pipeline train`` runs: the batch's device, dtype and
memory format, batch-level augmentation, autocast, the loss, the scaled
backward, the frozen backbone, gradient clipping, the optimizer and the
per-step learning-rate schedule. The step never synchronizes with the device;
the caller decides when to read the loss (``.item()``).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train.checkpoint import unwrap
from pipeline.train.config import TrainConfig
from pipeline.train.ema import WeightAverage
from pipeline.train.hostmem import keep_freed_memory


def setup_torch(cfg: TrainConfig, device: torch.device) -> None:
    """Per-process settings: intra-op threads, seeds (torch, NumPy, Python), cuDNN autotune and TF32 on CUDA;
    on the CPU, a malloc that keeps freed memory (``pipeline.train.hostmem``)."""
    if device.type == "cpu":
        keep_freed_memory()
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cpu_info(field: str) -> str | None:
    """The value of ``field`` (``flags``, ``model name``, …) for the first CPU in /proc/cpuinfo; None where
    there is none (not Linux, or a CPU that does not report it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((value.strip() for key, sep, value in (line.partition(":") for line in f)
                         if sep and key.strip() == field), None)
    except OSError:
        return None


def _cpu_flags() -> set[str]:
    return set((cpu_info("flags") or "").split())


def resolve_precision(name: str, device: torch.device | str) -> str:
    """``auto``: bf16 where the device multiplies bf16 natively, else the fastest exact choice.

    On a CPU that is bf16 when it has AMX (``amx_bf16``: Xeon Sapphire Rapids and later), where
    bf16 autocast trains about twice as fast as fp32, and fp32 elsewhere, where bf16 is emulated
    and slower. On CUDA it is bf16 where supported (Ampere and later), else fp16 with a GradScaler.
    Other names are returned as they are.
    """
    if name != "auto":
        return name
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and "amx_bf16" in _cpu_flags() else "fp32"


def precision_context(name: str, device: torch.device | str) -> tuple[contextlib.AbstractContextManager,
                                                                       torch.amp.GradScaler, torch.dtype | None]:
    """The autocast context, GradScaler and input dtype for ``fp32`` / ``bf16`` / ``fp16`` (``auto`` resolved
    by ``resolve_precision``), built once per run."""
    name = resolve_precision(name, device)
    device_type = torch.device(device).type
    if name == "fp32":
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        return ctx, torch.amp.GradScaler(device_type, enabled=False), torch.float32
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    # fp16 has too little range for raw gradients: the scaler keeps them finite. bf16 needs none.
    scaler = torch.amp.GradScaler(device_type, enabled=name == "fp16")
    return torch.autocast(device_type, dtype=dtype), scaler, None


class WarmupCosine:
    """Per-step learning rate: linear warmup from ``lr * warmup_start`` to ``lr``, then cosine (or constant)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg, total_steps: int, steps_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.lr = cfg.lr
        self.warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.start = cfg.warmup_start
        self.cosine = cfg.schedule == "cosine"
        self.floor = cfg.min_lr
        self.total = max(total_steps, self.warmup + 1)
        self.step_num = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (self.start + (1 - self.start) * step / self.warmup)
        if not self.cosine:
            return self.lr
        t = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.lr * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t)))

    def step(self) -> float:
        """Set the learning rate for the next optimizer step; returns it."""
        lr = self.lr_at(self.step_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.step_num += 1
        return lr

    def state_dict(self) -> dict[str, int]:
        return {"step_num": self.step_num}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_num = int(state["step_num"])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights of convs and linears only: never on norm layers' affine parameters or biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov), Adam or AdamW over ``param_groups``."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=cfg.betas)


def loader_device(setting: str, device: torch.device) -> str:
    """Where a training process's loader runs (``make_loader``'s ``device``) for ``data.device`` = ``setting``:
    ``auto`` follows the device the model trains on, so a CPU job on a host with a GPU (whose workers
    Ray does not hide it from) decodes on the CPU, not on a GPU its model never reads from."""
    if setting == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return setting


def batch_to(x: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: torch.dtype | None,
             memory_format: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's batch on ``device``, images in ``dtype`` and ``memory_format``: asynchronous copies to a GPU;
    a copy to the host is never asynchronous, since the host would read it before it lands."""
    non_blocking = device.type == "cuda"
    x = x.to(device, dtype=dtype, non_blocking=non_blocking, memory_format=memory_format)
    return x, y.to(device, non_blocking=non_blocking)


def _to_device(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A mask drawn on the CPU, copied to ``device`` without a host sync (from pinned memory on CUDA)."""
    if device.type == "cuda":
        mask = mask.pin_memory()
    return mask.to(device, non_blocking=True)


def _erase_masks(n: int, h: int, w: int, generator: torch.Generator | None,
                 p: float = 0.5, area: tuple[float, float] = (0.02, 0.25), ratio: float = 0.3) -> torch.Tensor:
    """``(n, 1, h, w)`` booleans: one random rectangle per image, in a fraction ``p`` of the images."""
    frac = torch.empty(n).uniform_(area[0], area[1], generator=generator) * (h * w)
    aspect = torch.empty(n).uniform_(math.log(ratio), -math.log(ratio), generator=generator).exp()
    eh = (frac * aspect).sqrt().round().clamp(1, h)
    ew = (frac / aspect).sqrt().round().clamp(1, w)
    y0 = (torch.rand(n, generator=generator) * (h - eh + 1)).floor()
    x0 = (torch.rand(n, generator=generator) * (w - ew + 1)).floor()
    on = torch.rand(n, generator=generator) < p
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)

    def col(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, 1, 1)

    rows = (ys >= col(y0)) & (ys < col(y0 + eh))
    cols = (xs >= col(x0)) & (xs < col(x0 + ew))
    return (col(on) & rows & cols).unsqueeze(1)


def augment(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batch-level augmentation on the training device: random horizontal flips, then for ``flip_shift`` a
    random shift of ±2 px of the whole batch, for ``flip_erase`` random erasing of each image.

    Tensor ops over the whole batch (no per-sample Python); on the loader's
    normalised images, zero is the dataset mean: the padding of a shift and the
    fill of an erased rectangle. Random erasing (Zhong et al., 2017) blanks, in
    half of the images, one rectangle of 2-25 % of the image with an aspect
    ratio between 0.3 and 3.3. The random draws come from ``generator`` (a CPU
    generator, so its state is checkpointed and resumed with the run; the
    global torch RNG when None) and reach the device as masks (no host sync).
    """
    if mode == "none":
        return x
    n = x.shape[0]
    flip = torch.rand(n, 1, 1, 1, generator=generator) < 0.5
    x = torch.where(_to_device(flip, x.device), x.flip(3), x)
    if mode == "flip_erase":
        x = x.masked_fill(_to_device(_erase_masks(n, x.shape[2], x.shape[3], generator), x.device), 0.0)
    if mode == "flip_shift":
        pad = 2
        h, w = x.shape[2], x.shape[3]
        padded = F.pad(x, (pad, pad, pad, pad))
        dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()  # CPU: no device sync
        x = padded[:, :, dy:dy + h, dx:dx + w]
    return x


class TrainStep:
    """One optimizer step over one batch; built once per run with ``from_config``.

    Attributes the caller may read: ``precision`` (``auto`` resolved), ``memory_format``,
    ``in_dtype``, ``autocast`` and ``scaler`` (the evaluation pass and checkpoints use the same ones),
    ``generator`` (the augmentation's RNG, part of the resumable state),
    ``frozen`` (True while the backbone is held still: set it per epoch), ``ema`` (the
    ``WeightAverage`` updated after every step, or None) and ``eval_model`` (what to evaluate).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 device: torch.device, *, precision: str = "fp32", channels_last: bool = False,
                 augment: str = "none", grad_clip: float | None = None, schedule: WarmupCosine | None = None,
                 frozen_params: Iterable[nn.Parameter] = (), compile: bool = False, seed: int = 0,
                 ema_decay: float | None = None) -> None:
        self.model = model
        self.step_model = torch.compile(model) if compile else model
        self.optimizer = optimizer
        self.criterion = criterion
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.precision = resolve_precision(precision, self.device)
        self.autocast, self.scaler, self.in_dtype = precision_context(self.precision, self.device)
        self.augment = augment
        self.grad_clip = grad_clip
        self.schedule = schedule
        self.frozen_params = list(frozen_params)
        self.frozen = bool(self.frozen_params)
        self.generator = torch.Generator().manual_seed(seed)
        self.ema = WeightAverage(model, ema_decay) if ema_decay else None  # the model is on its device by now
        self.lr = schedule.lr_at(schedule.step_num) if schedule is not None else optimizer.param_groups[0]["lr"]

    @classmethod
    def from_config(cls, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    device: torch.device | str, schedule: WarmupCosine | None = None,
                    frozen_params: Iterable[nn.Parameter] = ()) -> TrainStep:
        """The step ``cfg`` describes. Moves the model's own module to ``device`` and the memory format
        (a no-op when the caller already did, e.g. before wrapping it in DDP)."""
        device = torch.device(device)
        memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        unwrap(model).to(device, memory_format=memory_format)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing, ignore_index=-1)
        return cls(model, optimizer, criterion, device, precision=cfg.train.precision,
                   channels_last=cfg.model.channels_last, augment=cfg.train.augment, grad_clip=cfg.optim.grad_clip,
                   schedule=schedule, frozen_params=frozen_params, compile=cfg.model.compile,
                   seed=cfg.train.seed * 1_000_003 + rank, ema_decay=cfg.train.ema_decay)

    @property
    def eval_model(self) -> nn.Module:
        """The model to validate, checkpoint as the result and log: the weight average when there is one."""
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the step's device, in its input dtype and memory format (``batch_to``)."""
        return batch_to(x, y, self.device, self.in_dtype, self.memory_format)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Train on one batch; returns the batch's mean loss, detached and still on the device (no host sync)."""
        x, y = self.to_device(x, y)
        x = augment(x, self.augment, self.generator)
        if self.schedule is not None:
            self.lr = self.schedule.step()
        with self.autocast:
            logits = self.step_model(x)
        loss = self.criterion(logits.float(), y)
        self.scaler.scale(loss).backward()
        if self.frozen:
            # DDP has already all-reduced these gradients; dropping them makes the optimizer
            # skip the backbone entirely (no update, no momentum) while the head trains.
            for p in self.frozen_params:
                p.grad = None
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()


__all__ = ["TrainStep", "WarmupCosine", "augment", "batch_to", "build_optimizer", "loader_device", "param_groups",
           "precision_context", "resolve_precision", "setup_torch"]
