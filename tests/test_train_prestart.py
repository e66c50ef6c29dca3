"""Mistakes ``pipeline train`` finds before Ray starts: one error line, exit 2, nothing made, no MLflow run touched.

Each of these used to pass the driver and fail in every worker, three times over, after Ray had started
(and, for a reused ``run.name``, marked the earlier run FAILED). Real files: shard sets built by
``pipeline shard``, checkpoints written by ``save_checkpoint``, SQLite stores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_label_folder
from pipeline.cli import main
from pipeline.train.checkpoint import save_checkpoint
from pipeline.train.config import load_config
from pipeline.train.launch import _record_failure, resolve_paths
from pipeline.train.models import build_model

CLASSES = ["dark", "light", "mid"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("prestart")
    src = make_label_folder(root / "src", CLASSES, 6)
    assert main(["shard", str(src), str(root / "shards"), "--val-fraction", "0.5", "--no-progress"]) == 0
    assert main(["shard", str(src), str(root / "noval"), "--no-progress"]) == 0  # the default: no val split
    return root


def _train_error(work, tmp_path, capsys, *sets: str, shards: str = "shards", init_from: str | None = None,
                 earlier_job: bool = False) -> str:
    """The one stderr line of a ``pipeline train`` that fails before it starts (exit 2, nothing on stdout), and
    the job's directory, made just before Ray starts, not made (``earlier_job``: it was there before)."""
    args = ["train", "--config", "fashion_mnist", "--set", f"data.shards={work / shards}",
            "--set", f"run.storage_path={tmp_path / 'rr'}", "--set", "run.name=job",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}"]
    for item in sets:
        args += ["--set", item]
    if init_from is not None:
        args += ["--init-from", init_from]
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pipeline train: error: "), captured.err
    assert earlier_job or not (tmp_path / "rr").exists()
    return err[0]


def test_shards_without_a_val_split_are_one_line_naming_the_fixes(work, tmp_path, capsys):
    line = _train_error(work, tmp_path, capsys, shards="noval")
    assert "split 'val' of " in line and "has no samples" in line, line
    assert "--val-fraction" in line and "data.val_split=train" in line, line
    assert not (tmp_path / "mlruns.db").exists()


def test_more_workers_than_samples_is_one_line(work, tmp_path, capsys):
    line = _train_error(work, tmp_path, capsys, "scaling.num_workers=64")
    assert "fewer than world_size=64" in line, line


def test_a_relative_init_from_is_taken_from_the_launch_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_paths(load_config("fashion_mnist", ["train.init_from=runs/job/checkpoint_1"]))
    assert cfg.train.init_from == str(tmp_path.resolve() / "runs/job/checkpoint_1")
    for uri in ("runs:/0123/seed_cnn", "models:/fm/1", "s3://bucket/ckpt"):
        assert resolve_paths(load_config("fashion_mnist", [f"train.init_from={uri}"])).train.init_from == uri


def test_init_from_a_file_that_is_no_checkpoint_is_one_line(work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(work)
    # Relative, as users type it: it names the file under the launch directory, not the workers'.
    line = _train_error(work, tmp_path, capsys, init_from="shards/index.json")
    assert f"cannot read checkpoint {work / 'shards' / 'index.json'}: not a tensors-only PyTorch file" in line, line
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")  # tensors only, but not ours
    line = _train_error(work, tmp_path, capsys, init_from=str(tmp_path / "other.pt"))
    assert "no checkpoint of pipeline train (it holds no model weights)" in line, line


def _finished_job(storage: Path, model: str) -> None:
    """A complete checkpoint of an earlier job under ``storage`` (meta, state and the one rank's file)."""
    ckpt = storage / "checkpoint_2026-12-03_10-00-00.000000"
    meta = {"model": model, "num_classes": 3, "in_channels": 1, "image_size": 28, "classes": CLASSES,
            "world_size": 1, "global_step": 8, "epoch": 2}
    save_checkpoint(ckpt, {"model": build_model(model, 3, 1, 28).state_dict()}, meta)
    torch.save({"rng": torch.zeros(1)}, ckpt / "rank-0.pt")


def test_a_run_name_that_holds_another_model_is_one_line_and_its_run_is_left_alone(work, tmp_path, capsys):
    _finished_job(tmp_path / "rr" / "job", "fmnist_resnet")
    before = sorted(p.name for p in (tmp_path / "rr" / "job").rglob("*"))
    line = _train_error(work, tmp_path, capsys, earlier_job=True)  # the config trains seed_cnn
    assert "run.name=job continues from its checkpoint at step 8" in line, line
    assert "model fmnist_resnet (now seed_cnn)" in line and "another run.name" in line, line
    assert sorted(p.name for p in (tmp_path / "rr" / "job").rglob("*")) == before
    assert not (tmp_path / "mlruns.db").exists()  # no store opened, no run marked FAILED


@pytest.mark.parametrize("kind", ["directory", "foreign file", "scheme"])
def test_a_tracking_uri_no_job_can_log_to_is_one_line(work, tmp_path, capsys, kind):
    if kind == "directory":
        (tmp_path / "mlartifacts").mkdir()
        uri, says = f"sqlite:///{tmp_path / 'mlartifacts'}", "is a directory; an SQLite store is a file"
    elif kind == "foreign file":
        uri, says = f"sqlite:///{work / 'shards' / 'index.json'}", "is not an SQLite database"
    else:
        uri, says = "htp://127.0.0.1:5000", "MLflow has no store for htp://"
    line = _train_error(work, tmp_path, capsys, f"tracking.tracking_uri={uri}")
    assert says in line, line
    assert json.loads((work / "shards" / "index.json").read_text())["splits"]  # the foreign file is unchanged


def test_a_job_that_never_tracked_has_no_mlflow_run_to_mark_failed(tmp_path):
    assert _record_failure(str(tmp_path / "rr" / "job"), RuntimeError("rank 0 died")) is False
