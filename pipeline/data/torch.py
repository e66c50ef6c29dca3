"""PyTorch fallback: a webdataset pipeline, torchvision transforms v2 and a DataLoader.

For platforms where DALI does not install. It honours the same contract and reads
the same samples as the DALI backend (``pipeline.data.split``):

* node splitting: rank ``r`` takes its contiguous slice of the epoch's sample
  sequence, by sample rather than by shard, so ranks differ by at most one sample
  and all yield the same number of full batches;
* worker splitting: the rank's batches are divided among DataLoader workers in
  contiguous runs of whole batches, so no worker ends on a partial batch and
  ``len()`` holds exactly;
* samples are fetched through the ``.idx`` offsets (one seek per member, no tar
  parsing, no skipping through a shard to reach a rank's first sample), shuffled
  in a window of ``SHUFFLE_BUFFER`` samples like DALI's reader, decoded with
  Pillow (libjpeg-turbo / libpng; torchvision.io's decoders are deprecated since
  torchvision 0.29) and augmented with transforms v2 built from the shared presets.

On a GPU the workers hand over uint8 batches; they are pinned, copied with
``non_blocking=True`` and normalized on the GPU in float16 (a quarter of the
bytes over PCIe, and no float work on the CPU). On the CPU workers normalize to
float32 themselves.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from PIL import Image
from torchvision.transforms import v2

from pipeline.data.presets import Preset
from pipeline.data.split import (PAD_LABEL, SHUFFLE_BUFFER, LoaderBase, Shard, SplitPlan, epoch_seed, epoch_shards,
                                 locate, read_index)

log = logging.getLogger(__name__)
# Shard files a reader keeps open at once (the oldest is closed first): reads follow the shuffle
# window, which touches a few shards at the default size, so this bounds descriptors, not speed.
MAX_OPEN_SHARDS = 64


def build_transform(preset: Preset, *, train: bool) -> v2.Transform:
    """Geometric transforms of one uint8 CHW image (normalization is batched, see ``normalize``)."""
    size = preset.size
    steps: list[v2.Transform] = []
    if train and preset.train_augment == "random_resized_crop":
        steps.append(v2.RandomResizedCrop(size, scale=preset.scale, ratio=preset.ratio, antialias=True))
    elif preset.val_resize == size:
        steps.append(v2.Resize((size, size), antialias=True))
    else:
        steps += [v2.Resize(preset.val_resize, antialias=True), v2.CenterCrop(size)]
    if train and preset.train_augment == "pad_crop":
        steps.append(v2.RandomCrop(size, padding=preset.pad, fill=0))
    if train and preset.flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def normalize(images: torch.Tensor, preset: Preset, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NCHW → normalized ``dtype`` NCHW, on whatever device ``images`` lives."""
    mean = torch.tensor(preset.mean_255, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    inv_std = (1.0 / torch.tensor(preset.std_255, device=images.device, dtype=torch.float32)).view(1, -1, 1, 1)
    return ((images.float() - mean) * inv_std).to(dtype)


class _RankStream(IterableDataset):
    """One epoch of one rank, as full batches; each DataLoader worker yields its own run of batches."""

    def __init__(self, plan: SplitPlan, preset: Preset, *, train: bool, seed: int, epoch: int,
                 normalize_in_worker: bool, with_keys: bool, skip: tuple[int, ...] = (),
                 rotate: int = 0) -> None:
        super().__init__()
        self.plan, self.preset, self.train = plan, preset, train
        self.seed, self.epoch = seed, epoch
        self.skip = skip  # batches each worker already handed out this epoch (a resumed epoch)
        self.rotate = rotate  # which worker's turn it is first (the DataLoader always starts with its worker 0)
        self.normalize_in_worker = normalize_in_worker
        self.with_keys = with_keys
        self.transform = build_transform(preset, train=train)
        self.mode = "RGB" if preset.channels == 3 else "L"
        self._files: dict[Path, Any] = {}

    def worker(self) -> tuple[int, int]:
        """(this worker's place in the epoch's batch order, workers)."""
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.rotate) % info.num_workers, info.num_workers

    # --- stages, in pipeline order ---------------------------------------------------------

    def split_by_rank_and_worker(self) -> Iterator[tuple[Shard, int, bool, int]]:
        """Records ``(shard, index in shard, is_padding, position)`` this worker reads, in sequence order."""
        worker, workers = self.worker()
        batches, size = self.plan.batches, self.plan.batch_size
        first, last = batches * worker // workers * size, batches * (worker + 1) // workers * size
        start, stop = self.plan.rank_range
        real = stop - start
        shards = epoch_shards(self.plan, shuffle=self.train, seed=self.seed, epoch=self.epoch)
        position = first
        for shard, lo, hi in locate(shards, start + first, start + min(last, real)):
            for i in range(lo, hi):
                yield shard, i, False, position
                position += 1
        if last > real:
            # Padding repeats the rank's last real sample, as DALI's pad_last_batch does.
            (shard, lo, hi), = locate(shards, stop - 1, stop)
            for _ in range(last - max(first, real)):
                yield shard, lo, True, position
                position += 1

    def skip_consumed(self, records: Iterator[Any]) -> Iterator[Any]:
        """Drop the records of batches already trained on, after the shuffle and before any decoding."""
        worker = self.worker()[0]
        skip = self.skip[worker] * self.plan.batch_size if self.skip else 0
        return itertools.islice(records, skip, None)

    def load(self, record: tuple[Shard, int, bool, int]) -> dict[str, Any]:
        """Read, decode and transform one sample; errors name the shard and key."""
        shard, i, pad, position = record
        key, members = read_index(shard.index)[i]
        try:
            data = self._read(shard.tar, members["jpg"] if "jpg" in members else members["png"])
            label = int(self._read(shard.tar, members["cls"]))
            with Image.open(io.BytesIO(data)) as im:
                pixels = np.array(im.convert(self.mode))  # a writable copy: torch.from_numpy needs one
        except (KeyError, ValueError, SyntaxError, OSError) as exc:  # SyntaxError: Pillow's bad-header error
            log.error("cannot load sample %s of %s: %s", key, shard.tar, exc)
            raise RuntimeError(f"cannot load sample {key} of {shard.tar}: {exc}") from exc
        image = torch.from_numpy(pixels).permute(2, 0, 1) if pixels.ndim == 3 else torch.from_numpy(pixels)[None]
        if self.train:
            # Each sample's augmentation is seeded by its place in the epoch, so a resumed epoch
            # that skips its first batches still crops and flips the rest exactly as before.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((epoch_seed(self.seed, self.epoch) << 24) + (self.plan.rank << 40) + position)
                image = self.transform(image)
        else:
            image = self.transform(image)
        return {"image": image, "label": PAD_LABEL if pad and not self.train else label, "key": key}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = torch.stack([s["image"] for s in samples])
        if self.normalize_in_worker:
            images = normalize(images, self.preset, torch.float32)
        return {"images": images, "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
                "keys": [s["key"] for s in samples]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = self.worker()[0]
        stages: list[Any] = [self.split_by_rank_and_worker]
        if self.train:
            rng = random.Random(int(np.random.SeedSequence([self.seed, self.epoch, self.plan.rank, worker])
                                    .generate_state(1)[0]))
            # Records are shuffled before loading: the window costs pointers, not decoded images.
            stages.append(wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=rng))
        stages += [self.skip_consumed, wds.map(self.load), wds.batched(self.plan.batch_size, collation_fn=self.collate, partial=False)]
        try:
            yield from wds.DataPipeline(*stages)
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def _read(self, tar: Path, member: Any) -> bytes:
        f = self._files.get(tar)
        if f is None:
            if len(self._files) >= MAX_OPEN_SHARDS:
                # Bounded: with thousands of shards per rank, one handle each would pass `ulimit -n`.
                self._files.pop(next(iter(self._files))).close()
            f = self._files[tar] = open(tar, "rb")  # noqa: SIM115 - kept open for the epoch, closed in __iter__
        f.seek(member.offset)
        data = f.read(member.size)
        if len(data) != member.size:
            raise OSError(f"truncated member at offset {member.offset}")
        return data


