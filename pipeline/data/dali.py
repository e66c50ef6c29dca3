"""DALI backend: ``fn.readers.webdataset`` over the shards, decode and augment in one graph.

On a GPU the JPEG decode runs on nvJPEG (``device="mixed"``, ROI decode for the
train crop) and every later operator on the GPU; without one the same graph runs
on CPU operators (``device_id=None``). Which samples a rank reads and how many
batches it yields follow ``pipeline.data.split`` (DALI's own ``shard_id`` /
``num_shards`` arithmetic, with ``pad_last_batch``).

DALI fixes a pipeline's seed when it is built, so a train epoch gets its own
pipeline seeded by ``(seed, epoch)``, and its own shard order. Building one
costs about 50 ms plus parsing the index files (measured on a 2-core VM with a
handful of shards); it happens once per epoch, when iteration starts.

``nvidia.dali`` is imported lazily: importing ``pipeline.data`` never needs it.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.data.presets import Preset
from pipeline.data.split import (PAD_LABEL, SHUFFLE_BUFFER, LoaderBase, Shard, SplitPlan, epoch_seed, epoch_shards,
                                 locate, read_index)

log = logging.getLogger(__name__)

_CLS_WIDTH = 8  # digits a ``.cls`` member may have (labels below 10**8)


def available() -> bool:
    """Whether DALI imports and its CPU operators load on this platform."""
    try:
        import nvidia.dali.fn  # noqa: F401
    except (ImportError, OSError):  # OSError: wheel present but its shared libraries do not load
        return False
    return True


class DaliLoader(LoaderBase):
    """Batches of one split on one rank, produced by a DALI pipeline (CPU or GPU)."""

    backend = "dali"

    def __init__(self, plan: SplitPlan, preset: Preset, *, train: bool, device: str, seed: int,
                 classes: list[str], num_threads: int, with_keys: bool = False) -> None:
        super().__init__(plan, preset=preset, train=train, seed=seed, classes=classes,
                         with_keys=with_keys)
        self.device = device  # "cpu" | "gpu"
        self.num_threads = num_threads
        self._it: Any = None

    def _epoch_shards(self) -> list[Shard]:
        return epoch_shards(self.plan, shuffle=self.train, seed=self.seed, epoch=self.epoch)

    def _backend_state(self) -> dict[str, Any]:
        # The pipeline checkpoint holds the reader's position and every random operator's state;
        # before the first and after the last batch, (epoch, batches) says it all.
        # An epoch left mid-way (``train.max_steps_per_epoch``) has no pipeline left to checkpoint: its
        # position is not one to resume from, and the loop never does (the epoch ended there).
        if self._it is None or not 0 < self.position < self.plan.batches:
            return {}
        return {"dali": self._it.checkpoints()[0]}

    def _build(self, checkpoint: str | None = None) -> Any:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        shards = self._epoch_shards()
        device_id = torch.cuda.current_device() if self.device == "gpu" else None
        pipe = dali_pipeline(
            paths=[str(s.tar) for s in shards],
            index_paths=[str(s.index) for s in shards],
            preset=self._preset_def,
            train=self.train,
            gpu=self.device == "gpu",
            shard_id=self.plan.rank,  # the global rank: a local rank would make every node read the same data
            num_shards=self.plan.world_size,
            with_keys=True,  # the keys feed the coverage record (pipeline.data.coverage)
            batch_size=self.plan.batch_size,
            num_threads=self.num_threads,
            device_id=device_id,
            # The rank too: with one seed every rank would draw the same crops and flips in the same order.
            seed=epoch_seed(self.seed, self.epoch, self.plan.rank),
            checkpoint=checkpoint,
        )
        outputs = ["images", "labels", "keys"]
        # FILL with pad_last_batch: full batches only, ceil(ceil(N/W)/B) of them on every rank.
        it = DALIGenericIterator([pipe], outputs, reader_name="Reader", last_batch_policy=LastBatchPolicy.FILL,
                                 auto_reset=False)
        assert len(it) == self.plan.batches, (len(it), self.plan.batches)
        return it

    def __iter__(self) -> Iterator[tuple]:
        first, resume = self._take_resume()
        it = self._it = self._build(resume.get("dali"))
        batch = self.plan.batch_size
        real = self.plan.real_on_rank
        try:
            for j in range(first, self.plan.batches):
                try:
                    out = next(it)[0]
                except RuntimeError as exc:
                    # DALI's decoder errors do not say which sample failed; find it, since shards
                    # are verified at build time and a bad sample is a fault worth naming.
                    culprit = _find_undecodable(self._epoch_shards(), *self.plan.rank_range)
                    where = self.plan.shards[0].tar.parent
                    msg = (f"DALI failed on rank {self.plan.rank} reading {where}: {culprit or 'sample not found'}; "
                           f"run `pipeline verify {where}`")
                    log.error("%s\n%s", msg, exc)
                    raise RuntimeError(f"{msg}\n{exc}") from exc
                images, labels = out["images"], out["labels"].view(-1)
                if not self.train and (j + 1) * batch > real:
                    # Val is read in order, so the slots past this rank's real samples are
                    # pad_last_batch repeats: mark them so metrics count every sample once.
                    labels[max(real - j * batch, 0):] = PAD_LABEL
                self.position = j + 1
                keys = _keys(out["keys"])
                yield (images, labels, keys) if self.with_keys else (images, labels)
                self.coverage.add(keys)  # the consumer came back: the batch was taken
        finally:
            self._it = None
            del it  # frees the pipeline's threads and buffers before the next epoch builds its own


def _find_undecodable(shards: list[Shard], start: int, stop: int, budget_s: float = 60.0) -> str | None:
    """``"sample KEY of TAR: reason"`` for the first of positions [start, stop) Pillow cannot decode."""
    import io
    import time

    from PIL import Image

    deadline = time.monotonic() + budget_s
    for shard, lo, hi in locate(shards, start, stop):
        samples = read_index(shard.index)
        with open(shard.tar, "rb") as f:
            for key, members in samples[lo:hi]:
                if time.monotonic() > deadline:
                    return None
                member = members.get("jpg") or members.get("png")
                if member is None:
                    return f"sample {key} of {shard.tar}: no jpg or png member"
                f.seek(member.offset)
                try:
                    with Image.open(io.BytesIO(f.read(member.size))) as im:
                        im.load()
                except (OSError, ValueError, SyntaxError) as exc:  # what Pillow raises for bad image data
                    return f"sample {key} of {shard.tar}: {exc}"
    return None


def _keys(info: torch.Tensor) -> list[str]:
    """Sample keys from zero-padded ``source_info`` bytes ``<tar>:<offset>:<key>.<ext>``."""
    out = []
    for row in info.cpu().numpy():
        name = bytes(row).rstrip(b"\0").decode().rsplit(":", 1)[-1]
        out.append(name[: name.index(".")])
    return out


def _parse_cls(cls: Any) -> Any:
    """ASCII decimal ``.cls`` bytes → int64 label, inside the graph (no per-sample Python)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    digits = fn.cast(fn.pad(cls, axes=(0,), shape=(_CLS_WIDTH,), fill_value=0), dtype=types.INT32)
    present = digits > 0
    count = fn.reductions.sum(fn.cast(present, dtype=types.INT32))
    position = types.Constant(np.arange(_CLS_WIDTH, dtype=np.int32))
    # digit i of n is worth 10**(n-1-i); padding slots are masked to 0. float32 is exact below 2**24.
    weight = dmath.pow(10.0, fn.cast(count - 1 - position, dtype=types.FLOAT)) * present
    value = fn.reductions.sum(fn.cast((digits - 48) * present, dtype=types.FLOAT) * weight)
    return fn.cast(value, dtype=types.INT64)


