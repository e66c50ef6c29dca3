"""pipeline.data.coverage: each loader records the keys its rank actually took in an epoch (DALI and torch).

Keys are read back from the tar files, independently of the loaders; uneven shards
(7 samples per shard, 26 train samples over 2 ranks of batch 4) leave padding.
"""

from __future__ import annotations

import tarfile
from functools import reduce
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data import LoaderOptions, build_loader
from pipeline.data.coverage import digest
from conftest import make_label_folder

import nvidia.dali  # noqa: F401,E402 - a hard dependency: a broken install fails here

CLASSES = [f"class{i:02d}" for i in range(4)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cov")
    src = make_label_folder(root / "src", CLASSES, [10, 10, 9, 8])
    out = root / "shards"
    assert main(["shard", str(src), str(out), "--val-fraction", "0.3", "--samples-per-shard", "7",
                 "--workers", "1", "--no-progress"]) == 0
    return out


def _tar_keys(shard_dir: Path, split: str) -> set[str]:
    keys = set()
    for tar in sorted(shard_dir.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as tf:
            keys.update(m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".cls"))
    return keys


def _loader(shards: Path, backend: str, rank: int, world: int = 2):
    return build_loader(shards, "train", batch_size=4, rank=rank, world_size=world, backend=backend, device="cpu",
                        seed=3, options=LoaderOptions(num_threads=1, num_workers=0))


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_ranks_record_disjoint_keys_that_cover_the_split(shards, backend):
    expected = _tar_keys(shards, "train")
    records = []
    for rank in range(2):
        loader = _loader(shards, backend, rank)
        loader.set_epoch(1)
        assert sum(1 for _ in loader) == len(loader)
        records.append(loader.coverage.summary())
    a, b = (set(r["keys"]) for r in records)
    assert not a & b and a | b == expected
    for r in records:
        assert r["epoch"] == 1 and r["from_batch"] == 0
        assert r["samples"] == len(loader) * 4 >= r["distinct"]  # padding repeats a real sample
        assert {k: r[k] for k in ("distinct", "xor", "sum")} == digest(r["keys"])
    # The digests alone tell the same: counts add up, XORs and sums combine to the split's.
    whole = digest(expected)
    assert sum(r["distinct"] for r in records) == whole["distinct"] == len(expected)
    assert f"{reduce(lambda x, y: x ^ y, (int(r['xor'], 16) for r in records)):016x}" == whole["xor"]
    assert f"{sum(int(r['sum'], 16) for r in records) % 2**64:016x}" == whole["sum"]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_batch_counts_once_it_was_taken(shards, backend):
    loader = _loader(shards, backend, 0, world=1)
    loader.set_epoch(0)
    for i, _ in enumerate(loader):
        if i == 2:  # a loop that stops after training 2 batches (max_steps_per_epoch)
            break
    record = loader.coverage.summary()
    # Padding may be shuffled into the first batches (torch): distinct keys, not samples, may be fewer.
    assert record["samples"] == 8 and 0 < record["distinct"] == len(record["keys"]) <= 8
    assert set(record["keys"]) <= _tar_keys(shards, "train")
