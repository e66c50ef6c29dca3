"""Data loaders over ``pipeline shard`` output: ``make_loader`` picks DALI or the torch fallback.

Both backends honour one contract (see ``make_loader``); which samples each rank
reads and the padding rules live in ``pipeline.data.split``, sizes and
normalization in ``pipeline.data.presets``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from pipeline.data.presets import PRESETS, get_preset
from pipeline.data.split import PAD_LABEL, LoaderBase, plan_split
from pipeline.errors import UserError

__all__ = ["PAD_LABEL", "PRESETS", "LoaderOptions", "build_loader", "class_labels", "make_loader"]

BACKENDS = ("auto", "dali", "torch")
DEVICES = ("auto", "gpu", "cpu")


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """Tuning knobs outside the public contract (benchmarks and tests use them)."""

    num_threads: int | None = None  # DALI CPU threads; None = this rank's share of the cores
    num_workers: int | None = None  # torch DataLoader workers; None = this rank's share of the cores
    with_keys: bool = False  # also yield each batch's sample keys (tests, debugging)

    def __post_init__(self) -> None:
        for name in ("num_threads", "num_workers"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "num_threads" else 0):
                raise UserError(f"loader option {name} must be >= {1 if name == 'num_threads' else 0}, got {value}")


def make_loader(shard_dir: str | Path, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                backend: str = "auto", device: str = "auto", preset: str | None = None,
                seed: int = 0, threads: int | None = None, train: bool | None = None) -> LoaderBase:
    """Batches of ``split`` from the shards in ``shard_dir`` for one rank of ``world_size``.

    Returns an iterable of ``(images, labels)``: images NCHW, normalized, float32
    on the CPU / float16 on the GPU, already on the device; labels int64. Every rank
    yields ``len(loader)`` full batches. Train shuffles (``set_epoch`` reseeds) and
    pads with repeats of real samples; val reads in order and pads with label -1
    (``PAD_LABEL``), so summing over ranks counts each val sample exactly once.

    ``rank`` must be the global rank. ``backend``: "auto" (DALI if it loads, else
    torch), "dali" or "torch". ``device``: "auto" (GPU if CUDA is available), "gpu"
    (the current CUDA device) or "cpu". ``preset``: None for index.json's, or one of
    ``PRESETS``. Attributes: ``num_samples``, ``padding``, ``backend``, ``preset``,
    ``num_classes``, ``classes``, ``coverage`` (what the rank read in its current or last pass over the
    loader: ``pipeline.data.coverage``). ``threads``: DALI threads / torch DataLoader workers
    (None: this process's cores divided among the ranks on this node). ``train``: read as training data
    (augment, shuffle, pad with repeats) or as evaluation data; None: training data for the train split only,
    so evaluating the train split (``train=False``) reads it as val is read.
    """
    return build_loader(shard_dir, split, batch_size=batch_size, rank=rank, world_size=world_size,
                        backend=backend, device=device, preset=preset, seed=seed, train=train,
                        options=LoaderOptions(num_threads=threads, num_workers=threads))


def build_loader(shard_dir: str | Path, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 backend: str = "auto", device: str = "auto", preset: str | None = None, seed: int = 0,
                 train: bool | None = None, options: LoaderOptions = LoaderOptions()) -> LoaderBase:
    """``make_loader`` with ``options`` (threads, workers, keys)."""
    from pipeline.shard.manifest import read_manifest

    if backend not in BACKENDS:
        raise UserError(f"unknown loader backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise UserError(f"unknown loader device {device!r}: choose one of {', '.join(DEVICES)}")
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    plan = plan_split(shard_dir, manifest, split, rank=rank, world_size=world_size, batch_size=batch_size)
    spec = get_preset(preset or manifest.get("preset", ""))
    device = _resolve_device(device)
    backend = _resolve_backend(backend)
    common = dict(train=split == "train" if train is None else train, device=device, seed=seed,
                  classes=manifest["classes"],
                  with_keys=options.with_keys)
    cores = _cores_per_rank()
    if backend == "dali":
        from pipeline.data.dali import DaliLoader

        loader: LoaderBase = DaliLoader(plan, spec, num_threads=options.num_threads or cores, **common)
    else:
        from pipeline.data.torch import TorchLoader

        workers = cores if options.num_workers is None else options.num_workers
        loader = TorchLoader(plan, spec, num_workers=workers, **common)
    loader.class_labels = class_labels(manifest)
    return loader


def class_labels(manifest: dict[str, Any]) -> list[str]:
    """Per-class labels for reports: the class id, plus the first of its human names when the shards
    record them (ImageNet: ``n01440764 tench``); the id alone otherwise."""
    names = manifest.get("class_names") or []
    if len(names) != len(manifest["classes"]):
        return list(manifest["classes"])
    return [f"{c} {n.split(',')[0].strip()}" if n and n != c else c for c, n in zip(manifest["classes"], names)]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise UserError("loader device 'gpu' asked for, but CUDA is not available here: use device 'cpu' or 'auto'")
    return device


def _resolve_backend(backend: str) -> str:
    from pipeline.data import dali

    if backend == "auto":
        return "dali" if dali.available() else "torch"
    if backend == "dali" and not dali.available():
        raise UserError("loader backend 'dali' asked for, but nvidia.dali does not import here: "
                        "pip install nvidia-dali-cuda120, or use backend 'torch' or 'auto'")
    return backend


def _cores_per_rank() -> int:
    """This process's CPU share: the cores it may run on, divided among the ranks on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(local_ranks, 1))
