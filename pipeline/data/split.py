"""Shards → ranks: which samples each rank reads in an epoch, and how many batches it yields.

One rule for both backends, taken from DALI's reader so that the DALI graph and
the torch fallback agree sample for sample:

* An epoch reads the split's shards in one order: manifest order for val, a
  permutation seeded by ``(seed, epoch)`` for train (so ranks see different
  subsets each epoch, and epoch ``k`` is reproducible on its own, e.g. after a
  restart from a checkpoint).
* The shards in that order form one sequence of ``N`` samples; rank ``r`` of
  ``W`` reads the contiguous slice ``[floor(r*N/W), floor((r+1)*N/W))``, which is
  exactly what ``fn.readers.webdataset(shard_id=r, num_shards=W)`` reads.
  Splitting by sample, not by shard, keeps ranks within one sample of each other
  whatever the shard count and sizes.
* Every rank yields ``ceil(ceil(N/W) / B)`` full batches (DALI's
  ``pad_last_batch``): the same count on every rank, because a rank with one
  batch fewer leaves the others blocked in allreduce forever. The slots after a
  rank's real samples are padding: repeats of a real sample, with its real label
  in train and label ``-1`` in val so that evaluation counts every sample once.
  Padding over all ranks is ``W * batches * B - N < W * B``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.coverage import Coverage
from pipeline.data.presets import Preset
from pipeline.errors import UserError
from pipeline.shard.manifest import size_problem

PAD_LABEL = -1  # val padding: cross-entropy ignore_index and metric masks skip it
# Train shuffle window in samples: DALI's reader buffer (initial_fill) and the torch fallback's alike.
SHUFFLE_BUFFER = 1024


@dataclasses.dataclass(frozen=True)
class Shard:
    """One tar of a split and its DALI index."""

    tar: Path
    index: Path
    samples: int


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """The fixed arithmetic of one split on one rank (the epoch only changes the order)."""

    shards: tuple[Shard, ...]  # manifest order
    num_samples: int
    rank: int
    world_size: int
    batch_size: int

    @property
    def batches(self) -> int:
        """Batches per epoch, the same on every rank."""
        return batches_per_rank(self.num_samples, self.world_size, self.batch_size)

    @property
    def padding(self) -> int:
        """Padding samples per epoch over all ranks."""
        return self.world_size * self.batches * self.batch_size - self.num_samples

    @property
    def rank_range(self) -> tuple[int, int]:
        """[start, stop) of this rank's real samples in the epoch's sample sequence."""
        return rank_range(self.num_samples, self.rank, self.world_size)

    @property
    def real_on_rank(self) -> int:
        start, stop = self.rank_range
        return stop - start


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """DALI's contiguous split: rank ``r`` reads ``[floor(r*N/W), floor((r+1)*N/W))``."""
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank yields per epoch: the largest rank slice, rounded up to batches."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def epoch_seed(seed: int, epoch: int, rank: int | None = None) -> int:
    """Seed of one epoch, a function of (seed, epoch) only, or of (seed, epoch, rank) for what each rank
    draws for itself (augmentation); fits DALI's int32 seed argument."""
    entropy = [seed, epoch] if rank is None else [seed, epoch, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def epoch_shards(plan: SplitPlan, *, shuffle: bool, seed: int, epoch: int) -> list[Shard]:
    """Shards in the order an epoch reads them: permuted per epoch when ``shuffle``."""
    shards = list(plan.shards)
    if not shuffle:
        return shards
    order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(len(shards))
    return [shards[i] for i in order]


def check_split(shard_dir: Path, manifest: dict[str, Any], split: str, world_size: int = 1) -> list[dict[str, Any]]:
    """What index.json alone says about reading ``split`` over ``world_size`` ranks (no file is opened): it exists,
    its shards add up, every rank gets a sample. Returns its listed shards that hold samples."""
    splits = manifest.get("splits", {})
    if split not in splits:
        raise UserError(f"{shard_dir}: no split {split!r} in index.json (has: {', '.join(sorted(splits)) or 'none'})")
    entry = splits[split]
    listed = [s for s in entry["shards"] if int(s["samples"]) > 0]
    num_samples = sum(int(s["samples"]) for s in listed)
    if num_samples != int(entry["samples"]):
        raise UserError(f"{shard_dir}/index.json: split {split!r} says {entry['samples']} samples "
                        f"but its shards hold {num_samples}: rebuild the shards")
    if num_samples == 0:
        raise UserError(f"split {split!r} of {shard_dir} has no samples")
    if num_samples < world_size:
        raise UserError(f"split {split!r} of {shard_dir} has {num_samples} samples, fewer than "
                        f"world_size={world_size}: every rank needs at least one")
    return listed


def plan_split(shard_dir: Path, manifest: dict[str, Any], split: str, *, rank: int, world_size: int,
               batch_size: int) -> SplitPlan:
    """Check the request against index.json and return the rank's arithmetic for ``split``."""
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
    listed = check_split(shard_dir, manifest, split, world_size)
    shards = tuple(Shard(tar=shard_dir / s["tar"], index=shard_dir / s["index"], samples=int(s["samples"]))
                   for s in listed)
    num_samples = sum(s.samples for s in shards)
    for entry_shard, shard in zip(listed, shards):
        for p in (shard.tar, shard.index):
            if not p.is_file():
                raise UserError(f"{p} is listed in {shard_dir}/index.json but missing: run `pipeline verify {shard_dir}`")
        problem = size_problem(shard_dir, entry_shard)  # one stat: a cut-short copy is named here, not by the decoder
        if problem:
            raise UserError(problem)
    return SplitPlan(shards=shards, num_samples=num_samples, rank=rank, world_size=world_size,
                     batch_size=batch_size)


# --- random access through the DALI index (used by the torch fallback) -------------------------

@dataclasses.dataclass(frozen=True)
class Member:
    offset: int
    size: int


@lru_cache(maxsize=4096)
def read_index(index_path: Path) -> tuple[tuple[str, dict[str, Member]], ...]:
    """Samples of one ``.idx`` (``wds2idx`` v1.2 format): ``(key, {ext: Member})`` in tar order.

    Each line lists ``ext offset size name`` per member; offsets point at member data,
    so a sample is read with one seek per member and no tar parsing.
    """
    with open(index_path, encoding="utf-8") as f:
        header = f.readline().split()
        if len(header) != 2 or not header[0].startswith("v1."):
            raise UserError(f"{index_path}: not a DALI webdataset index (header {' '.join(header)!r})")
        out = []
        for line in f:
            fields = line.split()
            if not fields:
                continue
            members = {}
            key = ""
            for i in range(0, len(fields), 4):
                ext, offset, size, name = fields[i:i + 4]
                members[ext] = Member(int(offset), int(size))
                key = name[: name.index(".", name.rfind("/") + 1)]
            out.append((key, members))
    if len(out) != int(header[1]):
        raise UserError(f"{index_path}: header says {header[1]} samples, found {len(out)}: rebuild the shards")
    return tuple(out)


def locate(shards: list[Shard], start: int, stop: int) -> list[tuple[Shard, int, int]]:
    """Pieces ``(shard, first, stop)`` of local sample indices that cover positions [start, stop)."""
    pieces = []
    base = 0
    for s in shards:
        lo, hi = max(start, base), min(stop, base + s.samples)
        if lo < hi:
            pieces.append((s, lo - base, hi - base))
        base += s.samples
        if base >= stop:
            break
    return pieces


class LoaderBase:
    """What both backends share: the contract's attributes, ``len`` and ``set_epoch``.

    Iterating yields ``(images, labels)`` (plus a list of sample keys when built
    with ``with_keys``, for tests and debugging).
    """

    backend: str = ""

    def __init__(self, plan: SplitPlan, *, preset: Preset, train: bool, seed: int, classes: list[str],
                 with_keys: bool = False) -> None:
        self.plan = plan
        self.preset = preset.name  # the contract's attribute: the preset's name
        self._preset_def = preset
        self.train = train
        self.seed = seed
        self.classes = list(classes)
        self.class_labels = list(self.classes)  # what reports show; build_loader adds human names it knows
        self.num_classes = len(self.classes)
        self.with_keys = with_keys
        self.epoch = 0
        self.position = 0  # batches of the current epoch handed out so far
        self._resume: dict[str, Any] | None = None  # a saved position the next iteration starts from
        self.coverage = Coverage()  # what this rank read in the current pass (pipeline.data.coverage)

    @property
    def num_samples(self) -> int:
        """Real samples in the split (all ranks)."""
        return self.plan.num_samples

    @property
    def padding(self) -> int:
        """Padding samples per epoch over all ranks: real labels in train, label -1 in val."""
        return self.plan.padding

    def __len__(self) -> int:
        return self.plan.batches

    def set_epoch(self, epoch: int) -> None:
        """Reseed the train shuffle and augmentation for ``epoch`` (val order never changes).

        A position restored with ``load_state_dict`` survives only if it belongs to ``epoch``.
        """
        self.epoch = int(epoch)
        self.position = 0
        if self._resume is not None and self._resume["epoch"] != self.epoch:
            self._resume = None

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is: epoch and batches handed out, plus what the backend needs to continue
        exactly there (DALI's pipeline checkpoint; the torch fallback's worker count)."""
        return {"epoch": self.epoch, "batches": self.position, "rank": self.plan.rank,
                "world_size": self.plan.world_size, "batch_size": self.plan.batch_size,
                "backend": self.backend, **self._backend_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s next batch of its epoch, with the same samples in the same order.

        The position is only meaningful for the same rank, world size, batch size and backend;
        anything else raises ``ValueError`` (the caller restarts the epoch instead).
        """
        mine = (self.plan.rank, self.plan.world_size, self.plan.batch_size, self.backend)
        saved = (state.get("rank"), state.get("world_size"), state.get("batch_size"), state.get("backend"))
        if saved != mine:
            raise ValueError(f"loader position saved as rank/world/batch/backend {saved}, this loader is {mine}")
        self.epoch = int(state["epoch"])
        self.position = int(state["batches"])
        self._resume = dict(state) if self.position > 0 else None

    def forget_position(self) -> None:
        """Drop a position restored with ``load_state_dict``: the epoch starts from its first batch."""
        self._resume = None
        self.position = 0

    def _backend_state(self) -> dict[str, Any]:
        return {}

    def _take_resume(self) -> tuple[int, dict[str, Any]]:
        """(first batch, saved state) for the iteration starting now; the saved position is used once."""
        resume, self._resume = self._resume or {}, None
        self.position = int(resume.get("batches", 0))
        self.coverage.reset(self.epoch, self.position)
        return self.position, resume

    def __repr__(self) -> str:
        p = self.plan
        return (f"{type(self).__name__}(preset={self.preset!r}, train={self.train}, rank={p.rank}/{p.world_size}, "
                f"batch_size={p.batch_size}, batches={len(self)}, samples={p.num_samples}, padding={p.padding})")