# NVIDIA's ResNet-50 example pre-sizes nvJPEG's buffers with these, for its 4 decoder threads per GPU;
# DALI's own defaults (16 MB, 8 MB) are the floor per thread.
_NVJPEG_DEVICE_PADDING, _NVJPEG_HOST_PADDING, _NVJPEG_THREADS = 211025920, 140544512, 4
_NVJPEG_MIN_DEVICE_PADDING, _NVJPEG_MIN_HOST_PADDING = 16 << 20, 8 << 20


def nvjpeg_padding(num_threads: int) -> dict[str, int]:
    """The ``mixed`` decoder's buffer pre-sizes for ``num_threads``: NVIDIA's ResNet-50 values (they avoid
    reallocations in the first epochs), split over the threads beyond 4. DALI allocates them per thread
    (one GPU buffer and two pinned host buffers each), so 16 threads at NVIDIA's values would pin 4.2 GiB of
    host memory per pipeline, on every rank of the node; split, a pipeline stays at NVIDIA's 4-thread total
    (0.8 GiB of GPU memory, 1.1 GiB pinned) until DALI's per-thread defaults take over. A buffer that turns
    out too small is grown by nvJPEG when a larger image comes."""
    share = _NVJPEG_THREADS / max(num_threads, _NVJPEG_THREADS)
    return {"device_memory_padding": max(int(_NVJPEG_DEVICE_PADDING * share), _NVJPEG_MIN_DEVICE_PADDING),
            "host_memory_padding": max(int(_NVJPEG_HOST_PADDING * share), _NVJPEG_MIN_HOST_PADDING)}


