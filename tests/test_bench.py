"""`pipeline bench --quick`: the suite runs end to end and writes a well-formed report (figures not asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.common import HostLoad, Ratio, Result, ratio
from benchmarks.report import markdown, write_report
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _payload() -> dict:
    results = [
        Result("shard", "pass-through", "case", "mb_per_s", "MB/s", [90.0, 100.0, 110.0], {"scaling": 2, "series": "p"}),
        Result("shard", "pass-through 1w", "case", "mb_per_s", "MB/s", [50.0, 55.0], {"scaling": 1, "series": "p"}),
        Result("shard", "tar -cf", "limit", "mb_per_s", "MB/s", [200.0, 200.0]),
    ]
    goal = ratio(results, "pass-through / tar -cf", "pass-through", "tar -cf", metric="mb_per_s", goal=0.9)
    return {"format_version": 1, "started": "2026-01-01T00:00:00+00:00", "quick": False, "stages": ["shard"],
            "machine": {"host": "h", "cpus": 2, "processor": "cpu", "python": "3.11"}, "seconds": {"shard": 1.0},
            "results": [r.to_dict() for r in results], "goals": [goal.to_dict()], "errors": {}}


def test_medians_ratios_and_report_files(tmp_path):
    payload = _payload()
    assert payload["results"][0]["median"] == 100.0
    assert payload["results"][0]["spread"] == pytest.approx(0.1)
    assert payload["goals"][0]["value"] == pytest.approx(0.5) and payload["goals"][0]["met"] is False
    files = write_report(payload, tmp_path, "2026-01-01-h")
    assert sorted(files) == ["json", "markdown", "scaling", "throughput"]
    for key in ("scaling", "throughput"):
        with Image.open(files[key]) as img:
            assert img.format == "PNG" and img.width > 300
    text = files["markdown"].read_text()
    assert "| shard | pass-through | case | MB/s | 100 | ±10% | 3 |  |" in text
    assert "| pass-through / tar -cf | 0.50 | ≥ 0.9 | **no** |" in text
    assert json.loads(files["json"].read_text())["plots"] == {"scaling": "2026-01-01-h-scaling.png",
                                                              "throughput": "2026-01-01-h-throughput.png"}
    assert markdown(payload) == text


def test_ratio_names_missing_case():
    with pytest.raises(KeyError, match=r"no result for \('nope', 'm'\)"):
        ratio([Result("x", "a", "case", "m", "u", [1.0])], "r", "nope", "a", metric="m")
    assert Ratio("r", "a", "b", 1.0).met is None


def test_host_load_records_steal_per_case_and_the_report_names_a_noisy_host():
    host = HostLoad()
    for _ in range(2):
        with host.run("a"):
            time.sleep(0.1)  # the machine's CPU time advances whatever it does
    assert len(host.params("a")["load_avg_1m"]) == 2
    assert len(host.params("a")["cpu_steal"]) == 2 and all(0 <= v <= 1 for v in host.params("a")["cpu_steal"])
    with host.run("b"):
        time.sleep(0.1)
    assert len(host.params("b")["load_avg_1m"]) == 3  # every run so far, in order
    assert len(host.case_params("b")["load_avg_1m"]) == 1 and len(host.case_params("a")["load_avg_1m"]) == 2
    payload = _payload()
    payload["results"][0]["params"]["cpu_steal"] = [0.02, 0.31]
    assert "**Noisy host:**" in markdown(payload) and "(steal, worst run: pass-through 31%)" in markdown(payload)
    payload["results"][0]["params"]["cpu_steal"] = [0.02, 0.03]
    assert "Noisy host" not in markdown(payload)


@pytest.mark.slow
def test_quick_suite_writes_report_and_mlflow_run(tmp_path):
    """The whole suite in --quick mode, as a user runs it, logging to a throwaway MLflow store."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "all", "--quick", "--out", str(tmp_path / "results"),
         "--workdir", str(tmp_path / "work"), "--experiment", "bench-test"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = list((tmp_path / "results").glob("*-quick.json"))
    assert len(reports) == 1
    payload = json.loads(reports[0].read_text())
    assert payload["quick"] is True and payload["errors"] == {}
    stages = {r["stage"] for r in payload["results"]}
    assert stages == {"shard", "load", "train"}
    # Every case run records the CPU time the hypervisor gave to other guests meanwhile.
    assert {r["stage"] for r in payload["results"] if "cpu_steal" in r["params"]} == {"shard", "load", "train"}
    for r in payload["results"]:
        assert all(0 <= v <= 1 for v in r["params"].get("cpu_steal", [])), r
        assert r["role"] in ("case", "baseline", "limit") and r["values"]
        if r["metric"] == "ms_per_image":  # a difference of two stages' times: noise can make it negative
            assert all(math.isfinite(v) for v in r["values"]), r
        else:
            assert all(v > 0 for v in r["values"]), r
    assert {g["name"] for g in payload["goals"]} >= {"build --check header / tar -cf", "DALI-CPU / DALI ROI decode",
                                                     "torchrun 2 / plain loop"}
    # Each training case reports the settings its step really ran with (read back from the step, the
    # loader and torch in that case's own process): equal to what the shared config gives at that world size.
    from benchmarks.train_bench import CASE_SET, bench_config, settings

    train = {r["case"]: r["params"] for r in payload["results"] if r["stage"] == "train"}
    assert set(train) == {"plain-loop", "synthetic", "torchrun-2w", "plain-loop-bf16"}
    for case, params in train.items():
        world = params["world_size"]
        expected = settings(bench_config(Path("s"), tmp_path, world, 2, CASE_SET.get(case, [])), world)
        assert {k: params[k] for k in expected} == expected, case
    from pipeline.train.config import load_config
    from pipeline.train.step import resolve_precision

    # The bundled config's precision, as the step resolves it (auto: bf16 on a CPU with AMX, else fp32).
    shipped = load_config("fashion_mnist").train.precision
    assert train["plain-loop"]["precision"] == resolve_precision(shipped, "cpu")
    assert train["plain-loop-bf16"]["precision"] == "bf16"
    # No CUDA here: the GPU stage says so in one line, after building its JPEG shards on the CPU.
    if not _cuda():
        assert proc.stdout.count("bench gpu: skipped: no CUDA device") == 1
        from pipeline.shard.manifest import read_manifest

        manifest = read_manifest(tmp_path / "work" / "gpu" / "jpeg_shards_64")
        assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 64
    stem = reports[0].with_suffix("")
    for suffix in (".md", "-throughput.png", "-scaling.png"):
        assert Path(f"{stem}{suffix}").stat().st_size > 0

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["bench-test"], output_format="list")
    assert len(runs) == 1
    assert "ratio.build --check header / tar -cf" in runs[0].data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert f"{stem.name}.json" in artifacts


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_cpu_sampler_splits_a_process_tree_into_ranks_and_the_rest():
    import time

    from benchmarks.train_bench import _CpuSampler

    spin = "import time\nt = time.time()\nwhile time.time() - t < 3: pass"
    # A parent that sleeps, with one child that spins (its command line names the bench, as a rank's does;
    # the parent's own command line must not, so the name is put together at run time).
    marker = "'benchmarks.' + 'train_bench'"
    parent = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {spin!r}, {marker}])"
    proc = subprocess.Popen([sys.executable, "-c", parent])
    sampler = _CpuSampler(proc.pid, "plain", period_s=0.1)
    start = time.time()
    proc.wait(timeout=60)
    sampler.stop()
    cores = os.cpu_count() or 1
    shares = sampler.shares(start + 0.8, start + 2.8, cores)
    assert 0.4 / cores < shares["cpu_ranks"] <= 1.1 / cores, shares  # about one core of all of them
    assert shares["cpu_other"] < 0.1 / cores, shares  # the sleeping parent
    kinds = sampler.by_kind(start + 0.8, start + 2.8, cores)
    assert set(kinds) == {"ranks", Path(sys.executable).name}, kinds  # the parent, named after its program
    assert kinds["ranks"] == shares["cpu_ranks"]
    assert sampler._kind_of(["ray::PlacementGroupCleaner.run", "x"]) == "ray::PlacementGroupCleaner.run"
    assert sampler._kind_of(["/venv/bin/python", "-u", "/venv/lib/ray/_private/log_monitor.py"]) == "log_monitor.py"


