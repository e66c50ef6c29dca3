"""``ray job submit`` of ``python -m pipeline.train`` to a ``ray start --head`` on 127.0.0.1 with token auth.

The head is private to this test: its own temp dir, free ports, its own token
(``RAY_AUTH_TOKEN``, so ~/.ray is not touched), started with ``--block`` so that
every process it spawns is its descendant; teardown stops exactly those. One job
name is submitted three times there: stopped by SIGTERM to one worker process (a
spot node's notice), stopped by ``ray job stop``, then finished.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.cli import main
from pipeline.train.preempt import job_stop_wait_note
from _proc import descendants

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the head and everything it started, then SIGKILL what is left after a few seconds."""
    pids = descendants(proc.pid) + [proc.pid]
    for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
            try:
                proc.wait(timeout=0)
            except subprocess.TimeoutExpired:
                pass
    proc.wait(timeout=10)


def _jobs_api_up(address: str, token: str) -> bool:
    request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status == 200
    except OSError:  # refused, reset, or an HTTP error while the dashboard starts
        return False


@pytest.fixture(scope="module")
def head():
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client, agent_http, agent_grpc, renv, metrics, nm, om = _free_ports(9)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(renv), "--metrics-export-port", str(metrics),
           "--node-manager-port", str(nm), "--object-manager-port", str(om),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while not _jobs_api_up(address, token):  # a plain request: a `ray` CLI process per probe costs seconds
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray head did not come up: {(Path(temp_dir) / 'ray-start.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"address": address, "env": env, "token": token, "pid": proc.pid}
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


STEPS_PER_EPOCH = 256 // 2 // 32  # train samples (--limit 256) / workers / batch
EPOCHS = 3


def _submit(ray: str, head: dict, job_id: str, entry: list[str], runtime_env: Path) -> subprocess.Popen:
    """``ray job submit`` in the foreground of its own process: it follows the job's log to its end."""
    cmd = [ray, "job", "submit", "--address", head["address"], "--submission-id", job_id, "--working-dir",
           str(REPO), "--runtime-env", str(runtime_env), "--", *entry]
    return subprocess.Popen(cmd, env=head["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ended(proc: subprocess.Popen) -> tuple[int, str]:
    """The submitting CLI's exit code and output (the driver's log, then the job's status)."""
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def _checkpoints(storage: Path) -> list[tuple[int, bool, int, int]]:
    """(global step, written by a stop, epoch, step in it) of every complete checkpoint, in step order."""
    out = []
    for meta in storage.glob("checkpoint_*/meta.json"):
        if (meta.parent / "rank-1.pt").is_file():
            try:
                m = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue  # being written
            epoch, step = m["epoch"], m["step_in_epoch"]
            out.append((epoch * STEPS_PER_EPOCH + step, bool(m["metrics"].get("stopped")), epoch, step))
    return sorted(out)


def _wait(predicate, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def _workers(root: Path) -> list[dict] | None:
    """The job's ``workers.json`` (rank 0 logs it to MLflow at start), or None while it is not there."""
    for path in root.glob("mlartifacts/**/workers.json"):
        try:
            return json.loads(path.read_text())["workers"]
        except (OSError, ValueError):
            return None  # being written
    return None


def _run(uri: str):
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("submit").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run per job name, resubmissions included
    return runs[0]


def _steps(uri: str, run) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "step_train_loss"))


def test_job_submit_trains_with_token_auth_and_stops_at_a_step(head, tmp_path, fmnist_dir):
    """One job name, three submissions: SIGTERM to one worker stops the first, ``ray job stop`` the
    second, each at a step boundary with its MLflow run KILLED; the third continues from there and finishes."""
    shards = tmp_path / "fm"
    assert main(["shard", str(fmnist_dir), str(shards), "--limit", "256", "--no-progress"]) == 0
    ray = str(VENV_BIN / "ray")

    # Token auth is on: a client with the wrong token is turned away.
    wrong = {**head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    denied = subprocess.run([ray, "job", "list", "--address", head["address"]], env=wrong,
                            capture_output=True, text=True)
    assert denied.returncode != 0

    # The project's runtime env lets `ray job stop` wait for the stop checkpoint (Ray's default SIGKILLs after 3 s).
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert int(runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 45
    # The ranks agree on a stop at every step: this short job could otherwise end within one check period.
    runtime_env["env_vars"]["PIPELINE_STOP_CHECK_S"] = "0"
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    storage = tmp_path / "ray_results" / "submitted"
    entry = ["python", "-m", "pipeline.train", "--config", "fashion_mnist",
             "--set", f"data.shards={shards}", "--set", f"train.epochs={EPOCHS}", "--set", "train.batch_size=32",
             "--set", "scaling.num_workers=2", "--set", "run.name=submitted", "--set", "train.log_every_steps=1",
             "--set", "run.checkpoint_every_steps=1", "--set", f"run.storage_path={tmp_path / 'ray_results'}",
             "--set", f"tracking.tracking_uri={uri}", "--set", "tracking.experiment=submit",
             "--set", f"tracking.artifact_location={tmp_path / 'mlartifacts'}"]

    # 1. SIGTERM to the worker process of rank 1 (a spot node's notice): rank 0 learns of it and checkpoints.
    job = _submit(ray, head, "h-sigterm-worker", entry, env_file)
    _wait(lambda: _checkpoints(storage), "the first step checkpoint")
    rank1 = next(w for w in _wait(lambda: _workers(tmp_path), "workers.json") if w["world_rank"] == 1)
    assert rank1["pid"] in descendants(head["pid"])  # a worker of this test's own cluster
    os.kill(rank1["pid"], signal.SIGTERM)
    code, out = _ended(job)
    reason = f"SIGTERM to worker rank 1 on {rank1['node_ip']}"
    assert code != 0 and "failed with exit code 143" in out, out[-3000:]  # the driver's code after a SIGTERM stop
    assert f"stopped by {reason} after a checkpoint" in out, out[-3000:]
    run = _run(uri)
    assert run.info.status == "KILLED" and run.data.tags["pipeline.end_reason"] == reason
    first_stop, stopped, epoch, step = _checkpoints(storage)[-1]
    assert stopped and 0 < first_stop < EPOCHS * STEPS_PER_EPOCH
    assert _steps(uri, run) == list(range(1, first_stop + 1))

    # 2. `ray job stop`: SIGTERM to the driver, which asks the workers to checkpoint at the next step.
    job = _submit(ray, head, "h-job-stop", entry, env_file)
    _wait(lambda: _checkpoints(storage)[-1][0] > first_stop, "a step checkpoint of the resubmitted job")
    stop = subprocess.run([ray, "job", "stop", "--address", head["address"], "h-job-stop"], env=head["env"],
                          capture_output=True, text=True, timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    code, out = _ended(job)
    assert "was stopped" in out, out[-3000:]
    assert f"resuming at epoch {epoch + 1} step {step}" in out, out[-3000:]  # a stop is never at step 0
    assert "RAY_JOB_STOP_WAIT_TIME_S" not in out  # the driver's line when the wait is too short
    run = _run(uri)
    assert run.info.status == "KILLED" and run.data.tags["pipeline.end_reason"] == "SIGTERM to the driver"
    second_stop, stopped, epoch, step = _checkpoints(storage)[-1]
    assert stopped and first_stop < second_stop < EPOCHS * STEPS_PER_EPOCH
    assert _steps(uri, run) == list(range(1, second_stop + 1))

    # 3. The same command again continues from the second stop's step and finishes.
    code, out = _ended(_submit(ray, head, "h-finish", entry, env_file))
    assert code == 0, out[-4000:]
    assert "succeeded" in out.lower()
    assert f"resuming at epoch {epoch + 1} step {step}" in out, out[-3000:]
    assert "test accuracy (val split): top-1" in out
    run = _run(uri)
    assert run.info.status == "FINISHED"
    assert _steps(uri, run) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))  # every step once, none repeated


def test_a_submitted_driver_says_when_ray_job_stop_would_kill_it_before_its_checkpoint(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RAY_JOB_STOP_WAIT_TIME_S", raising=False)
    assert job_stop_wait_note(30) is None  # not run by `ray job submit`
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor gives its driver
    note = job_stop_wait_note(30)
    assert note and "3 s after SIGTERM" in note and "RAY_JOB_STOP_WAIT_TIME_S=60" in note
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "45")
    assert job_stop_wait_note(30) is None
    assert "RAY_JOB_STOP_WAIT_TIME_S=76" in job_stop_wait_note(60.5)