def dali_pipeline(*, paths: list[str], index_paths: list[str], preset: Preset, train: bool, gpu: bool,
                  shard_id: int, num_shards: int, with_keys: bool, batch_size: int, num_threads: int,
                  device_id: int | None, seed: int, checkpoint: bytes | None = None) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=False)
    def graph():
        encoded, cls = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=["jpg;png", "cls"], missing_component_behavior="error",
            shard_id=shard_id, num_shards=num_shards, random_shuffle=train, initial_fill=SHUFFLE_BUFFER,
            pad_last_batch=True, stick_to_shard=True, name="Reader")
        labels = _parse_cls(cls)
        rgb = preset.channels == 3
        out_type = types.RGB if rgb else types.GRAY
        decoder = "mixed" if gpu else "cpu"
        gpu_args = nvjpeg_padding(num_threads) if gpu else {}
        size = preset.size
        crop_args: dict[str, Any] = {}
        if train and preset.train_augment == "random_resized_crop":
            # ROI decode: only the crop window's blocks are decoded.
            # EXIF orientation is ignored, as by Pillow (the torch fallback) and torchvision's ImageNet recipe.
            images = fn.decoders.image_random_crop(
                encoded, device=decoder, output_type=out_type, adjust_orientation=False,
                random_area=list(preset.scale), random_aspect_ratio=list(preset.ratio), num_attempts=10, **gpu_args)
            images = fn.resize(images, resize_x=size, resize_y=size)
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=out_type, adjust_orientation=False,
                                       **gpu_args)
            if preset.val_resize == size:
                images = fn.resize(images, resize_x=size, resize_y=size)
            else:
                images = fn.resize(images, resize_shorter=preset.val_resize)
                crop_args = {"crop": (size, size)}  # center crop
            if train and preset.train_augment == "pad_crop":
                # A crop larger than the image, centered, adds `pad` zeros on each side;
                # the normalize step then cuts a random size x size window out of it.
                padded = size + 2 * preset.pad
                images = fn.crop(images, crop=(padded, padded), out_of_bounds_policy="pad", fill_values=0)
                # Whole-pixel offsets 0..2*pad, each as likely (a continuous position, rounded, would
                # draw the two edge offsets half as often), as torchvision's RandomCrop does.
                offsets = [i / (2 * preset.pad) for i in range(2 * preset.pad + 1)]
                crop_args = {"crop": (size, size), "crop_pos_x": fn.random.uniform(values=offsets),
                             "crop_pos_y": fn.random.uniform(values=offsets)}
        mirror = fn.random.coin_flip(probability=0.5) if train and preset.flip else 0
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT16 if gpu else types.FLOAT, output_layout="CHW",
            mean=list(preset.mean_255), std=list(preset.std_255), mirror=mirror, **crop_args)
        if gpu:
            labels = labels.gpu()
        if with_keys:
            info = fn.pad(fn.get_property(cls, key="source_info"), axes=(0,), fill_value=0)
            return images, labels, info
        return images, labels

    # Checkpointing records the reader's position and every operator's RNG state per iteration.
    return graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=2, enable_checkpointing=True, checkpoint=checkpoint)
