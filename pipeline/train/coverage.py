"""Every rank's record of the training samples it read in an epoch, gathered and logged by rank 0.

One small artifact per epoch, ``coverage/epoch-<n>.json``: for each world rank the
count of samples it took, its distinct keys and their XOR / sum digests
(``pipeline.data.coverage``), and the keys themselves on test-sized splits. With
them a reader checks that the ranks together read every training sample once.
"""

from __future__ import annotations

from typing import Any


def log_coverage(tracker: Any, epoch: int, loader: Any) -> None:
    """Gather ``loader.coverage`` from every rank (a collective: call it on all) and log it as epoch ``epoch``."""
    import torch.distributed as dist

    mine = {"rank": loader.plan.rank, **loader.coverage.summary()}
    del mine["epoch"]  # the loader's count from 0; the file says which epoch, counted from 1
    ranks = [mine]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    tracker.log_dict({"epoch": epoch, "split_samples": loader.num_samples, "ranks": ranks},
                     f"coverage/epoch-{epoch:04d}.json")


__all__ = ["log_coverage"]
