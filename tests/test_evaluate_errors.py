"""``pipeline evaluate`` of a broken checkpoint or an MLflow model without a store: one error line each,
no traceback, nothing created. Real files: a shard set, checkpoints written by ``save_checkpoint``."""

from __future__ import annotations

import datetime
import io
import json
import shutil

import pytest
import torch

from conftest import make_label_folder
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.train.checkpoint import load_meta, load_model, save_checkpoint
from pipeline.train.models import build_model

CLASSES = ["dark", "light", "mid"]
META = {"model": "seed_cnn", "num_classes": 3, "in_channels": 1, "image_size": 28, "classes": CLASSES,
        "preset": "mnist"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalerr")
    src = make_label_folder(root / "src", CLASSES, 4)
    assert main(["shard", str(src), str(root / "shards"), "--val-fraction", "0.5", "--no-progress"]) == 0
    save_checkpoint(root / "good", {"model": build_model("seed_cnn", 3, 1, 28).state_dict(), "epoch": 1}, META)
    return root


def _checkpoint(work, tmp_path, name="ckpt"):
    """A copy of the good checkpoint to break."""
    return shutil.copytree(work / "good", tmp_path / name)


def _evaluate_error(work, capsys, model: str, shards=None, backend="torch", extra: list[str] = ()) -> str:
    """The one stderr line of a failing ``pipeline evaluate`` (exit 2, nothing on stdout)."""
    assert main(["evaluate", "--model", model, "--shards", str(shards or work / "shards"), "--backend", backend,
                 "--device", "cpu", *extra]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pipeline evaluate: error: "), captured.err
    assert not captured.out.strip()
    return err[0]


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("content, says", [
    (b"hello junk bytes", "not a PyTorch file"),  # torch.load: KeyError
    (b"model weights\n", "not a tensors-only PyTorch file"),  # UnpicklingError advising weights_only=False
    (_torch_bytes({"model": {}, "when": datetime.date(2026, 1, 1)}), "datetime.date"),  # a global it refuses
    (_torch_bytes({"model": {}})[:200], "PytorchStreamReader failed"),  # truncated
    (b"", "empty file"),  # EOFError without a message
], ids=["junk", "text", "global", "truncated", "empty"])
def test_unreadable_state_is_one_line_with_its_reason(work, tmp_path, capsys, content, says):
    ckpt = _checkpoint(work, tmp_path)
    (ckpt / "state.pt").write_bytes(content)
    line = _evaluate_error(work, capsys, str(ckpt))
    assert line.startswith(f"pipeline evaluate: error: cannot read checkpoint {ckpt / 'state.pt'}: ") and says in line
    assert not line.endswith(": ")  # a reason, always
    assert "weights_only" not in line  # never the advice to load it unsafely


def test_weights_that_do_not_fit_the_meta_are_one_line(work, tmp_path, capsys):
    ckpt = _checkpoint(work, tmp_path)
    (ckpt / "meta.json").write_text(json.dumps({**META, "num_classes": 5}))  # state.pt holds a 3-class head
    line = _evaluate_error(work, capsys, str(ckpt))
    assert f"checkpoint {ckpt}" in line and "do not fit the model its meta.json describes" in line
    assert "size mismatch for head.weight" in line
    other = _checkpoint(work, tmp_path, "other")
    (other / "meta.json").write_text(json.dumps({**META, "model": "cifar_cnn"}))  # another architecture
    with pytest.raises(UserError, match="do not fit the model its meta.json describes"):
        load_model(other)


def test_meta_that_is_not_a_json_object_is_one_line(work, tmp_path, capsys):
    ckpt = _checkpoint(work, tmp_path)
    (ckpt / "meta.json").write_text("[1, 2]\n")
    line = _evaluate_error(work, capsys, str(ckpt))
    assert f"cannot read {ckpt / 'meta.json'}" in line and "not a JSON array" in line
    (ckpt / "meta.json").write_text('"seed_cnn"\n')
    with pytest.raises(UserError, match="not a JSON string"):
        load_meta(ckpt)


@pytest.mark.parametrize("model", ["runs:/deadbeef/seed_cnn", "models:/x/1"])
def test_mlflow_model_without_a_store_creates_none(work, tmp_path, capsys, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    line = _evaluate_error(work, capsys, model)  # the default store, ./mlruns.db, is not there
    assert f"--model {model}: no MLflow store at sqlite:///{tmp_path / 'mlruns.db'}" in line
    assert not (tmp_path / "mlruns.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'nodir' / 'mlflow.db'}")
    assert "no MLflow store at" in _evaluate_error(work, capsys, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the database nor its directory


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_shard_copy_cut_short_is_named_before_any_decoding(work, tmp_path, capsys, backend):
    # An interrupted copy of the shards: the size index.json lists is checked by every loader (as by each
    # node's probe before training), so the line names the file, not DALI's "offset is outside the archive".
    copy = shutil.copytree(work / "shards", tmp_path / "copy")
    tar = copy / json.loads((copy / "index.json").read_text())["splits"]["val"]["shards"][0]["tar"]
    listed = tar.stat().st_size
    with open(tar, "r+b") as f:
        f.truncate(listed - 512)
    line = _evaluate_error(work, capsys, str(work / "good"), shards=copy, backend=backend)
    assert line == (f"pipeline evaluate: error: {tar} is {listed - 512:,} bytes where {copy / 'index.json'} lists "
                    f"{listed:,}: an incomplete or changed copy (`pipeline verify {copy}` checks every shard)"), line


@pytest.mark.parametrize("store, says", [
    ("http://127.0.0.1:1", "--log-as: cannot reach the MLflow server at http://127.0.0.1:1"),
    ("sqlite:///{shards}/index.json", "is not an SQLite database; set MLFLOW_TRACKING_URI to the one the job logged"),
], ids=["server down", "not a store"])
def test_log_as_into_a_store_that_cannot_take_it_is_one_line_before_the_work(work, capsys, monkeypatch, store, says):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.format(shards=work / "shards"))
    assert main(["evaluate", "--model", str(work / "good"), "--shards", str(work / "shards"), "--backend", "torch",
                 "--device", "cpu", "--log-as", "test"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and says in err[0], captured.err
    assert not captured.out.strip()  # no evaluation ran


def test_log_as_with_a_model_path_that_is_no_checkpoint_names_the_path(work, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    line = _evaluate_error(work, capsys, str(tmp_path / "nonexistent"), extra=["--log-as", "test"])
    assert f"no checkpoint at {tmp_path / 'nonexistent'}" in line, line
