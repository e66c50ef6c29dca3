"""Which checkpoints a job resumes from, and which leftovers of faults it removes: storage and local staging."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.train.resume import newest_complete, prune_unkept


def _checkpoint(root: Path, name: str, global_step: int | None, world: int = 2, *, cut: str | None = None,
                missing: str | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    meta = {"epoch": 1, "world_size": world}
    if global_step is not None:
        meta["global_step"] = global_step
    (d / "meta.json").write_text(json.dumps(meta))
    for f in ["state.pt"] + [f"rank-{r}.pt" for r in range(world)]:
        if f != missing:
            torch.save({"x": torch.arange(1000)}, d / f)
    if cut:  # a copy cut short by a lost node: no zip end record
        data = (d / cut).read_bytes()
        (d / cut).write_bytes(data[: len(data) // 2])
    return d


def test_newest_complete_checkpoint_by_global_step(tmp_path):
    job = tmp_path / "job"
    _checkpoint(job, "checkpoint_2026-01-01_00-00-01.000", 8)
    newest = _checkpoint(job, "checkpoint_2026-01-01_00-00-02.000", 16)
    _checkpoint(job, "checkpoint_2026-01-01_00-00-03.000", 24, missing="rank-1.pt")  # rank 1 never uploaded
    _checkpoint(job, "checkpoint_2026-01-01_00-00-04.000", 32, cut="rank-0.pt")  # cut short
    _checkpoint(job, "checkpoint_2026-01-01_00-00-05.000", 40, cut="state.pt")
    (job / "best_checkpoint").mkdir()
    (job / "checkpoint_2026-01-01_00-00-06.000").mkdir()  # no meta.json yet
    assert newest_complete(str(job)) == str(newest)
    # Ray's registered one counts as a candidate too, and loses to a newer one on storage.
    older = str(job / "checkpoint_2026-01-01_00-00-01.000")
    assert newest_complete(str(job), older) == str(newest)


def test_global_step_orders_across_a_restarted_epoch_and_names_break_ties(tmp_path):
    job = tmp_path / "job"
    # A restarted epoch: fewer steps into the epoch, but a later global step; the name is a timestamp.
    _checkpoint(job, "checkpoint_2026-01-01_00-00-09.000", 10)
    later = _checkpoint(job, "checkpoint_2026-01-01_00-00-10.000", 12, world=1)
    assert newest_complete(str(job)) == str(later)
    old = tmp_path / "old"
    _checkpoint(old, "checkpoint_2026-01-01_00-00-01.000", None)
    last = _checkpoint(old, "checkpoint_2026-01-01_00-00-02.000", None)
    assert newest_complete(str(old)) == str(last)


def test_no_job_directory_or_no_complete_checkpoint_is_none(tmp_path):
    assert newest_complete(str(tmp_path / "never-ran")) is None
    _checkpoint(tmp_path / "job", "checkpoint_x", 5, missing="state.pt")
    assert newest_complete(str(tmp_path / "job")) is None


def test_resume_checkpoint_takes_the_newer_one_on_storage_over_the_registered_one(tmp_path):
    from ray.train import Checkpoint

    from pipeline.train.resume import resume_checkpoint

    job = tmp_path / "job"
    registered = Checkpoint(str(_checkpoint(job, "checkpoint_2026-01-01_00-00-01.000", 8)))
    assert resume_checkpoint(str(job), registered) is registered
    newer = _checkpoint(job, "checkpoint_2026-01-01_00-00-02.000", 16)
    chosen = resume_checkpoint(str(job), registered)
    assert chosen.path == str(newer)
    with chosen.as_directory() as d:
        assert Path(d) == newer  # local storage: read in place
    assert resume_checkpoint(str(tmp_path / "none"), None) is None


def test_prune_removes_what_ray_does_not_keep_but_never_a_newer_resume_point(tmp_path):
    job = tmp_path / "job"
    orphan = _checkpoint(job, "checkpoint_2026-01-01_00-00-01.000", 8)  # complete, never registered
    kept = [_checkpoint(job, f"checkpoint_2026-01-01_00-00-0{i}.000", 8 * i) for i in (2, 3)]
    _checkpoint(job, "checkpoint_2026-01-01_00-00-04.000", 40, cut="rank-1.pt")  # cut short by a lost node
    newer = _checkpoint(job, "checkpoint_2026-01-01_00-00-05.000", 48)  # complete and newer: a resume point
    (job / "checkpoint_2026-01-01_00-00-06.000").mkdir()  # upload begun, nothing in it
    (job / "best_checkpoint").mkdir()
    (job / "checkpoint_manager_snapshot.json").write_text("{}")

    removed = prune_unkept(str(job), [str(k) for k in kept])

    assert removed == [orphan.name, "checkpoint_2026-01-01_00-00-04.000", "checkpoint_2026-01-01_00-00-06.000"]
    assert sorted(p.name for p in job.iterdir()) == sorted(
        [*(k.name for k in kept), newer.name, "best_checkpoint", "checkpoint_manager_snapshot.json"])
    assert newest_complete(str(job)) == str(newer)
    assert prune_unkept(str(job), []) == []  # nothing registered (a job with no checkpoint): nothing touched
    assert newer.is_dir()


def test_stale_staging_of_a_dead_process_is_removed_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from pipeline.train.checkpoint import clear_stale_staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"pipeline-ckpt-{int(dead.stdout)}-abc123"  # its process has exited
    gone.mkdir()
    torch.save({"x": torch.arange(10)}, gone / "state.pt")
    live = tmp_path / f"pipeline-ckpt-{os.getpid()}-def456"  # this process: a job still writing
    live.mkdir()
    other = tmp_path / "pipeline-ckpt-notapid"  # not of our naming: left alone
    other.mkdir()
    assert clear_stale_staging(tmp_path) == [gone.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
