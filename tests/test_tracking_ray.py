"""What a real 2-worker Ray Train job leaves in MLflow: dataset and code lineage, system metrics, the model.

One training run (2 CPU workers, real Fashion-MNIST shards, real SQLite store) serves every check;
the dataset digests of other shard sets are compared through the same tracker path without Ray.
"""

from __future__ import annotations

import json
import time

import mlflow
import pytest

from pipeline.cli import main
from pipeline.shard.manifest import read_manifest
from pipeline.train.config import load_config
from pipeline.train.launch import fit, summary
from pipeline.train.lineage import dataset_inputs
from pipeline.train.sysmetrics import NodeMonitor, node_name
from pipeline.train.tracking import Tracker, spool_dir_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory, fmnist_dir, ray_local):
    root = tmp_path_factory.mktemp("tracking")
    shards = root / "fm"
    assert main(["shard", str(fmnist_dir), str(shards), "--limit", "512", "--samples-per-shard", "128",
                 "--no-progress"]) == 0
    uri = f"sqlite:///{root}/mlruns.db"
    cfg = load_config("fashion_mnist", [
        f"data.shards={shards}", f"run.name=lineage", f"run.storage_path={root / 'ray_results'}",
        f"tracking.tracking_uri={uri}", "tracking.experiment=lineage", "tracking.register_model=fm-classifier",
        "tracking.system_metrics_interval_s=1", "train.epochs=2", "train.batch_size=64", "train.log_every_steps=2",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1",
    ])
    result = fit(cfg)
    client = mlflow.MlflowClient(uri)
    return {"root": root, "shards": shards, "uri": uri, "result": result, "client": client,
            "run": client.get_run(result.mlflow_run_id)}


def test_the_run_names_its_datasets_and_code(job):
    run = job["run"]
    manifest = read_manifest(job["shards"])
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
              for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    for context, split in (("training", "train"), ("validation", "val")):
        ds = inputs[context]
        assert ds.name == f"fm/{split}" and json.loads(ds.source) == {"path": str(job["shards"])}
        profile = json.loads(ds.profile)
        assert profile["num_samples"] == manifest["splits"][split]["samples"]
        assert sum(profile["class_counts"].values()) == profile["num_samples"]
        assert json.loads(ds.schema)["mlflow_colspec"][1]["name"] == "label"
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "pipeline train" and len(tags["mlflow.source.git.commit"]) == 40
    assert tags["pipeline.version"] and tags["pipeline.command"]
    assert run.info.status == "FINISHED" and job["result"].tracking_behind is None
    assert "tracking is behind" not in summary(job["result"])


def test_dataset_digest_follows_the_shards(job, tmp_path, fmnist_dir):
    """Another run on the same shards shows the same digest; shards rebuilt with other options another one."""
    rebuilt = tmp_path / "fm"
    assert main(["shard", str(fmnist_dir), str(rebuilt), "--limit", "512", "--samples-per-shard", "64",
                 "--no-progress"]) == 0
    digests = {}
    for name, shards in (("same", job["shards"]), ("rebuilt", rebuilt)):
        tracker = Tracker(job["uri"], "lineage")
        tracker.start(str(tmp_path / name), name, {"x": 1},
                      datasets=dataset_inputs(shards, read_manifest(shards), {"train": "training"}))
        assert tracker.end("FINISHED") == 0
        run = job["client"].get_run(tracker.run_id)
        digests[name] = run.inputs.dataset_inputs[0].dataset.digest
    first = {d.dataset.name: d.dataset.digest for d in job["run"].inputs.dataset_inputs}
    assert digests["same"] == first["fm/train"]
    assert digests["rebuilt"] != first["fm/train"]


def test_system_metrics_per_node_continue_across_restarts(job):
    client, run_id = job["client"], job["run"].info.run_id
    keys = set(job["run"].data.metrics)
    prefix = f"system/{node_name()}/"
    assert {prefix + "cpu_utilization_percentage", prefix + "system_memory_usage_megabytes"} <= keys
    assert prefix + "network_receive_megabytes" in keys and prefix + "disk_usage_percentage" in keys
    cpu = prefix + "cpu_utilization_percentage"
    before = sorted(m.step for m in client.get_metric_history(run_id, cpu))
    assert before == list(range(len(before))) and len(before) >= 2
    # The job's next start samples this node again: its series goes on from the next step.
    monitor = NodeMonitor(spool_dir_for(job["result"].storage_dir), interval_s=0.2)
    while monitor.step < len(before) + 2:
        time.sleep(0.1)
    assert monitor.stop() == 0
    after = sorted(m.step for m in client.get_metric_history(run_id, cpu))
    assert after[:len(before)] == before and after == list(range(len(after))) and len(after) > len(before)


def test_the_final_model_is_named_signed_and_registered(job):
    client, run = job["client"], job["run"]
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in models] == ["seed_cnn"]
    model = models[0]
    assert model.tags["mlflow.source.name"] == "pipeline train"  # not Ray's default_worker.py
    info = mlflow.models.get_model_info(model.model_uri)
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 28, 28)
    assert info.signature.outputs.inputs[0].shape == (-1, 10)
    versions = client.search_model_versions("name = 'fm-classifier'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    assert float(versions[0].tags["val_top1"]) == pytest.approx(run.data.metrics["val_top1"])
    loaded = mlflow.pytorch.load_model("models:/fm-classifier/1")
    import torch

    assert loaded(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
