"""What one rank actually read in an epoch: sample count, distinct keys and order-independent key digests.

Each backend hands every batch's ``__key__`` values to ``Coverage.add`` once the
consumer has come back for the next batch (so a batch counts when it was taken,
and a loop that stops early does not count the batch it never trained on). The
digests are the XOR and the sum (mod 2**64) of a 64-bit hash of each distinct
key: they do not depend on the order of reading, so the ranks' records of an
epoch tile the split exactly when their distinct counts add up to the split's
size and their digests combine (XOR of XORs, sum of sums) to the digests of the
split's keys (``digest``). Padding repeats a real sample: it counts in
``samples``, not in ``distinct``. A rank keeps its keys themselves only up to
``KEYS_KEPT`` per epoch (test-sized data); an ImageNet rank keeps 8 bytes per
sample for the distinct count, and logs only the figures.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import numpy as np

KEYS_KEPT = 4096  # up to this many distinct keys per rank and epoch, the record lists them


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a sample key (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def digest(keys: Iterable[str]) -> dict[str, Any]:
    """``distinct``, ``xor`` and ``sum`` of a set of keys, as ``Coverage.summary`` gives them."""
    return _figures(np.fromiter((key_hash(k) for k in set(keys)), dtype=np.uint64))


def _figures(hashes: np.ndarray) -> dict[str, Any]:
    xor = int(np.bitwise_xor.reduce(hashes)) if hashes.size else 0
    return {"distinct": int(hashes.size), "xor": f"{xor:016x}", "sum": f"{int(hashes.sum(dtype=np.uint64)):016x}"}


class Coverage:
    """One rank's record of the epoch being read; ``reset`` at the start of each pass over the loader."""

    def __init__(self) -> None:
        self.reset(0, 0)

    def reset(self, epoch: int, first_batch: int) -> None:
        """A new pass over ``epoch`` from ``first_batch`` (not 0 when a resumed epoch skips what it had read)."""
        self.epoch, self.from_batch = epoch, first_batch
        self.samples = 0
        self._hashes: list[np.ndarray] = []
        self._keys: set[str] | None = set()

    def add(self, keys: list[str]) -> None:
        """The keys of one batch, padding included."""
        self.samples += len(keys)
        self._hashes.append(np.fromiter((key_hash(k) for k in keys), dtype=np.uint64, count=len(keys)))
        if self._keys is not None:
            self._keys.update(keys)
            if len(self._keys) > KEYS_KEPT:
                self._keys = None

    def summary(self) -> dict[str, Any]:
        """``epoch``, ``from_batch``, ``samples``, ``distinct``, ``xor``, ``sum`` (and ``keys`` when few)."""
        hashes = np.unique(np.concatenate(self._hashes)) if self._hashes else np.empty(0, dtype=np.uint64)
        out = {"epoch": self.epoch, "from_batch": self.from_batch, "samples": self.samples, **_figures(hashes)}
        if self._keys is not None:
            out["keys"] = sorted(self._keys)
        return out


__all__ = ["KEYS_KEPT", "Coverage", "digest", "key_hash"]