class TorchLoader(LoaderBase):
    """Batches of one split on one rank from a DataLoader over ``_RankStream``."""

    backend = "torch"

    def __init__(self, plan: SplitPlan, preset: Preset, *, train: bool, device: str, seed: int,
                 classes: list[str], num_workers: int, with_keys: bool = False) -> None:
        super().__init__(plan, preset=preset, train=train, seed=seed, classes=classes,
                         with_keys=with_keys)
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "gpu" else torch.device("cpu")
        # More workers than batches would leave some idle with nothing to yield.
        self.num_workers = min(num_workers, plan.batches)
        self._epoch_workers: int | None = None  # the workers the epoch in progress runs with

    def _backend_state(self) -> dict[str, Any]:
        # The worker split fixes each worker's shuffle: the count this epoch runs with, which is the saved
        # one when the epoch was resumed (the configured count may have changed since).
        return {"num_workers": self._epoch_workers or self.num_workers}

    def __iter__(self) -> Iterator[tuple]:
        gpu = self.device.type == "cuda"
        first, resume = self._take_resume()
        workers = self._epoch_workers = int(resume.get("num_workers", self.num_workers))
        stream = _RankStream(self.plan, self._preset_def, train=self.train, seed=self.seed, epoch=self.epoch,
                             normalize_in_worker=not gpu, with_keys=self.with_keys,
                             **_resume_split(first, self.plan.batches, max(workers, 1)))
        # A seeded generator makes the workers' seeds a function of (seed, epoch).
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=gpu,
                            generator=generator, prefetch_factor=2 if workers else None)
        count = first
        for batch in loader:
            images, labels = batch["images"], batch["labels"]
            if gpu:
                # Pinned source + non_blocking: the copies overlap compute; no host sync here.
                images = normalize(images.to(self.device, non_blocking=True), self._preset_def, torch.float16)
                labels = labels.to(self.device, non_blocking=True)
            count += 1
            self.position = count
            yield (images, labels, batch["keys"]) if self.with_keys else (images, labels)
            self.coverage.add(batch["keys"])  # the consumer came back: the batch was taken
        assert count == self.plan.batches, (count, self.plan.batches)


def _resume_split(consumed: int, batches: int, workers: int) -> dict[str, Any]:
    """Batches each DataLoader worker had handed out once ``consumed`` batches came out of the loader,
    and whose turn is next.

    Worker ``w`` owns the contiguous run ``[batches*w//workers, batches*(w+1)//workers)`` and the
    DataLoader takes one batch from each worker in turn (workers that ran dry drop out of the turn).
    """
    counts = [batches * (w + 1) // workers - batches * w // workers for w in range(workers)]
    taken = [0] * workers
    turn = 0
    for _ in range(min(consumed, batches)):
        while taken[turn] >= counts[turn]:
            turn = (turn + 1) % workers
        taken[turn] += 1
        turn = (turn + 1) % workers
    return {"skip": tuple(taken), "rotate": turn}
