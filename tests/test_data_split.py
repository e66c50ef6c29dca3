"""Rank arithmetic of pipeline.data.split: equal batches, bounded padding, DALI's split rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.split import (Shard, SplitPlan, batches_per_rank, epoch_seed, epoch_shards, locate, rank_range)


def _dali_shard_sizes(n: int, w: int) -> list[int]:
    # The formula of nvidia.dali.plugin.base_iterator._calculate_shard_sizes, in floats as DALI computes it.
    ids = np.arange(w)
    return list((np.floor((ids + 1) * n / w) - np.floor(ids * n / w)).astype(int))


@pytest.mark.parametrize(("n", "w"), [(n, w) for n in (1, 7, 23, 100, 1001) for w in (1, 2, 3, 8) if n >= w])
@pytest.mark.parametrize("b", [1, 4, 32])
def test_ranks_cover_split_with_equal_batches_and_bounded_padding(n: int, w: int, b: int) -> None:
    ranges = [rank_range(n, r, w) for r in range(w)]
    assert [hi - lo for lo, hi in ranges] == _dali_shard_sizes(n, w)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(ranges[r][1] == ranges[r + 1][0] for r in range(w - 1))  # contiguous, no overlap
    batches = batches_per_rank(n, w, b)
    assert all(batches * b >= hi - lo for lo, hi in ranges)  # every real sample fits
    assert (batches - 1) * b < max(hi - lo for lo, hi in ranges)  # no all-padding batch on the largest rank
    plan = SplitPlan(shards=(), num_samples=n, rank=0, world_size=w, batch_size=b)
    assert plan.padding == w * batches * b - n
    assert 0 <= plan.padding < w * b


def test_epoch_order_is_a_seeded_permutation() -> None:
    shards = tuple(Shard(Path(f"t{i}.tar"), Path(f"t{i}.idx"), 5) for i in range(20))
    plan = SplitPlan(shards=shards, num_samples=100, rank=0, world_size=1, batch_size=4)
    e0 = epoch_shards(plan, shuffle=True, seed=0, epoch=0)
    assert sorted(e0, key=lambda s: s.tar) == sorted(shards, key=lambda s: s.tar)
    assert e0 == epoch_shards(plan, shuffle=True, seed=0, epoch=0)
    assert e0 != epoch_shards(plan, shuffle=True, seed=0, epoch=1)
    assert e0 != epoch_shards(plan, shuffle=True, seed=1, epoch=0)
    assert epoch_shards(plan, shuffle=False, seed=0, epoch=3) == list(shards)
    assert 0 <= epoch_seed(2**40, 10**6) < 2**31


def test_locate_maps_positions_to_shard_slices() -> None:
    shards = [Shard(Path(f"t{i}.tar"), Path(f"t{i}.idx"), n) for i, n in enumerate([3, 5, 2])]
    assert [(s.tar.name, lo, hi) for s, lo, hi in locate(shards, 2, 9)] == [
        ("t0.tar", 2, 3), ("t1.tar", 0, 5), ("t2.tar", 0, 1)]
    assert sum(hi - lo for _, lo, hi in locate(shards, 0, 10)) == 10
    assert locate(shards, 4, 4) == []
