"""``ray job submit`` of ``python -m pipeline.train`` to a ``ray start --head`` on 127.0.0.1 with token auth.

The head is private to this test: its own temp dir, free ports, its own token
(``RAY_AUTH_TOKEN``, so ~/.ray is not touched), started with ``--block`` so that
every process it spawns is its descendant; teardown stops exactly those.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.cli import main
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
    """SIGTERM the head and everything it started, then SIGKILL what is left."""
    pids = descendants(proc.pid) + [proc.pid]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
            try:
                proc.wait(timeout=0)
            except subprocess.TimeoutExpired:
                pass
    proc.wait(timeout=10)


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
        while True:
            probe = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray head did not come up: {(Path(temp_dir) / 'ray-start.log').read_text()[-2000:]}")
            time.sleep(2)
        yield {"address": address, "env": env, "token": token}
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_trains_with_token_auth(head, tmp_path, fmnist_dir):
    shards = tmp_path / "fm"
    assert main(["shard", str(fmnist_dir), str(shards), "--limit", "256", "--no-progress"]) == 0
    ray = str(VENV_BIN / "ray")

    # Token auth is on: a client with the wrong token is turned away.
    wrong = {**head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    denied = subprocess.run([ray, "job", "list", "--address", head["address"]], env=wrong,
                            capture_output=True, text=True)
    assert denied.returncode != 0

    entry = ["python", "-m", "pipeline.train", "--config", "fashion_mnist",
             "--set", f"data.shards={shards}", "--set", "train.epochs=1", "--set", "train.batch_size=32",
             "--set", "scaling.num_workers=2", "--set", "run.name=submitted",
             "--set", f"run.storage_path={tmp_path / 'ray_results'}",
             "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
             "--set", f"tracking.artifact_location={tmp_path / 'mlartifacts'}"]
    done = subprocess.run([ray, "job", "submit", "--address", head["address"], "--working-dir", str(REPO),
                           "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--", *entry],
                          env=head["env"], capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower()
    assert "test accuracy (val split): top-1" in out
    assert (tmp_path / "ray_results" / "submitted").is_dir()
    assert (tmp_path / "mlruns.db").is_file()
