"""The plan: which record goes to which split, in which order, in which shard.

Computed up front from the listing and the seed alone, before any image is read, so
every run (and every resumed run, on any executor) produces the same shards. Shard
sizes use the inputs' stat sizes (or estimates for array sources), not the encoded
output, which is only known after preprocessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.shard.sources import SPLITS, Listing, Record

# Each member costs a 512-byte header plus padding to 512; a sample has three members.
TAR_OVERHEAD_PER_SAMPLE = 3 * 512 + 2 * 512


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """One shard task: its split, position and records in write order."""

    split: str
    index: int
    records: tuple[Record, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"

    @property
    def estimated_bytes(self) -> int:
        return sum(r.size for r in self.records) + TAR_OVERHEAD_PER_SAMPLE * len(self.records)


def assign_splits(listing: Listing, val_fraction: float, seed: int) -> dict[str, list[Record]]:
    """Records per split: the source's own split, or a stratified seeded ``val_fraction`` of each class."""
    if listing.has_splits:
        if val_fraction > 0:
            raise UserError(
                f"--val-fraction conflicts with the val split that {listing.path} already has ({listing.format}); drop it"
            )
        return {s: [r for r in listing.records if r.split == s] for s in SPLITS}
    by_label: dict[int, list[Record]] = {}
    for r in listing.records:
        by_label.setdefault(r.label, []).append(r)
    rng = np.random.default_rng([seed, 1])
    val_keys: set[str] = set()
    for label in sorted(by_label):
        members = by_label[label]
        n_val = int(round(len(members) * val_fraction))
        for i in rng.permutation(len(members))[:n_val]:
            val_keys.add(members[i].key)
    return {
        "train": [r for r in listing.records if r.key not in val_keys],
        "val": [r for r in listing.records if r.key in val_keys],
    }


def make_plan(listing: Listing, *, val_fraction: float, seed: int, samples_per_shard: int, shard_size: int,
              limit: int | None = None) -> list[ShardPlan]:
    """Split, shuffle (seeded, global per split), optionally subsample, and cut into shards.

    A shard closes when it holds ``samples_per_shard`` records or the next record would
    push its estimated size past ``shard_size`` (a single larger record gets a shard alone).
    """
    plans: list[ShardPlan] = []
    for split_no, (split, records) in enumerate(assign_splits(listing, val_fraction, seed).items()):
        # DALI's reader shuffles only within a small buffer, so the global order is fixed here.
        order = np.random.default_rng([seed, 2, split_no]).permutation(len(records))
        shuffled = [records[i] for i in order]
        if limit is not None:
            shuffled = shuffled[:limit]
        current: list[Record] = []
        size = 0
        index = 0  # counted, not recounted from ``plans``: that was quadratic in the shard count
        for r in shuffled:
            cost = r.size + TAR_OVERHEAD_PER_SAMPLE
            if current and (len(current) >= samples_per_shard or size + cost > shard_size):
                plans.append(ShardPlan(split, index, tuple(current)))
                current, size, index = [], 0, index + 1
            current.append(r)
            size += cost
        if current:
            plans.append(ShardPlan(split, index, tuple(current)))
    return plans


def fingerprint(listing: Listing, options: dict[str, Any], plans: list[ShardPlan]) -> str:
    """Hash of everything that decides the output bytes: format, classes, options and the plan.

    Record sizes are in it, so an input file that changed size also changes the fingerprint.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"format": listing.format, "classes": listing.classes, "options": options},
                        sort_keys=True).encode())
    for p in plans:
        h.update(f"\n{p.name}".encode())
        for r in p.records:
            h.update(f"\t{r.key}|{r.label}|{r.size}|{r.source}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