def test_ray_and_torchrun_cases_train_what_the_plain_loop_trains(tmp_path):
    """One config for every training case: Ray and torchrun differ from the plain loop only in world size."""
    from benchmarks.train_bench import CASE_SET, bench_config, cases, settings

    one, two = bench_config(tmp_path, tmp_path, 1, 3), bench_config(tmp_path, tmp_path, 2, 3)
    a, b = one.to_dict(), two.to_dict()
    differ = {(section, key) for section in a for key in a[section] if a[section][key] != b[section][key]}
    assert differ == {("scaling", "num_workers"), ("run", "name")}
    s1, s2 = settings(one, 1), settings(two, 2)
    from pipeline.train.step import resolve_precision

    assert s1["channels_last"] is True and s1["precision"] == resolve_precision(one.train.precision, "cpu")
    assert s1["torch_threads"] == 1
    assert {k: v for k, v in s1.items() if k not in ("world_size", "loader_threads")} == \
        {k: v for k, v in s2.items() if k not in ("world_size", "loader_threads")}
    # The precision cases differ from the plain loop in train.precision alone.
    for name, precision in (("plain-loop-bf16", "bf16"), ("plain-loop-fp32", "fp32")):
        other = settings(bench_config(tmp_path, tmp_path, 1, 3, CASE_SET[name]), 1)
        assert other["precision"] == precision
        assert {k: v for k, v in other.items() if k != "precision"} == {k: v for k, v in s1.items() if k != "precision"}
    ema = settings(bench_config(tmp_path, tmp_path, 1, 3, CASE_SET["plain-loop-ema"]), 1)
    assert ema["ema_decay"] == 0.999 and s1["ema_decay"] is None
    assert {k: v for k, v in ema.items() if k != "ema_decay"} == {k: v for k, v in s1.items() if k != "ema_decay"}
    # --cases runs a subset, in the usual order, and names what it does not know.
    assert [c[0] for c in cases(quick=True, only=["ray-2w", "plain-loop"])] == ["plain-loop", "ray-2w"]
    with pytest.raises(UserError, match="no case nope"):
        cases(quick=False, only=["nope"])
    # Equal world sizes are compared: every Ray case has its torchrun or plain baseline of the same size.
    full = cases(quick=False)
    worlds = {kind: {w for _, _, k, w in full if k == kind} for kind in ("plain", "ddp", "ray")}
    assert worlds["ray"] <= worlds["plain"] | worlds["ddp"]


