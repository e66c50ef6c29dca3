"""Shards as their consumers see them: wds2idx-identical indexes read by DALI on the CPU;
crash safety (SIGKILL, resume); and the Ray executor writing the same bytes as the local pool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _shard_helpers import dir_bytes, kill_build_after
from conftest import label_from_pixels, make_label_folder, temp_dir_under_tmp
from pipeline.cli import main
from pipeline.shard.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
FM_ARGS = ["--limit", "1500", "--samples-per-shard", "50", "--no-progress"]


@pytest.fixture(scope="module")
def fm_reference(fmnist_dir, tmp_path_factory) -> Path:
    """An uninterrupted Fashion-MNIST subset build: 30 + 30 small shards."""
    out = tmp_path_factory.mktemp("fm") / "ref"
    assert main(["shard", str(fmnist_dir), str(out), *FM_ARGS, "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    src = make_label_folder(root / "src", ["a", "b", "c", "d"], [5, 4, 3, 6], size=(40, 30))
    out = root / "out"
    assert main(["shard", str(src), str(out), "--samples-per-shard", "7", "--no-progress"]) == 0
    return out


def test_idx_equals_wds2idx(folder_shards, tmp_path):
    wds2idx = Path(sys.executable).with_name("wds2idx")
    for shard in read_manifest(folder_shards)["splits"]["train"]["shards"]:
        ref = tmp_path / shard["index"]
        subprocess.run([str(wds2idx), str(folder_shards / shard["tar"]), str(ref)], check=True, capture_output=True)
        assert (folder_shards / shard["index"]).read_bytes() == ref.read_bytes()


def test_dali_reads_shards_with_indexes_on_cpu(folder_shards):
    from nvidia.dali import fn, pipeline_def, types

    m = read_manifest(folder_shards)
    shards = m["splits"]["train"]["shards"]
    total = m["splits"]["train"]["samples"]

    @pipeline_def(batch_size=total, num_threads=1, device_id=None)
    def pipe():
        img, cls = fn.readers.webdataset(
            paths=[str(folder_shards / s["tar"]) for s in shards],
            index_paths=[str(folder_shards / s["index"]) for s in shards],
            ext=["jpg", "cls"], missing_component_behavior="error", random_shuffle=False)
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    images, labels = p.run()
    seen = []
    for i in range(total):
        img = np.asarray(images.at(i))
        label = int(bytes(np.asarray(labels.at(i))).decode())
        assert img.shape == (30, 40, 3)
        assert label_from_pixels(img.mean(), 4) == label
        seen.append(label)
    assert sorted(np.bincount(seen).tolist()) == [3, 4, 5, 6]


def test_sigkill_mid_build_then_resume_is_byte_identical(fmnist_dir, fm_reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline", "shard", str(fmnist_dir), str(out), *FM_ARGS, "--workers", "1"]
    done = kill_build_after(cmd, out, 3, cwd=ROOT, timeout=60)
    assert 3 <= done < 60
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done} of 60 shards already done" in resumed.stderr
    assert dir_bytes(out) == dir_bytes(fm_reference)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # the killed run's temporaries are gone


@pytest.mark.slow
def test_ray_executor_writes_the_same_bytes(fmnist_dir, fm_reference, tmp_path, ray_local):
    out = tmp_path / "ray"
    assert main(["shard", str(fmnist_dir), str(out), *FM_ARGS, "--executor", "ray"]) == 0
    assert dir_bytes(out) == dir_bytes(fm_reference)


@pytest.mark.slow
def test_ray_executor_from_a_fresh_host_starts_its_own_ray_quietly(fmnist_dir, tmp_path):
    """`pipeline shard --executor ray` on a host that never ran Ray (HOME empty, no RAY_ADDRESS or
    RAY_AUTH_MODE): a local Ray with token authentication, without Ray's notice saying so on the console."""
    args = [str(fmnist_dir), "--limit", "300", "--samples-per-shard", "100", "--no-progress"]
    local = tmp_path / "local"
    assert main(["shard", args[0], str(local), *args[1:]]) == 0
    home = tmp_path / "home"
    home.mkdir()
    with temp_dir_under_tmp() as tmpdir:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        env.update(HOME=str(home), TMPDIR=str(tmpdir))
        done = subprocess.run([str(Path(sys.executable).with_name("pipeline")), "shard", args[0], str(tmp_path / "ray"),
                               *args[1:], "--executor", "ray"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (home / ".ray" / "auth_token").is_file()  # Ray made a token: authentication is on
    assert "Token authentication" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert "tasks per node: " in done.stdout
    assert dir_bytes(tmp_path / "ray") == dir_bytes(local)
