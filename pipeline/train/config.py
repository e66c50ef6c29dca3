"""Training configuration: one frozen dataclass per concern, loaded from YAML plus ``--set`` overrides.

Stable keys that users' scripts may rely on: ``data.shards``, ``train.epochs``,
``train.batch_size`` (per worker), ``scaling.num_workers``, ``scaling.use_gpu``,
``run.name``, ``tracking.experiment``. Bundled configs live in ``pipeline/configs``
and are named without path or suffix (``--config fashion_mnist``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

from pipeline.config import apply_overrides, from_dict, load_yaml, to_dict
from pipeline.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

ModelName = Literal["seed_cnn", "cifar_cnn", "fmnist_resnet", "resnet18", "resnet50"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # auto: pipeline.train.step.resolve_precision


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which shards to read and how (see ``pipeline.data.make_loader``)."""

    shards: Path = Path("shards/fashion_mnist")
    backend: Literal["auto", "dali", "torch"] = "auto"
    device: Literal["auto", "gpu", "cpu"] = "auto"
    preset: Literal["imagenet", "cifar", "mnist"] | None = None  # None: the shard set's own preset
    val_split: Literal["val", "train"] = "val"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: ModelName = "seed_cnn"
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (pays a one-off compile per worker)
    dropout: float = 0.0  # before the classifier head, where the model has one to tune
    width: int | None = None  # fmnist_resnet only: channels of its first stage (null: 32; cost grows ~ width²)

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.width is not None and (self.width < 1 or self.name != "fmnist_resnet"):
            raise ValueError(f"width applies to fmnist_resnet only and must be >= 1, got {self.width} for {self.name}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1  # peak learning rate for the global batch (batch_size * num_workers)
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)  # Adam/AdamW only
    weight_decay: float = 0.0  # never applied to norm layers and biases
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0  # linear warmup from lr * warmup_start, per step
    warmup_start: float = 0.01
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup, per step
    min_lr: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float | None = None  # max global grad norm

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("momentum", "label_smoothing", "min_lr", "warmup_start"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("weight_decay and warmup_epochs must be >= 0")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs name: sgd and momentum > 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if not all(0.0 <= b < 1.0 for b in self.betas):  # what torch's Adam checks, in every worker
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")


# How an MLflow model is named where a checkpoint path is also accepted (train.init_from, evaluate --model).
MLFLOW_MODEL_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    epochs: int = 10
    batch_size: int = 256  # per worker
    precision: Precision = "fp32"
    seed: int = 0
    log_every_steps: int = 50  # step metrics and console lines; the only host syncs in the hot loop
    max_steps_per_epoch: int | None = None  # cap for smoke runs and benchmarks; None = whole epoch
    init_from: str | None = None  # checkpoint dir/file or MLflow model (runs:/<run id>/<model name>, models:/…)
    freeze_backbone_epochs: int = 0  # with init_from: train only the new head for this many epochs
    # Cheap batch-level augmentation on the device (pipeline.train.step.augment): flips, plus a shift of the
    # whole batch (flip_shift) or random erasing of each image (flip_erase).
    augment: Literal["none", "flip", "flip_shift", "flip_erase"] = "none"
    # Validation after every N-th epoch and always after the last; 0: after the last epoch only (a
    # held-out split that must be read once, or a val pass that costs too much to run every epoch).
    val_every_epochs: int = 1
    # An exponential moving average of the weights (pipeline.train.ema), updated after every step: the model
    # that is validated, checkpointed as the result and logged. null: off; e.g. 0.999 (a ~1,000-step horizon).
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.log_every_steps < 1:
            raise ValueError(f"log_every_steps must be >= 1, got {self.log_every_steps}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError("max_steps_per_epoch must be >= 1 or null")
        if self.freeze_backbone_epochs < 0:
            raise ValueError("freeze_backbone_epochs must be >= 0")
        if self.val_every_epochs < 0:
            raise ValueError(f"val_every_epochs must be >= 0, got {self.val_every_epochs}")
        if self.freeze_backbone_epochs and not self.init_from:
            raise ValueError("freeze_backbone_epochs needs init_from (a backbone to keep)")

    def validates_after(self, epoch: int) -> bool:
        """Whether the val split is evaluated after ``epoch`` (1-based)."""
        every = self.val_every_epochs
        return epoch >= self.epochs or (every > 0 and epoch % every == 0)


@dataclasses.dataclass(frozen=True)
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only with use_gpu
    torch_threads: int | None = None  # intra-op threads per worker; None = cpus_per_worker
    # Ray's placement group strategy: PACK fills nodes, SPREAD prefers distinct nodes, STRICT_SPREAD demands them.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # Elastic: train with any size from min_workers to num_workers; lr scales with the live world size.
    min_workers: int | None = None
    resize_check_s: float = 60.0  # elastic: how often a healthy group looks for room to grow
    # How long a (re)starting worker group waits for room for all its workers before Ray Train tries
    # again, at the size the cluster then has room for when elastic. After a node loss Ray still counts
    # the lost node's CPUs until it marks the node dead, so the first restart may wait this long in
    # vain. None: Ray's default (60 s, or RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S).
    group_start_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be > 0")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or null (= cpus_per_worker), got {self.torch_threads}")
        if self.use_gpu and self.gpus_per_worker < 1:
            # A fraction would put two ranks on one GPU, which NCCL refuses ("Duplicate GPU detected").
            raise ValueError(f"gpus_per_worker must be >= 1 with use_gpu (one GPU per rank), "
                             f"got {self.gpus_per_worker}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(f"min_workers must be in 1..num_workers ({self.num_workers}), got {self.min_workers}")
        if self.resize_check_s <= 0:
            raise ValueError("resize_check_s must be > 0")
        if self.group_start_timeout_s is not None and self.group_start_timeout_s <= 0:
            raise ValueError("group_start_timeout_s must be > 0 or null")

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


@dataclasses.dataclass(frozen=True)
class RunSection:
    name: str | None = None  # same name + storage path = same job: a restart resumes it
    # Checkpoints and Ray results; shared storage on a cluster: a path, or a URI such as s3://bucket/runs
    # (a string: a Path would fold the "//" and turn the URI into a local folder named "s3:").
    storage_path: str = "ray_results"
    checkpoints_to_keep: int = 2
    max_failures: int = 2  # worker faults in a row without a new checkpoint between them (launch._start_again)
    keep_best_by: Literal["val_top1", "val_loss"] = "val_top1"
    # Mid-epoch checkpoints (epoch ends always checkpoint): every N optimizer steps and/or every M
    # minutes of training, whichever comes first; null turns a trigger off. With 30 minutes a failure
    # loses at most half an hour of an ImageNet run (an 8-GPU epoch is ~10 min, a big collection's hours).
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float | None = 30.0
    preempt_timeout_s: float = 30.0  # SIGTERM/SIGINT: how long the driver waits for the stop checkpoint

    def __post_init__(self) -> None:
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ValueError("checkpoint_every_steps must be >= 1 or null")
        if self.checkpoint_every_minutes is not None and self.checkpoint_every_minutes <= 0:
            raise ValueError("checkpoint_every_minutes must be > 0 or null")
        if self.preempt_timeout_s <= 0:
            raise ValueError("preempt_timeout_s must be > 0")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '_', '-', '.' (max 128)")
        if self.checkpoints_to_keep < 1:
            raise ValueError("checkpoints_to_keep must be >= 1")
        if self.max_failures < -1:
            raise ValueError("max_failures must be >= 0 (or -1 for unlimited)")


@dataclasses.dataclass(frozen=True)
class TrackingSection:
    enabled: bool = True
    experiment: str = "pipeline"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the cwd
    artifact_location: str | None = None  # for new experiments on the local store; None: ./mlartifacts
    log_model: bool = True
    confusion_matrix: bool = True
    register_model: str | None = None  # registered model name: the final model becomes a new version of it
    system_metrics_interval_s: float = 10.0  # per-node CPU/memory/disk/network/GPU samples; 0 turns them off
    flush_timeout_s: float = 30.0  # at the end, wait at most this long for an unreachable tracking server

    def __post_init__(self) -> None:
        if self.system_metrics_interval_s < 0 or self.flush_timeout_s < 0:
            raise ValueError("system_metrics_interval_s and flush_timeout_s must be >= 0")
        if self.register_model is not None and not self.register_model.strip():
            raise ValueError("register_model must be a non-empty name (or null to not register)")
        if not self.experiment.strip():
            raise ValueError("experiment must be a non-empty name (MLflow's experiment for the job's runs)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The whole resolved training job."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    tracking: TrackingSection = TrackingSection()

    def __post_init__(self) -> None:
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("train.precision fp16 needs scaling.use_gpu: true (GradScaler); use bf16 on CPU")
        # The loader's batches go to the device the model trains on: both on the GPU, or both on the CPU.
        if self.scaling.use_gpu and self.data.device == "cpu":
            raise ValueError("scaling.use_gpu is true but data.device is cpu: set data.device to auto or gpu")
        if not self.scaling.use_gpu and self.data.device == "gpu":
            raise ValueError("data.device is gpu but scaling.use_gpu is false (the model trains on the CPU): "
                             "set scaling.use_gpu=true, or data.device to auto or cpu")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (paths as strings): for YAML artifacts and MLflow params."""
        return to_dict(self)


def resolve_config_path(name_or_path: str) -> Path:
    """A bundled config name (``fashion_mnist``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or os.sep in name_or_path:
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        return p
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        raise UserError(f"unknown config {name_or_path!r}; bundled configs: {', '.join(bundled_configs())} "
                        "(or pass a path to a YAML file)")
    return bundled


def bundled_configs() -> list[str]:
    """Names accepted by ``--config`` without a path."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load, override and validate a config; fills ``run.name`` when the config leaves it empty.

    A generated name is the config's name plus a timestamp, so two plain runs never
    resume each other; pass ``--set run.name=…`` to make a restart resume.
    """
    if name_or_path is not None and not str(name_or_path).strip():
        raise UserError("--config is empty: give a bundled config name or a YAML file (or leave --config out)")
    raw: dict[str, Any] = load_yaml(resolve_config_path(name_or_path)) if name_or_path else {}
    raw = apply_overrides(raw, list(overrides or []))
    cfg = from_dict(TrainConfig, raw)
    if cfg.run.name is None:
        stem = Path(name_or_path).stem if name_or_path else "train"
        name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name))
    return cfg


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from ``TrainConfig.to_dict()`` (what workers and checkpoints carry)."""
    return from_dict(TrainConfig, data)


__all__ = [
    "CONFIG_DIR", "DataConfig", "ModelConfig", "OptimConfig", "RunSection", "ScalingSection", "TrackingSection",
    "TrainConfig", "TrainSection", "bundled_configs", "config_from_dict", "load_config", "resolve_config_path",
]
