"""Several Ray nodes on one machine: a head and worker nodes on loopback addresses, started by cluster/local.sh.

Linux routes all of 127.0.0.0/8 to loopback, so 127.0.0.2, 127.0.0.3, … are distinct
nodes to Ray and Ray Train. One cluster (head with no CPUs for tasks, two 1-CPU
worker nodes) and one MLflow server (cluster/mlflow_server.sh on 127.0.0.1, the
tracking path a cluster takes) serve every test here; each test logs to its own
experiment. HOME is an empty directory, so the scripts run as on a fresh host and
create the cluster's token themselves. Teardown stops exactly the nodes the script
started (by their recorded pids) and the server's process tree.
"""

from __future__ import annotations

import contextlib
import filecmp
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data.coverage import digest
from _proc import descendants

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LOCAL = REPO / "cluster" / "local.sh"
JOB_TIMEOUT_S = 900


def _sh(cluster, *args: str, timeout: float = 1000, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(LOCAL), *args], env=cluster["env"], capture_output=True, text=True,
                          timeout=timeout, **kw)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def cluster():
    state = Path(tempfile.mkdtemp(prefix="plc-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    home = state / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HOME=str(home), PIPELINE_LOCAL_CLUSTER=str(state / "c"), PYTHONUNBUFFERED="1",
               PIPELINE_LOCAL_TIMEOUT="900",  # a node may take minutes to start on a busy 2-core machine
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    info = {"env": env, "state": state}
    try:
        up = _sh(info, "up", "3", "--cpus", "1", "--head-cpus", "0")
        assert (home / ".ray" / "auth_token").is_file(), "start_head.sh did not create the token"
        assert "Created the cluster token" in (state / "c" / "node-0.log").read_text()
        for line in up.stdout.splitlines():
            if line.startswith("export "):
                key, value = line[len("export "):].split("=", 1)
                env[key] = value
        with _mlflow_server(state, env) as uri:
            info["tracking_uri"] = uri
            yield info
    finally:
        subprocess.run([str(LOCAL), "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def _mlflow_server(state: Path, env: dict[str, str]):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_env = {**env, "MLFLOW_PORT": str(port), "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{state / 'mlruns.db'}",
                  "MLFLOW_ARTIFACTS_DESTINATION": str(state / "mlartifacts")}
    log = open(state / "mlflow.log", "w")
    proc = subprocess.Popen([str(REPO / "cluster" / "mlflow_server.sh"), "--workers", "1"], env=server_env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=state)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not come up: {(state / 'mlflow.log').read_text()[-2000:]}")
                time.sleep(1)
        yield uri
    finally:
        pids = descendants(proc.pid) + [proc.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def shards(cluster, fmnist_dir):
    out = cluster["state"] / "shared" / "fm"
    assert main(["shard", str(fmnist_dir), str(out), "--limit", "512", "--samples-per-shard", "128",
                 "--no-progress"]) == 0
    return out


def _submit(cluster, tmp_path: Path, run: str, *sets: str, wait: bool = True):
    entry = [str(REPO / "cluster" / "submit.sh"), "--config", "fashion_mnist",
             "--set", "train.batch_size=32", "--set", "scaling.num_workers=2", "--set", f"run.name={run}",
             "--set", f"run.storage_path={tmp_path / 'ray_results'}",
             "--set", f"tracking.tracking_uri={cluster['tracking_uri']}", "--set", f"tracking.experiment={run}"]
    for s in sets:
        entry += ["--set", s]
    log = open(tmp_path / f"{run}.log", "w")
    proc = subprocess.Popen(entry, env=cluster["env"], stdout=log, stderr=subprocess.STDOUT)
    if wait:
        proc.wait(timeout=JOB_TIMEOUT_S)
        log.close()
        return proc.returncode, (tmp_path / f"{run}.log").read_text()
    return proc


def _mlflow_run(cluster, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(cluster["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"one MLflow run per job, found {len(runs)}"
    return client, runs[0]


def _epoch_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_job_spreads_two_workers_over_two_nodes(cluster, shards, tmp_path):
    rc, out = _submit(cluster, tmp_path, "spread", f"data.shards={shards}", "train.epochs=1",
                      "scaling.placement_strategy=STRICT_SPREAD")
    assert rc == 0, out[-4000:]
    assert "rank 1/2: node 127.0.0." in out  # the layout line of every rank, printed by rank 0
    # cluster/submit.sh keeps Ray CLI's job id and status lines, not its records of packaging and upload.
    lines = out.splitlines()
    submitted = [line for line in lines if line.startswith("Job 'raysubmit_") and " submitted: ray job logs " in line]
    assert len(submitted) == 1 and lines[0] == submitted[0], out[:3000]
    assert lines[-1] == submitted[0].split(" submitted:")[0] + " succeeded", out[-3000:]
    assert not [line for line in lines if " -- " in line and line[:4].isdigit()], out[:3000]  # no "<time> INFO x.py -- "
    assert "Next steps" not in out and "Running entrypoint" not in out and "" not in lines, out[:3000]

    client, run = _mlflow_run(cluster, "spread")
    layout = json.loads(Path(client.download_artifacts(run.info.run_id, "workers.json", str(tmp_path))).read_text())
    workers = layout["workers"]
    ips = [w["node_ip"] for w in workers]
    assert len(set(ips)) == 2 and all(ipaddress.ip_address(ip) in ipaddress.ip_network("127.0.0.0/8") for ip in ips)
    assert sorted(w["node_rank"] for w in workers) == [0, 1]
    assert [w["local_rank"] for w in workers] == [0, 0]
    assert run.data.tags["pipeline.nodes"] == "2"
    # The ranks' planned slices of an epoch tile the training split ...
    train = json.loads((shards / "index.json").read_text())["splits"]["train"]
    ranges = sorted(tuple(w["train_samples"]) for w in workers)
    assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == train["samples"]
    assert _epoch_history(client, run.info.run_id, "world_size") == [(1, 2.0)]
    # ... and what they read tiles it too: each rank's keys of the epoch, as it recorded them.
    cov = json.loads(Path(client.download_artifacts(run.info.run_id, "coverage/epoch-0001.json",
                                                    str(tmp_path))).read_text())
    ranks = sorted(cov["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1] and cov["epoch"] == 1
    keys = [set(r["keys"]) for r in ranks]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == _tar_keys(shards, train)
    for r, mine in zip(ranks, keys):
        assert r["from_batch"] == 0 and r["samples"] == 256  # 8 batches of 32, padding included
        assert {k: r[k] for k in ("distinct", "xor", "sum")} == digest(mine)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie that nobody has reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_submit_script_ends_its_cli_on_sigterm_and_the_job_runs_on(cluster, shards, tmp_path):
    """SIGTERM to cluster/submit.sh (what a closed terminal or a batch scheduler sends) ends the Ray CLI and
    the script's output filter at once, as for a plain `ray job submit`; the job runs on, `ray job stop` stops it."""
    proc = _submit(cluster, tmp_path, "detach", f"data.shards={shards}", "train.epochs=500", wait=False)
    log = tmp_path / "detach.log"
    try:
        _wait_for(lambda: "detach: starting;" in log.read_text(), "the job's first line", proc=proc)
        below = descendants(proc.pid)  # the Ray CLI and sed
        assert len(below) >= 2, below
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    _wait_for(lambda: all(_gone(pid) for pid in below), "the script's processes to exit", timeout=30)
    out = log.read_text()
    assert "Traceback" not in out, out[-3000:]
    status = _ray_job(cluster, "status", out)
    assert "running" in status.lower(), status
    _stop_job(cluster, out)
    status = _ray_job(cluster, "status", out)
    assert "was stopped" in status.lower(), status


def _ray_job(cluster, command: str, log: str, timeout: float = 120) -> str:
    """``ray job COMMAND <id>`` for the job whose submission printed ``log``; its output."""
    job = log.split("Job '", 1)[1].split("'", 1)[0]
    done = subprocess.run([str(VENV_BIN / "ray"), "job", command, "--address", cluster["env"]["RAY_DASHBOARD"], job],
                          env={**cluster["env"], "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _stop_job(cluster, log: str) -> None:
    _ray_job(cluster, "stop", log, timeout=300)


def _tar_keys(shards: Path, split: dict) -> set[str]:
    """The split's sample keys, read from its tar files' member names."""
    keys = set()
    for shard in split["shards"]:
        with tarfile.open(shards / shard["tar"]) as tf:
            keys.update(m.name.split(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".cls"))
    return keys


def test_shard_build_runs_tasks_on_several_nodes(cluster, fmnist_dir, tmp_path):
    args = [str(fmnist_dir), "--limit", "600", "--samples-per-shard", "100", "--no-progress"]
    local = tmp_path / "local"
    assert main(["shard", *args[:1], str(local), *args[1:]]) == 0
    spread = tmp_path / "ray"
    done = subprocess.run([str(VENV_BIN / "pipeline"), "shard", args[0], str(spread), *args[1:], "--executor", "ray",
                           "--ray-address", cluster["env"]["RAY_ADDRESS"]],
                          env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("tasks per node: "))
    per_node = dict(item.rsplit(" ", 1) for item in line[len("tasks per node: "):].split(", "))
    assert len(per_node) > 1, line
    assert sum(int(v) for v in per_node.values()) == 12
    names = sorted(p.name for p in local.iterdir() if p.is_file())
    assert names == sorted(p.name for p in spread.iterdir() if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(local, spread, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def _wait_for(predicate, what: str, timeout: float = 600, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) while waiting for {what}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(1)


def _history(cluster, experiment: str, key: str) -> list[float]:
    """Values of ``key`` by epoch in the experiment's run so far (none before the run exists)."""
    import mlflow

    client = mlflow.MlflowClient(cluster["tracking_uri"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return [v for _, v in _epoch_history(client, runs[0].info.run_id, key)] if runs else []


def _lose_node_mid_run(cluster, tmp_path: Path, run: str, epochs: int, *sets: str, shrink: bool,
                       stop_when=None) -> None:
    """Kill worker node 1 after the first epoch; restart it at once, or once the job runs on with one worker.

    The job's progress is read from its MLflow run (the tracking server), as a user would watch it.
    With ``stop_when``, the job is stopped with ``ray job stop`` once that holds, as a user would end
    a job that has shown what they waited for; otherwise it runs to its last epoch.
    """
    proc = _submit(cluster, tmp_path, run, f"train.epochs={epochs}", *sets, wait=False)
    try:
        _wait_for(lambda: len(_history(cluster, run, "train_loss")) >= 1, "the first epoch", proc=proc)
        _sh(cluster, "kill", "1")
        try:
            if shrink:
                _wait_for(lambda: 1.0 in _history(cluster, run, "world_size"), "an epoch with one worker",
                          proc=proc)
        finally:
            _sh(cluster, "start", "1")  # the next test needs the node, whatever happened here
        if stop_when is not None:
            _wait_for(stop_when, "the job to show what the test waits for", proc=proc)
            _stop_job(cluster, (tmp_path / f"{run}.log").read_text())
        proc.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / f"{run}.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    # What Ray's processes logged about the fault reaches the console as each traceback's last line.
    assert "Traceback (most recent call last)" not in out and '  File "' not in out, out[-4000:]
    assert "View run" not in out, out[-4000:]  # MLflow's own line at each worker group's end
    assert "\x1b[" not in out, out[-4000:]  # Ray's prefixes of its processes' lines, uncoloured in a log


def _assert_one_run_every_epoch_once(cluster, experiment: str, epochs: int | None = None):
    """The job's one MLflow run, with epochs 1..N each logged once (N = ``epochs`` where given)."""
    client, run = _mlflow_run(cluster, experiment)
    history = _epoch_history(client, run.info.run_id, "train_loss")
    steps = [step for step, _ in history]
    assert steps == list(range(1, (epochs or len(steps)) + 1)), f"an epoch missing or logged twice: {steps}"
    return client, run


def _restarts(run) -> list[int]:
    """Epochs at which the worker group (re)started: the tags ``pipeline.world_size_from_epoch_N``."""
    prefix = "pipeline.world_size_from_epoch_"
    return sorted(int(k[len(prefix):]) for k in run.data.tags if k.startswith(prefix))


def test_elastic_job_shrinks_on_node_loss_and_grows_back(cluster, shards, tmp_path):
    # Enough epochs that the group grows back before the end, even on a loaded machine where the
    # node takes a minute to rejoin (an epoch here takes 1-3 s; runs regrew at epochs 11 and 15);
    # once an epoch has run on the regrown group the job is stopped with `ray job stop`.
    # Until Ray marks the lost node dead it counts its CPU, so the first restart may ask for 2
    # workers and wait in vain: 15 s, not Ray's 60.
    def regrown() -> bool:
        sizes = _history(cluster, "elastic", "world_size")
        return 1.0 in sizes and sizes[-1] == 2.0  # the last epoch came after a 1-worker one

    _lose_node_mid_run(cluster, tmp_path, "elastic", 60, f"data.shards={shards}", "scaling.min_workers=1",
                       "scaling.resize_check_s=3", "scaling.group_start_timeout_s=15", shrink=True,
                       stop_when=regrown)
    out = (tmp_path / "elastic.log").read_text()
    assert "timed out after 60" not in out, out[-4000:]  # the config's 15 s reached Ray Train's controller
    assert "was stopped" in out, out[-4000:]  # it ended by `ray job stop`, not by running out of epochs
    client, run = _assert_one_run_every_epoch_once(cluster, "elastic")
    assert run.info.status == "KILLED", run.info.status
    sizes = [int(v) for _, v in _epoch_history(client, run.info.run_id, "world_size")]
    assert sizes[0] == 2 and 1 in sizes, sizes
    assert sizes[-1] == 2 and sizes.index(1) < len(sizes) - 1 - sizes[::-1].index(1), f"no regrowth: {sizes}"
    # The start, the shrink and the regrowth each tag the epoch they start from; a shrink before
    # the first checkpoint starts from the same epoch as the start and shares its tag.
    assert len(_restarts(run)) >= 2
    # The controller saw a checkpoint of the running 1-worker group newer than when it decided to grow it
    # (pipeline.train.resize), and the bigger group resumed after it.
    # Through the driver's console: a line of ours, not one with Ray's "(TrainController pid=…)" prefix.
    grown = out.rfind("before the worker group resizes to 2 worker(s)")
    assert grown > 0 and re.search(r"^\[pipeline\] elastic: checkpoint at step \d+ before", out, re.M), out[-4000:]
    assert "elastic: resuming" in out[grown:], out[grown:][-4000:]


def test_fixed_size_job_resumes_from_checkpoint_when_the_node_is_back(cluster, shards, tmp_path):
    # The group restarts from the newest complete checkpoint on storage, also one the controller
    # had not registered yet when the node was lost (pipeline.train.resume).
    epochs = 4
    _lose_node_mid_run(cluster, tmp_path, "fixed", epochs, f"data.shards={shards}", shrink=False)
    client, run = _assert_one_run_every_epoch_once(cluster, "fixed", epochs)
    assert _restarts(run)[0] == 1 and max(_restarts(run)) >= 2, run.data.tags  # restarted from a checkpoint
    out = (tmp_path / "fixed.log").read_text()
    assert out.count("fixed: starting;") == 1 and "fixed: resuming " in out, out[-4000:]  # never from scratch
    assert {int(v) for _, v in _epoch_history(client, run.info.run_id, "world_size")} == {2}


def test_node_that_cannot_see_the_shards_fails_the_job_at_start(cluster, shards, tmp_path):
    # A fourth node whose processes run in a mount namespace of their own, where the shared
    # directory is an empty tmpfs: the shards exist for every node but this one.
    hidden = shards.parent
    blind = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f'mount -t tmpfs tmpfs "{hidden}" && exec "{LOCAL}" start 3'],
                           env=cluster["env"], capture_output=True, text=True, timeout=1000)
    if blind.returncode != 0 and "unshare" in blind.stderr and "Operation not permitted" in blind.stderr:
        pytest.skip("no permission for a private mount namespace here")
    assert blind.returncode == 0, blind.stdout + blind.stderr
    try:
        t0 = time.time()
        rc, out = _submit(cluster, tmp_path, "blind", f"data.shards={shards}", "train.epochs=1")
        assert rc != 0
        assert f"node 127.0.0.5: cannot read {shards}/index.json" in out, out[-4000:]
        assert "train_loss" not in out  # failed before any training, not after retries
        assert time.time() - t0 < 300
    finally:
        _sh(cluster, "stop", "3")