@pytest.mark.slow
def test_idle_ray_job_runs_ray_beside_a_case_and_leaves_nothing_behind(tmp_path):
    """`torchrun-2w-beside-ray`'s neighbour: Ray as `fit` starts it, 2 Train workers that sleep; all gone after."""
    import psutil

    from benchmarks.train_bench import (BESIDE_IDLE_RAY, CASE_ENV, CASE_SET, IDLE_RAY, _beside_idle_ray, _CpuSampler,
                                        cases)

    # The case is torchrun-2w in all but its neighbour.
    assert "torchrun-2w-beside-ray" not in CASE_SET and "torchrun-2w-beside-ray" not in CASE_ENV
    assert ("torchrun-2w-beside-ray", "baseline", "ddp", 2) in cases(quick=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with _beside_idle_ray(BESIDE_IDLE_RAY["torchrun-2w-beside-ray"], tmp_path, tmp_path, env) as pid:
        sampler = _CpuSampler(pid, IDLE_RAY, period_s=0.2)
        time.sleep(2)
        sampler.stop()
        procs = psutil.Process(pid).children(recursive=True)
        lines = [" ".join(p.cmdline()) for p in procs]
    assert sum(line.startswith("ray::RayTrainWorker") for line in lines) == 2, lines
    assert any("gcs_server" in line for line in lines) and any("dashboard" in line for line in lines), lines
    kinds = sampler.by_kind(sampler.samples[0][0], sampler.samples[-1][0], os.cpu_count() or 1)
    assert "ranks" not in kinds and "ray::RayTrainWorker" in kinds and "raylet" in kinds, kinds
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, [p.pid for p in alive]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not list(tmp_path.glob("idle-ray-*"))  # its ready, stop and log files


def test_tuning_split_is_carved_from_the_training_images(fmnist_dir, tmp_path):
    """The accuracy suite's tuning copy: 10 % of each class of the 60,000 training images, seeded; t10k unread."""
    import gzip

    import numpy as np

    from benchmarks.accuracy import holdout_source

    def read(root, part):
        with gzip.open(root / f"{part}-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
        with gzip.open(root / f"{part}-labels-idx1-ubyte.gz") as f:
            return images, np.frombuffer(f.read(), np.uint8, offset=8)

    out = holdout_source(fmnist_dir, tmp_path / "tune")
    (train_x, train_y), (val_x, val_y) = read(out, "train"), read(out, "t10k")
    all_x, all_y = read(fmnist_dir, "train")
    assert len(train_y) == 54_000 and len(val_y) == 6_000
    assert np.bincount(val_y).tolist() == [600] * 10  # stratified
    pairs = lambda x, y: sorted(map(bytes, np.concatenate([x, y[:, None]], axis=1)))  # noqa: E731
    assert pairs(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])) == pairs(all_x, all_y)
    assert holdout_source(fmnist_dir, tmp_path / "again")  # same seed, same split
    assert read(tmp_path / "again", "t10k")[1].tolist() == val_y.tolist()


