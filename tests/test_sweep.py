"""``pipeline sweep``: grid/random points, up-front validation, and one real sweep on Ray Tune + MLflow.

The real sweep is a 2×2 grid (optim.lr × data.shards) whose second shard directory does not exist:
two trials train (one short Fashion-MNIST epoch each, on one worker, so that as many trials run at
once as there are CPUs), two fail before their workers start. One sweep checks parent and children,
the failure path, the default concurrency, the exit code and ``pipeline runs`` at once.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.train.sweep import Sweep, parse_grid, parse_random
from conftest import temp_dir_under_tmp


def test_points_are_the_grid_product_once_per_random_sample():
    sweep = Sweep(config="fashion_mnist", grid=(parse_grid("optim.lr=0.1,0.2"), parse_grid("train.batch_size=32,64")),
                  random=(parse_random("optim.weight_decay=1e-5:1e-3:log"),), samples=2, seed=3)
    points = sweep.points()
    assert len(points) == 8
    assert [(p["optim.lr"], p["train.batch_size"]) for p in points[:4]] == [
        ("0.1", "32"), ("0.1", "64"), ("0.2", "32"), ("0.2", "64")]
    draws = [float(p["optim.weight_decay"]) for p in points]
    assert len(set(draws)) == 8  # a fresh draw for every trial, as Tune draws per variant
    assert all(1e-5 <= d <= 1e-3 for d in draws)
    assert sweep.points() == points  # seeded
    ints = Sweep(config="x", random=(parse_random("train.batch_size=16:256"),), samples=3).points(
        frozenset({"train.batch_size"}))
    assert all(p["train.batch_size"].isdigit() for p in ints)


@pytest.mark.parametrize("text", ["optim.lr", "optim.lr=", "=1,2", "optim.lr=1,,2"])
def test_bad_grid_syntax(text):
    with pytest.raises(UserError, match="invalid --grid"):
        parse_grid(text)


@pytest.mark.parametrize("text", ["optim.lr=1", "optim.lr=a:b", "optim.lr=2:1", "optim.lr=0:1:log", "optim.lr=1:2:ln"])
def test_bad_random_syntax(text):
    with pytest.raises(UserError, match="invalid --random"):
        parse_random(text)


@pytest.mark.parametrize("args, message", [
    (["--grid", "optim.lrr=0.1,0.2"], "unknown config key 'optim.lrr' to sweep (did you mean optim.lr"),
    (["--grid", "optim.lr=0.1,abc"], "--grid optim.lr=abc: invalid value 'abc' for optim.lr"),
    (["--grid", "optim.name=sgd,lion"], "--grid optim.name=lion: invalid value 'lion'"),
    (["--grid", "run.name=a,b"], "run.name cannot be swept"),
    (["--grid", "optim.lr=0.1,0.2", "--grid", "optim.lr=0.3,0.4"], "optim.lr swept twice"),
    ([], "nothing to sweep"),
    (["--grid", "optim.lr=0.1,0.2", "--name", "my sweep"], "--name 'my sweep': run: name 'my sweep-000'"),
    (["--grid", "optim.lr=0.1,0.2", "--samples", "0"], "--samples must be >= 1, got 0"),
])
def test_invalid_sweeps_are_one_error_line_before_anything_starts(args, message, capsys, tmp_path):
    store = tmp_path / "mlruns.db"
    rc = main(["sweep", "--config", "fashion_mnist", *args, "--set", f"tracking.tracking_uri=sqlite:///{store}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("pipeline sweep: error: ") and message in err[0], err
    assert not store.exists()  # nothing started: no MLflow run, no Ray


@pytest.fixture(scope="module")
def swept(tmp_path_factory, fmnist_dir):
    root = tmp_path_factory.mktemp("sweep")
    shards = root / "fm"
    assert main(["shard", str(fmnist_dir), str(shards), "--limit", "512", "--samples-per-shard", "256",
                 "--no-progress"]) == 0
    uri = f"sqlite:///{root / 'mlruns.db'}"
    pipeline = str(Path(sys.executable).with_name("pipeline"))
    # Paths relative to the launch directory, as users type them: the trials run in working directories of
    # their own, so the driver resolves them (shards swept and set, storage, the SQLite store).
    cmd = [pipeline, "sweep", "--config", "fashion_mnist", "--name", "grid",
           "--grid", "optim.lr=0.002,0.004", "--grid", "data.shards=fm,missing",
           "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=3", "--set", "tracking.log_model=false",
           "--set", "run.storage_path=ray_results", "--set", "tracking.tracking_uri=sqlite:///mlruns.db",
           "--set", "tracking.experiment=sweeps", "--set", "scaling.num_workers=1"]
    with temp_dir_under_tmp() as tmpdir:  # short: Ray's socket paths have a length limit
        env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        runs = subprocess.run([pipeline, "runs", "--tracking-uri", uri, "--experiment", "sweeps"], cwd=root,
                              env=env, capture_output=True, text=True, timeout=300)
    return {"proc": proc, "runs": runs, "uri": uri, "shards": str(shards), "root": root}


def _sweep_runs(uri: str):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("pipeline.sweep_trial") == "parent"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


@pytest.mark.slow
def test_sweep_parent_children_and_failed_trials(swept):
    proc = swept["proc"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # some trials failed
    assert "2 of 4 trial(s) failed:" in proc.stdout, out
    assert "best: trial " in proc.stdout and "optim.lr=" in proc.stdout.split("best: trial ")[1], out
    assert "errored after" not in out, out  # Tune's own failure report: the sweep's summary replaces it
    # No --max-concurrent: as many trials at a time as their workers fit (1 CPU each; Ray gets every CPU).
    assert f"4 trial(s) of fashion_mnist, {os.cpu_count()} at a time" in proc.stdout, out

    client, parent, children = _sweep_runs(swept["uri"])
    assert parent.info.status == "FAILED" and parent.data.tags["pipeline.failed_trials"] == "2"
    assert parent.data.params["sweep.grid.optim.lr"] == "0.002,0.004"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "trials.csv", "sweep.png"} <= artifacts
    assert len(children) == 4
    finished = [c for c in children if c.info.status == "FINISHED"]
    failed = [c for c in children if c.info.status == "FAILED"]
    assert sorted(c.data.params["optim.lr"] for c in finished) == ["0.002", "0.004"]
    assert {c.data.params["data.shards"] for c in finished} == {swept["shards"]}
    assert all("val_top1" in c.data.metrics for c in finished)
    assert len(failed) == 2 and all("missing" in c.data.tags["pipeline.error"] for c in failed)
    assert parent.data.tags["pipeline.best_run_id"] in {c.info.run_id for c in finished}

    local = client.download_artifacts(parent.info.run_id, "trials.csv", str(swept["root"]))
    table = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert [r["status"] for r in table] == ["FINISHED", "FAILED", "FINISHED", "FAILED"]
    assert [r["optim.lr"] for r in table] == ["0.002", "0.002", "0.004", "0.004"]


@pytest.mark.slow
def test_runs_names_the_swept_params(swept):
    runs = swept["runs"]
    assert runs.returncode == 0, runs.stderr
    header = runs.stdout.splitlines()[0]
    assert "params that differ:" in header and "optim.lr" in header and "data.shards" in header, runs.stdout


def test_same_name_reuses_its_parent_only_with_the_same_definition(tmp_path):
    from pipeline.train.sweep import _start_parent

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.create_experiment("s", artifact_location=(tmp_path / "art").as_uri())
    sweep = Sweep(config="fashion_mnist", grid=(parse_grid("optim.lr=0.1,0.2"),), name="again")
    first = _start_parent(client, sweep, "/r/again", exp)
    assert _start_parent(client, sweep, "/r/again", exp) == first  # a restart resumes the same sweep
    other = Sweep(config="fashion_mnist", grid=(parse_grid("optim.lr=0.1,0.3"),), name="again")
    with pytest.raises(UserError, match="already ran with another definition"):
        _start_parent(client, other, "/r/again", exp)


@pytest.mark.slow
def test_ctrl_c_stops_the_running_trial_at_a_checkpoint_and_starts_no_other(swept, tmp_path):
    """Ctrl-C (SIGINT to the sweep's process group): the running trial checkpoints and ends KILLED, the next
    never starts, the parent run ends KILLED, one line says how to continue, exit code 130."""
    import signal
    import threading
    import time

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cmd = [str(Path(sys.executable).with_name("pipeline")), "sweep", "--config", "fashion_mnist", "--name", "cut",
           "--grid", "optim.lr=0.002,0.004", "--max-concurrent", "1", "--set", f"data.shards={swept['shards']}",
           "--set", "train.epochs=100", "--set", "tracking.log_model=false", "--set", "scaling.num_workers=1",
           "--set", f"run.storage_path={tmp_path / 'ray_results'}", "--set", f"tracking.tracking_uri={uri}",
           "--set", "tracking.experiment=sweeps"]
    with temp_dir_under_tmp() as tmpdir:
        env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        # A session of its own, SIGINT not ignored, as a terminal's foreground job.
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 300
            while not any(": epoch 1 " in line for line in lines):
                assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGINT)
            err = proc.stderr.read()
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # this test's own session only
        reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 130, out + err
    assert [ln for ln in err.splitlines() if ln.startswith("pipeline sweep:")] == [
        "pipeline sweep: stopped by SIGINT to the driver: 1 trial(s) stopped after a checkpoint, 1 not started; "
        "run the same command again to continue"], err
    assert "trial 1/2 (optim.lr=0.002): stopped (SIGINT to the driver)" in out, out
    assert "Traceback" not in out + err and "Trial trainable_" not in out + err, out + err  # nor Tune's own lines
    assert "SystemExit" not in out + err and "Exception ignored" not in out + err, out + err  # Ray ending an actor
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("pipeline.sweep_trial") == "parent")
    assert parent.info.status == "KILLED" and parent.data.tags["pipeline.end_reason"] == "SIGINT to the driver"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [(c.data.params["optim.lr"], c.info.status) for c in children] == [("0.002", "KILLED")]
