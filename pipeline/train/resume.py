"""Which checkpoint a starting worker group resumes from: the newest complete one, wherever it is registered.

Ray Train hands a restarted worker group the latest checkpoint its controller has
*registered* (``ray.train.get_checkpoint()``). The controller registers a report
only after it has polled every rank's copy of it (every couple of seconds), but
each rank uploads its files into the job's ``checkpoint_*`` directory before that.
A node lost between the upload and the poll leaves a checkpoint that is complete
on storage and unknown to the controller: the group would start over from the
previous one (after the first epoch: from scratch) and train those epochs twice.

So rank 0 also lists the job's ``checkpoint_*`` directories on its storage (a
shared filesystem or object storage, through pyarrow), keeps those that are
complete (``meta.json`` readable; ``state.pt`` and a ``rank-<r>.pt`` for each rank
of the world that wrote it, each a whole zip archive, as ``torch.save`` writes
them: a file cut short by a lost node has no end record), takes the newest by
global step, and broadcasts its choice so every rank loads the same one. An epoch
whose checkpoint made it to storage but whose figures never reached MLflow is logged
from the checkpoint's ``meta.json`` (``log_missed_epoch``): no epoch trained twice,
none missing from the run.
"""

from __future__ import annotations

import json
import zipfile
from typing import Any

from pipeline.train.checkpoint import META_FILE, STATE_FILE
from pipeline.train.state import RANK_FILE

PREFIX = "checkpoint_"


def resume_checkpoint(storage_dir: str, registered=None):
    """The checkpoint every rank of this group starts from (a ``ray.train.Checkpoint``), or None.

    ``registered``: what Ray Train passed (``ray.train.get_checkpoint()``). Call it on
    every rank: rank 0 chooses, the others take its choice.
    """
    import torch.distributed as dist
    from ray.train import Checkpoint

    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    chosen = [None]
    if not group or dist.get_rank() == 0:  # one listing of the storage, not one per rank
        chosen[0] = newest_complete(storage_dir, registered.path if registered is not None else None)
    if group:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        # Nothing on storage passed the completeness check (a storage hiccup can fail it): Ray's own
        # checkpoint, registered once every rank had reported it, beats training again from scratch.
        return registered
    if registered is not None and chosen[0] == registered.path:
        return registered
    fs, _ = _filesystem(storage_dir)
    return Checkpoint(chosen[0], filesystem=fs)


def log_missed_epoch(tracker, checkpoint, epoch: int, step_in_epoch: int) -> None:
    """Log the epoch an epoch-end ``checkpoint`` closes if the job's MLflow run never heard of it.

    Rank 0 logs an epoch after its checkpoint is on storage: a node lost in between
    leaves the epoch unlogged while the group resumes after it. Its figures are in the
    checkpoint's ``meta.json``.
    """
    if checkpoint is None or step_in_epoch or epoch <= tracker.last_epoch:
        return
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{META_FILE}") as f:
            metrics = json.loads(f.read()).get("metrics", {})
    except (OSError, ValueError):
        return
    if "train_loss" in metrics:  # an epoch's figures, not a mid-epoch checkpoint's counters
        tracker.log_epoch(epoch, metrics)


def newest_complete(storage_dir: str, registered_path: str | None = None) -> str | None:
    """Path (on the storage's filesystem) of the newest complete checkpoint of the job, or None."""
    newest = newest_complete_meta(storage_dir, registered_path)
    return newest[0] if newest else None


def newest_complete_meta(storage_dir: str, registered_path: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """Path and ``meta.json`` of the newest complete checkpoint of the job, or None."""
    fs, root = _filesystem(storage_dir)
    paths = set(_checkpoint_dirs(fs, root))
    if registered_path:
        paths.add(registered_path)
    ranked = []
    for path in paths:
        meta = _complete_meta(fs, path)
        if meta is not None:
            # Global steps only grow (a restarted epoch trains under new step numbers); older
            # checkpoints without one fall back to the directory name, a timestamp.
            ranked.append((int(meta.get("global_step", -1)), _name(path), path, meta))
    if not ranked:
        return None
    _, _, path, meta = max(ranked, key=lambda r: r[:3])
    return path, meta


def newest_global_step(storage_dir: str) -> int:
    """The global step of the job's newest complete checkpoint on storage; -1 when it has none or the storage
    cannot be listed (then Ray Train's own count of failures decides, as it would without this)."""
    try:
        fs, root = _filesystem(storage_dir)
    except (OSError, ValueError):  # pyarrow's errors derive from these
        return -1
    return max((_global_step(fs, p) for p in _checkpoint_dirs(fs, root)), default=-1)


def prune_unkept(storage_dir: str, kept: list[str]) -> list[str]:
    """Remove the job's ``checkpoint_*`` directories that are not in ``kept``; returns their names.

    Call it once the job has ended well: ``kept`` is what Ray Train still holds (``Result.best_checkpoints``).
    A complete checkpoint newer than every kept one stays, since a restarted job would resume from it.
    """
    kept_names = {_name(p) for p in kept}
    if not kept_names:
        return []
    fs, root = _filesystem(storage_dir)
    paths = _checkpoint_dirs(fs, root)
    newest_kept = max((_global_step(fs, p) for p in paths if _name(p) in kept_names), default=-1)
    removed = []
    for path in paths:
        if _name(path) in kept_names:
            continue
        if _global_step(fs, path) > newest_kept:
            continue
        try:
            fs.delete_dir(path)
        except OSError:
            continue  # gone already, or not ours to delete: it stays, as before
        removed.append(_name(path))
    return sorted(removed)


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _global_step(fs, path: str) -> int:
    """A complete checkpoint's global step; -1 for one that is not complete."""
    meta = _complete_meta(fs, path)
    return -1 if meta is None else int(meta.get("global_step", -1))


def _filesystem(storage_dir: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage_dir)


def _checkpoint_dirs(fs, root: str) -> list[str]:
    import pyarrow.fs

    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    return [i.path for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(PREFIX)]


def _complete_meta(fs, path: str) -> dict[str, Any] | None:
    """``meta.json`` of a checkpoint directory whose every file is whole, else None."""
    try:
        with fs.open_input_stream(f"{path}/{META_FILE}") as f:
            meta = json.loads(f.read())
        world = int(meta.get("world_size", 1))
        for name in [STATE_FILE] + [RANK_FILE.format(rank=r) for r in range(world)]:
            with fs.open_input_file(f"{path}/{name}") as f:
                if not zipfile.is_zipfile(f):
                    return None
    except (OSError, ValueError):
        return None
    return meta


__all__ = ["log_missed_epoch", "newest_complete", "newest_complete_meta", "newest_global_step", "prune_unkept", "resume_checkpoint"]
