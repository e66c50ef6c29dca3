"""End to end on real Ray Train (2 CPU workers, gloo), real shards, real MLflow SQLite store.

Ray Train runs are expensive here, so three runs serve all tests, in order:
1. a 3-epoch seed-CNN job whose worker is killed mid-training (it must finish from its checkpoint);
2. the same job started again with 4 epochs (it must continue, not restart);
3. a bf16 fine-tune of run 1's checkpoint to a 3-class collection (new head, backbone frozen 1 epoch).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.train.checkpoint import load_meta, load_state
from pipeline.train.config import load_config
from pipeline.train.launch import fit
from pipeline.train.state import best_dir
from pipeline.train.step import resolve_precision
from pipeline.train.tracking import RUN_KEY_TAG
from conftest import make_label_folder
from _proc import a_worker_killed_after_a_checkpoint

pytestmark = pytest.mark.slow

EPOCH_METRICS = ("train_loss", "train_images_per_s", "data_wait_frac", "val_loss", "val_top1", "val_top5")


@pytest.fixture(scope="module")
def work(tmp_path_factory, fmnist_dir):
    """Small Fashion-MNIST shard set (real images) and a 3-class label-encoding collection."""
    root = tmp_path_factory.mktemp("train")
    fm = root / "fm"
    assert main(["shard", str(fmnist_dir), str(fm), "--limit", "1024", "--samples-per-shard", "256",
                 "--no-progress"]) == 0
    folder = make_label_folder(root / "three", ["dark", "mid", "light"], per_class=96, size=(28, 28))
    three = root / "three_shards"
    assert main(["shard", str(folder), str(three), "--val-fraction", "0.25", "--no-progress"]) == 0
    return {"root": root, "fm": fm, "three": three, "uri": f"sqlite:///{root}/mlruns.db"}


def _cfg(work, name: str, *extra: str, shards: Path | None = None):
    return load_config("fashion_mnist", [
        f"data.shards={shards or work['fm']}", "data.backend=auto", f"run.name={name}",
        f"run.storage_path={work['root'] / 'ray_results'}", f"tracking.tracking_uri={work['uri']}",
        "tracking.experiment=tests", "train.batch_size=64", "train.log_every_steps=4", "optim.lr=0.003",
        "optim.warmup_epochs=0", "scaling.num_workers=2", "scaling.cpus_per_worker=1", *extra,
    ])


@pytest.fixture(scope="module")
def killed_run(work, ray_local):
    # With a weight average: it must come back from the checkpoint with the rest of the state.
    cfg = _cfg(work, "fm-job", "train.epochs=3", "run.max_failures=2", "train.ema_decay=0.99")
    with a_worker_killed_after_a_checkpoint(work["root"] / "ray_results" / "fm-job") as killed:
        result = fit(cfg)
    return result, killed


def _history(run_id: str, key: str, uri: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def test_killed_worker_run_finishes_from_checkpoint(killed_run, work):
    result, killed = killed_run
    assert killed, "no Ray Train worker was killed: the chaos thread found none"
    assert result.metrics["epoch"] == 3
    client = mlflow.MlflowClient(work["uri"])
    run = client.get_run(result.mlflow_run_id)
    runs = client.search_runs([run.info.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{result.storage_dir}'")
    assert len(runs) == 1  # the restarted workers found the job's run instead of opening another
    assert int(run.data.tags["pipeline.resumes"]) >= 1
    for key in EPOCH_METRICS:
        steps = [s for s, _ in _history(result.mlflow_run_id, key, work["uri"])]
        assert steps == [1, 2, 3], (key, steps)  # every epoch once, none repeated after the restart


def test_loss_falls_and_accuracy_beats_chance(killed_run, work):
    result, _ = killed_run
    losses = [v for _, v in _history(result.mlflow_run_id, "train_loss", work["uri"])]
    assert losses[-1] < losses[0]
    top1 = [v for _, v in _history(result.mlflow_run_id, "val_top1", work["uri"])]
    assert all(0.0 <= v <= 1.0 for v in top1) and top1[-1] > 0.3  # 10 classes: chance is 0.1
    top5 = [v for _, v in _history(result.mlflow_run_id, "val_top5", work["uri"])]
    assert all(b >= a for a, b in zip(top1, top5))
    assert result.metrics["val_top1"] == pytest.approx(top1[-1])
    assert 0.0 <= result.metrics["data_wait_frac"] <= 1.0 and result.metrics["train_images_per_s"] > 0


def test_mlflow_run_holds_params_artifacts_and_model(killed_run, work):
    result, _ = killed_run
    client = mlflow.MlflowClient(work["uri"])
    run = client.get_run(result.mlflow_run_id)
    params = run.data.params
    assert params["train.epochs"] == "3" and params["model.name"] == "seed_cnn"
    assert params["scaling.num_workers"] == "2" and params["data.shards"] == str(work["fm"])
    assert _history(result.mlflow_run_id, "step_train_loss", work["uri"])  # every N steps too
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data", "eval", "best_checkpoint"} <= files
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    logged -= {"eval/test_per_class_accuracy.csv"}  # `pipeline evaluate --log-as test`'s, when that test ran first
    assert logged == {"eval/confusion_matrix.png", "eval/per_class_accuracy.csv"}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(work["uri"])  # runs:/ URIs resolve against the process-wide tracking URI
    try:
        model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/seed_cnn")  # named after the architecture
    finally:
        mlflow.set_tracking_uri(previous)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_checkpoint_loads_weights_only_and_evaluate_agrees(killed_run, work, capsys, monkeypatch, tmp_path):
    result, _ = killed_run
    state = torch.load(Path(result.checkpoint_path) / "state.pt", weights_only=True)
    assert state["epoch"] == 3 and state["global_step"] == 3 * (1024 // (2 * 64))
    assert set(state) >= {"model", "optimizer", "scaler", "schedule", "ema"}
    assert state["ema"]["updates"] == state["global_step"]  # resumed with the run, not started again
    # By default in the precision the job validated in, which the checkpoint records (auto resolved).
    precision = resolve_precision(load_config("fashion_mnist").train.precision, "cpu")
    assert load_meta(result.checkpoint_path)["precision"] == precision
    assert main(["evaluate", "--model", result.checkpoint_path, "--shards", str(work["fm"]), "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["precision"] == precision and out["samples"] == 1024
    assert out["top1"] == pytest.approx(result.metrics["val_top1"], abs=2e-3)
    assert set(out["per_class"]) == set(load_meta(result.checkpoint_path)["classes"])

    # --log-as: the figures go into the job's own MLflow run, found from the checkpoint's directory.
    evaluate = ["evaluate", "--model", result.checkpoint_path, "--shards", str(work["fm"]), "--json"]
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    for extra, message in ((["--log-as", "test"], "no MLflow store at"),  # and none is created
                           (["--log-as", "test top1"], "--log-as 'test top1': a letter"),
                           (["--log-as", "test"], "no MLflow run of the job")):  # another store: not there
        if message.startswith("no MLflow run"):
            mlflow.MlflowClient(other).search_experiments()  # creates that store
            capsys.readouterr()
        assert main([*evaluate, *extra]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert (tmp_path / "other.db").exists() == message.startswith("no MLflow run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", work["uri"])
    assert main([*evaluate, "--log-as", "test"]) == 0
    captured = capsys.readouterr()
    top1 = json.loads(captured.out)["top1"]
    assert f"to MLflow run {result.mlflow_run_id}" in captured.err
    client = mlflow.MlflowClient(work["uri"])
    assert _history(result.mlflow_run_id, "test_top1", work["uri"]) == [(3, top1)]  # at the checkpoint's epoch
    assert _history(result.mlflow_run_id, "test_samples", work["uri"]) == [(3, 1024.0)]
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["pipeline.eval.test"].startswith(f"val split of {work['fm']}, model ")
    assert "eval/test_per_class_accuracy.csv" in {a.path for a in client.list_artifacts(run.info.run_id, "eval")}


ORPHAN = "checkpoint_2000-01-01_00-00-00.000000"


@pytest.fixture(scope="module")
def extended_run(killed_run, work):
    # What a node lost mid-upload leaves: a checkpoint directory Ray Train never registered, cut short.
    first, _ = killed_run
    orphan = Path(first.storage_dir) / ORPHAN
    orphan.mkdir()
    for name in ("meta.json", "state.pt"):
        data = (Path(first.checkpoint_path) / name).read_bytes()
        (orphan / name).write_bytes(data[: len(data) // 2] if name == "state.pt" else data)
    return fit(_cfg(work, "fm-job", "train.epochs=4"))


def test_finished_job_started_with_more_epochs_continues(extended_run, killed_run, work):
    first, _ = killed_run
    assert extended_run.mlflow_run_id == first.mlflow_run_id
    assert extended_run.metrics["epoch"] == 4
    assert [s for s, _ in _history(first.mlflow_run_id, "val_loss", work["uri"])] == [1, 2, 3, 4]
    state = load_state(extended_run.checkpoint_path)
    assert state["global_step"] == 4 * (1024 // (2 * 64))  # one more epoch of steps, not four
    # Only what Ray Train keeps (run.checkpoints_to_keep, 2) is left: the orphan went with the job's end.
    left = sorted(p.name for p in Path(extended_run.storage_dir).glob("checkpoint_*") if p.is_dir())
    assert len(left) == 2 and ORPHAN not in left and Path(extended_run.checkpoint_path).name in left


def test_an_mlflow_init_from_is_checked_before_ray_and_loads_the_runs_model(extended_run, work, capsys, monkeypatch,
                                                                            tmp_path):
    run_id = extended_run.mlflow_run_id
    source = f"runs:/{run_id}/seed_cnn"  # pipeline train logs its model under model.name
    missing = tmp_path / "none.db"
    for init, extra, shards, message in [
        (f"runs:/{run_id}/model", (), None, "no such model in .*runs:/<run id>/seed_cnn"),
        (source, (f"tracking.tracking_uri=sqlite:///{missing}",), None, "no MLflow store at"),  # none created
        (source, ("model.name=resnet18",), None, "holds a seed_cnn model, the config trains resnet18"),
        (source, (), work["three"], "1×28² inputs.*3×224²"),
    ]:
        with pytest.raises(UserError, match=message):  # one error line from the driver, before any worker starts
            fit(_cfg(work, "mlflow-bad", f"train.init_from={init}", *extra, shards=shards))
    assert not missing.exists()
    from pipeline.train.loop import _init_weights
    from pipeline.train.models import build_model

    model = build_model("seed_cnn", 10, 1, 28)
    assert _init_weights(model, source, work["uri"]) == []  # same class count: the head is loaded too
    final = load_state(extended_run.checkpoint_path)["model"]
    assert all(torch.equal(value, final[key]) for key, value in model.state_dict().items())
    # `pipeline evaluate` of the MLflow model agrees with that of the checkpoint (MLflow 3 loads an
    # exported graph that refuses eval(): evaluate rebuilds the model from its weights).
    import json

    monkeypatch.setenv("MLFLOW_TRACKING_URI", work["uri"])
    capsys.readouterr()
    tops = []
    for ref in (source, extended_run.checkpoint_path):
        assert main(["evaluate", "--model", ref, "--shards", str(work["fm"]), "--json"]) == 0
        tops.append(json.loads(capsys.readouterr().out)["top1"])
    assert tops[0] == tops[1]
    # A URI that leads to no model: one error line (train and evaluate load MLflow models through one function).
    assert main(["evaluate", "--model", f"runs:/{run_id}/model", "--shards", str(work["fm"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load MLflow model runs:/" in err and "runs:/<run id>/<model.name>" in err


def test_finetune_bf16_new_class_count_frozen_backbone(extended_run, work):
    source = extended_run.checkpoint_path
    with pytest.raises(UserError, match="1×28² inputs.*3×224²"):  # caught before any worker starts
        fit(_cfg(work, "three-bad", f"train.init_from={source}", shards=work["three"]))
    res = fit(_cfg(work, "three-ft", "train.epochs=2", "train.precision=bf16", "run.checkpoints_to_keep=2",
                   f"train.init_from={source}", "train.freeze_backbone_epochs=1", "train.batch_size=16",
                   "optim.lr=0.01", "data.preset=mnist", "train.val_every_epochs=0", shards=work["three"]))
    assert res.metrics["epoch"] == 2 and res.metrics["val_top1"] > 1 / 3
    # val_every_epochs=0: the val split is read once, after the last epoch; every epoch logs its training figures.
    assert [s for s, _ in _history(res.mlflow_run_id, "train_loss", work["uri"])] == [1, 2]
    for key in ("val_loss", "val_top1", "val_top5"):
        assert [s for s, _ in _history(res.mlflow_run_id, key, work["uri"])] == [2], key
    src = load_state(source)["model"]
    ckpts = [p for p in Path(res.storage_dir).glob("checkpoint_*") if p.is_dir()]
    ckpts.sort(key=lambda p: load_state(p)["epoch"])
    after_frozen, after_free = (load_state(p)["model"] for p in ckpts)
    assert after_frozen["head.weight"].shape == (3, 128)
    assert torch.equal(after_frozen["features.0.weight"], src["features.0.weight"])  # frozen in epoch 1
    assert torch.equal(after_frozen["fc.0.weight"], src["fc.0.weight"])
    assert not torch.equal(after_free["features.0.weight"], src["features.0.weight"])  # trains in epoch 2
    assert load_meta(ckpts[-1])["classes"] == ["dark", "light", "mid"]  # imagefolder: sorted names
    assert "val_top1" not in load_meta(ckpts[0])["metrics"] and "val_top1" in load_meta(ckpts[-1])["metrics"]
    assert load_meta(best_dir(res.storage_dir))["epoch"] == 2  # the best is chosen among validated epochs
