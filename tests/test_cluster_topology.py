"""The node probe, the elastic lr rule and the ScalingConfig mapping, without a cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.train.config import load_config
from pipeline.train.topology import index_digest, probe, realign_schedule, scale_lr


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, fmnist_dir):
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("topology") / "fm"
    assert main(["shard", str(fmnist_dir), str(out), "--limit", "64", "--no-progress"]) == 0
    return out


def test_probe_accepts_a_node_that_sees_the_planned_shards(shard_dir, tmp_path):
    assert probe(str(shard_dir), index_digest(shard_dir), str(tmp_path / "results")) is None
    assert (tmp_path / "results").is_dir() and not list((tmp_path / "results").iterdir())  # probe file removed


def test_probe_names_what_a_node_cannot_see(shard_dir, tmp_path):
    digest = index_digest(shard_dir)
    assert "cannot read" in probe(str(tmp_path / "elsewhere"), digest, str(tmp_path))
    assert "differs from the one the job was planned with" in probe(str(shard_dir), "0" * 64, str(tmp_path))
    partial = tmp_path / "partial"
    shutil.copytree(shard_dir, partial)
    tar = next(partial.glob("*.tar"))
    tar.unlink()
    assert f"cannot read {tar}" in probe(str(partial), digest, str(tmp_path))


def test_probe_names_a_shard_cut_short_or_written_over(shard_dir, tmp_path):
    # A node's copy of the shards that an interrupted sync left short: found at start, not by the loader
    # hours into the job (where DALI may take the rank's process down with it).
    digest = index_digest(shard_dir)
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    tar = sorted(copy.glob("*.tar"))[-1]
    listed = tar.stat().st_size
    with open(tar, "r+b") as f:
        f.truncate(listed - 512)
    problem = probe(str(copy), digest, str(tmp_path / "results"))
    assert problem == (f"{tar} is {listed - 512:,} bytes where {copy / 'index.json'} lists {listed:,}: an incomplete "
                       f"or changed copy (`pipeline verify {copy}` checks every shard)"), problem
    with open(tar, "ab") as f:
        f.write(b"\0" * 1024)  # longer than listed: written over by something else
    assert f"is {listed + 512:,} bytes where" in probe(str(copy), digest, str(tmp_path / "results"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_probe_reports_storage_it_cannot_write(shard_dir, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert "cannot write to run.storage_path" in probe(str(shard_dir), index_digest(shard_dir), str(ro))


def test_probe_storage_under_a_file_is_reported(shard_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    problem = probe(str(shard_dir), index_digest(shard_dir), str(blocker / "results"))
    assert problem.startswith(f"cannot write to run.storage_path {blocker / 'results'}")


def test_elastic_lr_follows_the_live_world_size():
    cfg = load_config("fashion_mnist", ["scaling.num_workers=4", "scaling.min_workers=1", "optim.lr=0.4"])
    assert scale_lr(cfg, 4).optim.lr == pytest.approx(0.4)
    assert scale_lr(cfg, 2).optim.lr == pytest.approx(0.2)
    fixed = load_config("fashion_mnist", ["scaling.num_workers=4", "optim.lr=0.4"])
    assert scale_lr(fixed, 2).optim.lr == pytest.approx(0.4)  # a fixed-size job never changes lr


def test_schedule_recounted_in_the_new_world_steps():
    class Schedule:
        step_num = 130

    s = Schedule()
    realign_schedule(s, {"world_size": 2, "epoch": 13}, 1, 19)
    assert s.step_num == 13 * 19
    s.step_num = 130
    realign_schedule(s, {"world_size": 2, "epoch": 13}, 2, 10)
    assert s.step_num == 130  # same world: the saved count stands


def test_scaling_config_maps_placement_and_elastic_size():
    from ray.train import ScalingConfig

    from pipeline.train.launch import scaling_config

    cfg = load_config("fashion_mnist", ["scaling.num_workers=3", "scaling.min_workers=1",
                                        "scaling.placement_strategy=STRICT_SPREAD", "scaling.resize_check_s=5"])
    sc = scaling_config(cfg, ScalingConfig)
    assert sc.num_workers == (1, 3) and sc.placement_strategy == "STRICT_SPREAD"
    assert sc.elastic_resize_monitor_interval_s == 5
    assert scaling_config(load_config("fashion_mnist", ["scaling.num_workers=3"]), ScalingConfig).num_workers == 3


def test_bad_scaling_values_are_one_line_errors():
    with pytest.raises(UserError, match="placement_strategy"):
        load_config("fashion_mnist", ["scaling.placement_strategy=spread"])
    with pytest.raises(UserError, match="min_workers"):
        load_config("fashion_mnist", ["scaling.num_workers=2", "scaling.min_workers=3"])


def test_a_local_ray_moves_off_a_tmpdir_too_long_for_its_sockets(monkeypatch, capsys):
    from pipeline.train.launch import local_ray_temp_dir

    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", "/tmp/slurm-1234567")
    assert local_ray_temp_dir() is None  # Ray's own choice fits: left alone, nothing printed
    monkeypatch.delenv("TMPDIR")
    assert local_ray_temp_dir() is None
    monkeypatch.setenv("TMPDIR", "/local/scratch/pbs.1234567.pbs-server01.example.org/tmp")
    assert local_ray_temp_dir() == f"/tmp/ray-{os.getuid()}"
    assert capsys.readouterr().err.count("TMPDIR is too long for Ray's socket paths") == 1
    monkeypatch.setenv("RAY_TMPDIR", "/tmp/ray-short")  # Ray reads RAY_TMPDIR before TMPDIR
    assert local_ray_temp_dir() is None
    monkeypatch.setenv("RAY_TMPDIR", "/local/scratch/pbs.1234567.pbs-server01.example.org/ray")
    with pytest.raises(UserError, match="set a shorter RAY_TMPDIR"):
        local_ray_temp_dir()


CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
LONG = "/local/scratch/pbs.1234567.pbs-server01.example.org/tmp"  # a batch scheduler's per-job TMPDIR: 56 bytes


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_TEMP_DIR", "RAY_TMPDIR", "TMPDIR", "RAY_ADDRESS")}
    # No `ray` on PATH: should the rule ever let a script through, it fails instead of starting a real head.
    return {**env, "HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", **values}


def test_the_cluster_scripts_follow_the_same_temp_dir_rule(tmp_path):
    source = f'. "{CLUSTER / "ray_temp_dir.sh"}"; echo "RAY_TEMP_DIR=${{RAY_TEMP_DIR:-}}"'
    for values, chosen in (({}, ""), ({"TMPDIR": "/tmp/slurm-1234567"}, ""),
                           ({"TMPDIR": LONG}, f"/tmp/ray-{os.getuid()}"),
                           ({"TMPDIR": LONG, "RAY_TMPDIR": "/tmp/ray-short"}, ""),
                           ({"TMPDIR": LONG, "RAY_TEMP_DIR": "/tmp/my-ray"}, "/tmp/my-ray")):
        done = subprocess.run(["bash", "-c", f"set -euo pipefail; {source}"], env=_env(tmp_path, **values),
                              capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout == f"RAY_TEMP_DIR={chosen}\n", (values, done)
        moved = chosen == f"/tmp/ray-{os.getuid()}"
        assert done.stderr.count("TMPDIR is too long for Ray's socket paths") == int(moved), (values, done.stderr)
    # A temp dir the user chose that cannot hold Ray's sockets: one line and exit code 2, before anything starts.
    for name, value in (("RAY_TEMP_DIR", LONG), ("RAY_TMPDIR", LONG)):
        for script in (["start_head.sh"], ["start_worker.sh", "127.0.0.1:6379"]):
            done = subprocess.run([str(CLUSTER / script[0]), *script[1:]], capture_output=True, text=True,
                                  env=_env(tmp_path, RAY_AUTH_TOKEN="0" * 64, **{name: value}), timeout=60)
            assert done.returncode == 2 and not done.stdout, (script, name, done)
            assert done.stderr.splitlines() == [f"error: {name} is {len(value)} bytes long, too long for Ray's socket "
                                                f"paths (at most {39 if name == 'RAY_TEMP_DIR' else 35} bytes): set a "
                                                f"shorter {name} ({value})"], (script, done.stderr)
            assert not (tmp_path / "home" / ".ray").exists()


@pytest.mark.parametrize("override, needle", [
    ("scaling.use_gpu=true", "the job needs 2 GPU(s) (2 worker(s) × 1), this machine has 0"),
    ("run.storage_path={blocker}/results", "cannot create run.storage_path"),
])
def test_a_job_this_machine_cannot_run_is_one_error_before_ray_starts(shard_dir, tmp_path, override, needle):
    import sys

    import torch

    if "use_gpu" in override and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A process of its own: a local Ray would have waited for GPUs that are not there, for ever (timeout).
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", "fashion_mnist",
                           "--set", f"data.shards={shard_dir}", "--set", "tracking.enabled=false",
                           "--set", f"run.storage_path={tmp_path / 'rr'}", "--set", override.format(blocker=blocker)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert not proc.stdout
    if "use_gpu" in override:
        assert not (tmp_path / "rr").exists()  # checked before the job's directory is made