def test_stage_module_writes_the_suites_report(tmp_path):
    """`python -m benchmarks.<stage>_bench --report DIR` writes what `pipeline bench <stage>` writes, and its command."""
    from benchmarks.report import stage_report

    payload = _payload()
    results = [Result(**{k: r[k] for k in ("stage", "case", "role", "metric", "unit", "values", "params")})
               for r in payload["results"]]
    goals = [ratio(results, "pass-through / tar -cf", "pass-through", "tar -cf", metric="mb_per_s", goal=0.9)]
    files = stage_report("shard", results, goals, tmp_path, quick=False, started="2026-01-01T00:00:00+00:00",
                         seconds=2.0, command="python -m benchmarks.shard_bench --repeats 2")
    saved = json.loads(files["json"].read_text())
    assert files["json"].name.startswith("2026-01-01-") and files["json"].name.endswith("-shard.json")
    assert saved["command"] == "python -m benchmarks.shard_bench --repeats 2" and saved["stages"] == ["shard"]
    assert [r["median"] for r in saved["results"]] == [100.0, 52.5, 200.0] and saved["goals"][0]["met"] is False


@pytest.mark.parametrize("store, says", [
    ("http://127.0.0.1:1", "cannot reach the MLflow server at http://127.0.0.1:1"),
    ("htp://127.0.0.1:5000", "MLflow has no store for htp://"),
], ids=["server down", "unknown scheme"])
def test_a_store_the_report_cannot_go_to_is_one_line_before_any_benchmark(tmp_path, capsys, monkeypatch, store, says):
    from pipeline.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    assert main(["bench", "shard", "--quick", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pipeline bench: error: ") and says in err[0], err
    assert "--no-mlflow" in err[0], err
    assert not list((tmp_path / "out").glob("*.json"))  # nothing was measured
