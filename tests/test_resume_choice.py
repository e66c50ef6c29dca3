"""pipeline.train.resume: the newest complete checkpoint on storage, whether Ray Train registered it or not."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.train.resume import newest_complete


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
