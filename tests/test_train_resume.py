"""Step checkpoints, exact mid-epoch resume, preemption and failure status.

The fast tests (no Ray) check the pieces: loader positions for both backends,
the RNG round trip, the step trigger. The slow ones train for real on Ray Train
(2 CPU workers, gloo, DALI on the CPU, MLflow on SQLite) and compare per-step
losses, logged at every step, with an uninterrupted run of the same job:

1. the reference run;
2. the same job with a worker SIGKILLed right after its first mid-epoch checkpoint, and
   ``run.max_failures=0``: Ray Train gives up at once, and the driver starts it again, since it
   checkpointed after it started;
3. the same job as ``python -m pipeline.train`` stopped by Ctrl-C (SIGINT to its process
   group, Ray's local processes included), then run again;
4. a job whose data fails to decode: its MLflow run ends FAILED;
5. a job whose weights become NaN: it ends FAILED at once, its good checkpoints kept.

Same world size, CPU, fp32, one intra-op thread: the resumed losses equal the
reference bit for bit (tolerance 0). Model, optimizer, schedule, every RNG and
the DALI reader's position and random state are restored exactly, and gloo sums
two ranks' gradients in a fixed order, so nothing is left to differ.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.cli import main
from pipeline.data import LoaderOptions, build_loader
from pipeline.train.preempt import (Control, clear_stop, drop_worker_stop, exit_code, read_checkpoint_request, read_stop,
                                    request_checkpoint, request_stop)
from pipeline.train.state import rng_state, set_rng_state
from _proc import a_worker_killed_after_a_checkpoint

EPOCHS, STEPS = 1, 8  # 1024 images, 2 workers x batch 64


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, fmnist_dir):
    out = tmp_path_factory.mktemp("resume") / "fm"
    assert main(["shard", str(fmnist_dir), str(out), "--limit", "1024", "--samples-per-shard", "200",
                 "--no-progress"]) == 0
    return out


# --- fast: the pieces --------------------------------------------------------------------------

@pytest.mark.parametrize("backend,workers", [("dali", 1), ("torch", 3), ("torch", 0)])  # 3 workers: uneven runs
def test_loader_continues_at_the_next_batch_with_the_same_samples(shards, backend, workers):
    def loader():
        return build_loader(shards, "train", batch_size=64, rank=1, world_size=2, backend=backend, device="cpu",
                            options=LoaderOptions(num_threads=1, num_workers=workers, with_keys=True))

    full = loader()
    full.set_epoch(1)
    expected = list(full)
    for k in (5,) if workers else (1, len(expected) - 1):
        first = loader()
        first.set_epoch(1)
        it = iter(first)
        for _ in range(k):
            next(it)
        saved = _roundtrip(first.state_dict())  # what a checkpoint stores, loaded weights_only
        del it
        resumed = loader()
        resumed.load_state_dict(saved)
        resumed.set_epoch(1)
        rest = list(resumed)
        assert [b[2] for b in rest] == [b[2] for b in expected[k:]], (backend, k)  # same samples, same order
        for a, b in zip(rest, expected[k:]):
            assert torch.equal(a[0], b[0])  # same crops and flips
        resumed.set_epoch(2)
        assert len(list(resumed)) == len(expected)  # the saved position is used once


def test_loader_position_refuses_another_world_size(shards):
    a = build_loader(shards, "train", batch_size=32, rank=0, world_size=2, backend="torch", device="cpu")
    b = build_loader(shards, "train", batch_size=32, rank=0, world_size=3, backend="torch", device="cpu")
    a.set_epoch(0)
    state = {**a.state_dict(), "batches": 3}
    with pytest.raises(ValueError, match="world"):
        b.load_state_dict(state)


def test_another_world_size_restarts_the_epoch_on_every_rank(shards):
    from pipeline.config import from_dict
    from pipeline.train.config import TrainConfig
    from pipeline.train.models import build_model
    from pipeline.train.state import RunState
    from pipeline.train.step import TrainStep, build_optimizer

    cfg = from_dict(TrainConfig, {"scaling": {"torch_threads": 1}})
    model = build_model("seed_cnn", 10, 1, 28)
    step = TrainStep.from_config(model, build_optimizer(model, cfg.optim), cfg, "cpu")

    def loader(world):
        return build_loader(shards, "train", batch_size=64, rank=0, world_size=world, backend="torch", device="cpu",
                            options=LoaderOptions(num_workers=0))

    two = loader(2)
    two.set_epoch(0)
    it = iter(two)
    next(it), next(it)
    before = RunState(model, step, two, rank=0, world_size=2, keep_best_by="val_top1")
    before.step_in_epoch, before.global_step = 2, 2
    shared, mine = _roundtrip(before.state_dict()), _roundtrip(before.rank_state_dict())
    del it

    three = loader(3)
    after = RunState(model, step, three, rank=0, world_size=3, keep_best_by="val_top1")
    after.load_state_dict(shared)
    assert "world" in after.load_rank_state(mine)
    after.restart_epoch()
    assert (after.epoch, after.step_in_epoch, after.global_step) == (0, 0, 2)  # steps keep counting
    three.set_epoch(0)
    assert len(list(three)) == len(three)  # the whole epoch, from its first batch

    same = loader(2)  # a rank that could continue still restarts when another rank cannot
    kept = RunState(model, step, same, rank=0, world_size=2, keep_best_by="val_top1")
    kept.load_state_dict(shared)
    assert kept.load_rank_state(mine) is None
    kept.restart_epoch()
    same.set_epoch(0)
    assert len(list(same)) == len(same)


def test_rng_state_round_trip_weights_only():
    import random

    import numpy as np

    g = torch.Generator().manual_seed(5)
    saved = _roundtrip(rng_state(g))
    before = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    set_rng_state(saved, g)
    after = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all()
    assert before[2] == after[2] and torch.equal(before[3], after[3])


def test_control_steps_and_stop_file(tmp_path):
    ctl = Control(storage_dir=tmp_path, rank=0, world_size=1, every_steps=4, every_minutes=None)
    assert [ctl.poll(s)[0] for s in range(1, 9)] == [False, False, False, True, False, False, False, True]
    request_stop(tmp_path, "SIGTERM to the driver")
    assert read_stop(tmp_path) == "SIGTERM to the driver"
    deadline, step = time.monotonic() + 60, 8
    while not ctl.poll(step)[1]:  # the agreed check runs about once a second, whatever the step time
        assert time.monotonic() < deadline
        step += 1
        time.sleep(0.02)
    assert ctl.stop_reason == "SIGTERM to the driver"
    clear_stop(tmp_path)
    assert read_stop(tmp_path) is None
    assert exit_code("SIGTERM to the driver") == 143 and exit_code("SIGINT to the driver") == 130
    # A new worker group drops what a worker of the group before it asked (Ray's teardown SIGTERMs it),
    # never what the driver asked.
    request_stop(tmp_path, "SIGTERM to the driver")
    assert drop_worker_stop(tmp_path) is None and read_stop(tmp_path) == "SIGTERM to the driver"
    request_stop(tmp_path, "SIGTERM to worker rank 0 on 127.0.0.3", origin="worker")
    assert drop_worker_stop(tmp_path) == "SIGTERM to worker rank 0 on 127.0.0.3" and read_stop(tmp_path) is None


def test_nonfinite_names_the_first_bad_parameter_or_buffer():
    from torch import nn

    from pipeline.train.guard import nonfinite

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(2, 1, 8, 8))
    assert nonfinite(model) is None and nonfinite(model, buffers=True) is None
    model[1].running_var[2] = float("inf")  # an fp16 overflow in a forward pass: BatchNorm's statistics only
    assert nonfinite(model) is None and nonfinite(model, buffers=True) == "1.running_var"
    with torch.no_grad():
        model[3].weight[0, 5] = float("nan")
    assert nonfinite(model) == "3.weight" and nonfinite(model, buffers=True) == "3.weight"


def test_a_divergence_record_round_trips_and_is_cleared(tmp_path):
    from pipeline.train.guard import DivergedInLoop, clear_divergence, diverged_message, read_divergence, \
        record_divergence

    assert read_divergence(str(tmp_path)) is None
    clear_divergence(str(tmp_path))  # nothing to clear: no error
    record_divergence(str(tmp_path), DivergedInLoop(40, 2, "fc.weight"))
    record = read_divergence(str(tmp_path))
    assert record == {"global_step": 40, "epoch": 2, "tensor": "fc.weight"}
    line = diverged_message("r50", record, -1)
    assert "by step 40 (epoch 3; first: fc.weight)" in line and "no checkpoint was written" in line
    (tmp_path / "DIVERGED").write_text('{"global_st')  # cut short: no record
    assert read_divergence(str(tmp_path)) is None
    clear_divergence(str(tmp_path))
    assert not (tmp_path / "DIVERGED").exists()
    uri = (tmp_path / "on-a-uri").as_uri()  # file://: pyarrow's file system, as for s3:// storage
    (tmp_path / "on-a-uri").mkdir()
    record_divergence(uri, DivergedInLoop(7, 0, "conv.weight"))
    assert read_divergence(uri)["global_step"] == 7 and (tmp_path / "on-a-uri" / "DIVERGED").is_file()
    clear_divergence(uri)
    assert read_divergence(uri) is None


def test_a_checkpoint_request_is_served_once_and_training_goes_on(tmp_path):
    """What an elastic group's controller asks before it resizes (pipeline.train.resize): a checkpoint at the
    next agreed check, no stop; served, the request is gone, and no later step is due for it."""
    ctl = Control(storage_dir=tmp_path, rank=0, world_size=1, every_steps=None, every_minutes=None)
    assert not any(ctl.poll(s)[0] for s in range(1, 4))
    request_checkpoint(tmp_path, "the worker group resizes to 2 worker(s)")
    assert read_checkpoint_request(tmp_path) == "the worker group resizes to 2 worker(s)"
    deadline, step = time.monotonic() + 60, 4
    while not ctl.poll(step)[0]:  # due at the next agreed check
        assert time.monotonic() < deadline
        step += 1
        time.sleep(0.02)
    assert not ctl.poll(step)[1] and read_stop(tmp_path) is None  # a checkpoint, not a stop
    ctl.checkpointed()
    assert read_checkpoint_request(tmp_path) is None
    end = time.monotonic() + 2.5  # two more agreed checks: nothing due
    while time.monotonic() < end:
        step += 1
        assert not ctl.poll(step)[0], step
        time.sleep(0.02)


# --- slow: real jobs ---------------------------------------------------------------------------

def _overrides(shards: Path, root: Path, name: str) -> list[str]:
    return [f"data.shards={shards}", "data.backend=dali", f"run.name={name}",
            f"run.storage_path={root / 'ray_results'}", f"tracking.tracking_uri=sqlite:///{root}/mlruns.db",
            "tracking.experiment=resume", "tracking.log_model=false", "train.batch_size=64",
            "train.log_every_steps=1", "optim.lr=0.003", "optim.warmup_epochs=0", "scaling.num_workers=2",
            "scaling.cpus_per_worker=1", "scaling.torch_threads=1", f"train.epochs={EPOCHS}",
            "run.checkpoint_every_steps=2", "run.checkpoint_every_minutes=null", "run.max_failures=2"]


def _run(uri: str, name: str):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run per job, restarts included
    return runs[0]


def _losses(uri: str, run) -> list[tuple[int, float]]:
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "step_train_loss")
    return sorted((m.step, m.value) for m in history)


def _wait_for_mid_epoch_checkpoint(storage: Path, timeout: float = 300) -> None:
    """Until the job has a complete checkpoint on storage (``meta.json``, ``state.pt`` and every rank's file):
    one rank's file alone is a checkpoint still being written."""
    from pipeline.train.resume import newest_global_step

    deadline = time.monotonic() + timeout
    while newest_global_step(str(storage)) < 0:
        assert time.monotonic() < deadline, f"no complete checkpoint under {storage}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def jobs(shards, tmp_path_factory, ray_local):
    from pipeline.train.config import load_config
    from pipeline.train.launch import fit

    root = tmp_path_factory.mktemp("jobs")
    uri = f"sqlite:///{root}/mlruns.db"
    reference = fit(load_config("fashion_mnist", _overrides(shards, root, "reference")))

    # max_failures=0: Ray Train gives up at the kill, and fit starts the job again because it checkpointed
    # since it started (``launch._start_again``): the budget counts failures without progress between them.
    with a_worker_killed_after_a_checkpoint(root / "ray_results" / "killed") as killed:
        killed_result = fit(load_config("fashion_mnist", _overrides(shards, root, "killed") + ["run.max_failures=0"]))
    return {"root": root, "uri": uri, "reference": reference, "killed": killed_result, "killed_pids": killed}



@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_at_the_next_step_with_equal_losses(jobs):
    assert jobs["killed_pids"], "no Ray Train worker was killed"
    uri = jobs["uri"]
    reference = _losses(uri, _run(uri, "reference"))
    run = _run(uri, "killed")
    assert int(run.data.tags["pipeline.resumes"]) >= 1
    resumed = _losses(uri, run)
    assert [s for s, _ in resumed] == list(range(1, EPOCHS * STEPS + 1))  # every step once, none repeated
    assert resumed == reference  # tolerance 0: see the module docstring
    assert jobs["killed"].metrics["epoch"] == EPOCHS
    assert run.info.status == "FINISHED"


def _train_cmd(shards: Path, root: Path, name: str) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline.train", "--config", "fashion_mnist"]
    for o in _overrides(shards, root, name):
        cmd += ["--set", o]
    return cmd


@pytest.mark.slow
def test_ctrl_c_to_the_driver_checkpoints_marks_killed_and_resubmit_continues(jobs, shards):
    root, uri = jobs["root"], jobs["uri"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The ranks agree on a stop at every step here: on a quiet machine this 8-step job would
    # otherwise end within one default 1 s check period of the signal.
    env["PIPELINE_STOP_CHECK_S"] = "0"
    cmd = _train_cmd(shards, root, "stopped")
    # A session of its own, as a terminal's foreground job: Ctrl-C sends SIGINT to the whole group,
    # the driver and the local Ray processes it started. (SIGTERM to a driver: test_train_job_submit.)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _wait_for_mid_epoch_checkpoint(root / "ray_results" / "stopped")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # this test's own session only
    # Ray Train's own SIGINT handler would abort the workers without a checkpoint (exit code 1).
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Aborted" not in err and "(RayTrainWorker pid=" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "stopped by SIGINT" in line]
    assert len(lines) == 1 and "run the same command again" in lines[0], err[-3000:]
    run = _run(uri, "stopped")
    assert run.info.status == "KILLED"
    assert run.data.tags["pipeline.end_reason"] == "SIGINT to the driver"
    stopped_at = max(s for s, _ in _losses(uri, run))
    assert stopped_at < EPOCHS * STEPS

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    run = _run(uri, "stopped")
    assert run.info.status == "FINISHED"
    resumed = _losses(uri, run)
    assert [s for s, _ in resumed] == list(range(1, EPOCHS * STEPS + 1))
    assert resumed == _losses(uri, _run(uri, "reference"))


@pytest.mark.slow
def test_a_failing_job_leaves_its_run_failed(shards, tmp_path, ray_local, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    tar = sorted(broken.glob("train-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    start = data.index(b"\x89PNG")
    data[start + 16:start + 400] = b"\0" * 384  # a PNG that no longer decodes, at its verified offset
    tar.write_bytes(bytes(data))
    # No step checkpoints: a job that checkpointed before its fault would start again once (a test of its own).
    overrides = _overrides(broken, tmp_path, "failing") + ["run.max_failures=0", "run.checkpoint_every_steps=null"]
    capsys.readouterr()
    assert main(["train", "--config", "fashion_mnist", *(a for o in overrides for a in ("--set", o))]) == 1
    out, err = capsys.readouterr()
    # One line, no traceback: what failed (the decoder error, or the health check of a rank it took
    # down), then what is kept.
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("pipeline train: error: job failing failed: Ray Train gave up after 1 failure "
                          "(run.max_failures=0) (rank "), err
    assert "its MLflow run is FAILED" in err and "a disk is full" not in err, err
    assert "no checkpoint was written" in err and "starts again" not in out, err
    run = _run(f"sqlite:///{tmp_path}/mlruns.db", "failing")
    assert run.info.status == "FAILED"
    # The failed rank's own error, not Ray's wrapper ("WorkerGroupError: Training failed due to worker errors:").
    reason = run.data.tags.get("pipeline.end_reason", "")
    assert reason and "WorkerGroupError" not in reason, reason


@pytest.mark.slow
def test_a_rank_error_after_a_checkpoint_starts_the_job_again_once(shards, tmp_path, ray_local, capsys):
    """Rank 0 fails at epoch 1's end, after its checkpoint, while rank 1 waits in epoch 2's first all-reduce;
    Ray tears rank 1 down with SIGTERM, which its handler takes for a preemption. That request must not stop
    the driver from starting the job again (it checkpointed since it started); the second attempt fails the
    same way without progress, and the job ends."""
    from pipeline.train.config import load_config
    from pipeline.train.launch import JobFailed, fit

    job = tmp_path / "ray_results" / "rank-error"
    job.mkdir(parents=True)
    (job / "best_checkpoint").write_text("a file where the best copy's directory goes")  # rank 0's keep_best fails
    overrides = _overrides(shards, tmp_path, "rank-error") + ["run.max_failures=0", "train.epochs=2",
                                                               "run.checkpoint_every_steps=null"]
    capsys.readouterr()
    with pytest.raises(JobFailed) as err:
        fit(load_config("fashion_mnist", overrides))
    out = capsys.readouterr().out
    assert out.count("so it starts again from there") == 1, out[-3000:]
    assert "the job checkpointed step 8 since its last start (step 0)" in out, out[-3000:]
    assert "rank 0: " in str(err.value) and "the newest complete checkpoint is step 8" in str(err.value), err.value


def test_a_workers_stop_request_does_not_keep_the_job_from_starting_again(tmp_path):
    from ray.train import ControllerError, WorkerGroupError

    from pipeline.train.config import load_config
    from pipeline.train.launch import _start_again

    cfg = load_config("fashion_mnist", ["run.max_failures=0"])
    failed = WorkerGroupError("", {0: OSError("boom")})
    request_stop(tmp_path, "SIGTERM to worker rank 1 on 127.0.0.1", origin="worker")  # Ray's teardown
    assert _start_again(failed, cfg, True, str(tmp_path)) and read_stop(tmp_path) is None
    request_stop(tmp_path, "SIGTERM to the driver")  # the user's: the job ends
    assert not _start_again(failed, cfg, True, str(tmp_path))
    clear_stop(tmp_path)
    assert not _start_again(failed, cfg, False, str(tmp_path))  # no checkpoint since the last start
    assert not _start_again(ControllerError(RuntimeError("x")), cfg, True, str(tmp_path))
    assert _start_again(failed, cfg, True, None)  # storage on a URI: no stop files


def test_a_job_that_fills_its_disk_says_so_and_what_it_kept():
    from ray.train import WorkerGroupError

    from pipeline.train.config import load_config
    from pipeline.train.launch import _failed_line

    cfg = load_config("fashion_mnist", ["run.name=r", "run.storage_path=/data/runs", "run.max_failures=2"])
    full = WorkerGroupError("rank 0 …", {1: RuntimeError("Connection closed by peer"),
                                          0: OSError(28, "No space left on device")})
    line = _failed_line(cfg, full, 1200, tracked=True)
    assert line.startswith("job r failed: Ray Train gave up after 3 failures (run.max_failures=2) (rank 0: OSError: "
                           "[Errno 28] No space left on device); a disk is full: free space under run.storage_path "
                           "(/data/runs)"), line
    assert "the newest complete checkpoint is step 1200: run the same command again" in line
    assert "MLflow run is FAILED" in line
    other = _failed_line(cfg, WorkerGroupError("", {0: ValueError("bad")}), -1, tracked=False)
    assert "(rank 0: ValueError: bad); no checkpoint was written (--verbose" in other and "disk" not in other, other
    from ray.train import ControllerError

    controller = _failed_line(cfg, ControllerError(RuntimeError("lost")), 5, tracked=False)
    assert controller.startswith("job r failed: Ray Train's controller: RuntimeError: lost; "), controller
    assert "the newest complete checkpoint is step 5" in controller


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [1, 50])  # found at the step's log line, or only before its checkpoint
def test_a_diverging_job_ends_failed_without_checkpointing_its_nan_weights(shards, tmp_path, ray_local, log_every):
    """Adam at lr 1e30: step 1 leaves huge but finite weights (checkpointed), step 2 NaN ones. The job ends
    there with one error naming both steps, no retry, and no checkpoint of the NaN weights."""
    from pipeline.errors import UserError
    from pipeline.train.checkpoint import load_state
    from pipeline.train.config import load_config
    from pipeline.train.launch import fit

    overrides = _overrides(shards, tmp_path, "diverging") + ["optim.lr=1e30", "run.checkpoint_every_steps=1",
                                                             f"train.log_every_steps={log_every}"]
    cfg = load_config("fashion_mnist", overrides)
    with pytest.raises(UserError) as err:
        fit(cfg)
    text = str(err.value)
    assert "\n" not in text and "training diverged" in text, text
    assert "by step 2 " in text and "the newest checkpoint, step 1, is from before it" in text, text
    checkpoints = sorted(c for c in (tmp_path / "ray_results" / "diverging").glob("checkpoint_*") if c.is_dir())
    assert checkpoints, "step 1 was checkpointed"
    assert text.endswith(f"start a new run.name (--init-from {checkpoints[-1]} starts it from that checkpoint's "
                         "weights)"), text
    for c in checkpoints:  # the NaN weights of step 2 were never written
        state = load_state(c)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), c
        assert (c / "meta.json").is_file() and '"global_step": 1' in (c / "meta.json").read_text()
    run = _run(f"sqlite:///{tmp_path}/mlruns.db", "diverging")
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags.get("pipeline.end_reason", ""), run.data.tags
    history = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_metric_history(run.info.run_id,
                                                                                       "step_train_loss")
    assert [m.step for m in history] == ([1, 2] if log_every == 1 else []), history  # not retried: logged once


def test_a_storage_uri_stays_a_uri_and_the_best_checkpoint_is_kept_there(tmp_path):
    from pipeline.train.config import load_config
    from pipeline.train.launch import resolve_paths
    from pipeline.train.state import keep_best, local_best

    # A Path would fold "s3://bucket/runs" into "s3:/bucket/runs", a local folder on every node.
    cfg = load_config("fashion_mnist", ["run.storage_path=s3://bucket/runs"])
    assert resolve_paths(cfg).run.storage_path == "s3://bucket/runs"
    assert resolve_paths(load_config("fashion_mnist", ["run.storage_path=rr"]), tmp_path).run.storage_path == \
        str(tmp_path / "rr")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "state.pt").write_bytes(b"weights")
    (checkpoint / "meta.json").write_text("{}")
    job = (tmp_path / "job").as_uri()  # file://: pyarrow's file system, as for s3://
    with local_best(job) as best:
        assert best is None
    keep_best(checkpoint, job)
    assert (tmp_path / "job" / "best_checkpoint" / "state.pt").read_bytes() == b"weights"
    with local_best(job) as best:
        assert best != tmp_path / "job" / "best_checkpoint"  # a download
        assert (best / "state.pt").read_bytes() == b"weights" and (best / "meta.json").is_file()
