"""What a real 2-worker Ray Train job leaves in MLflow: lineage, system metrics, the model, through an outage.

One training run (2 CPU workers, real Fashion-MNIST shards) logs to a real ``mlflow server`` on
127.0.0.1 that is stopped during epoch 1 and stays down until the job has ended: the job must finish,
say on its last line that tracking is behind, and ``pipeline tracking sync`` must then deliver
everything exactly once. That run serves every check below; the dataset digests of other shard sets
are compared through the same tracker path without Ray.
"""

from __future__ import annotations

import json
import threading
import time

import mlflow
import pytest

from pipeline.cli import main
from pipeline.shard.manifest import read_manifest
from pipeline.train.config import load_config
from pipeline.train.launch import fit, summary
from pipeline.train.lineage import dataset_inputs
from pipeline.train.step import resolve_precision
from pipeline.train.sysmetrics import NodeMonitor, node_name
from pipeline.train.tracking import Tracker, spool_dir_for
from pipeline.train.tracking_queue import Spool
from _mlflow_server import MlflowServer

pytestmark = pytest.mark.slow


def _stop_in_epoch_1(server: MlflowServer, spool: Spool, stopped: list[float]) -> None:
    """Stop the server once rank 0 has spooled its first step metrics (epoch 1 is under way)."""
    while not any(r.get("family") == "step_train_loss" for r in spool.records()):
        time.sleep(0.2)
    server.stop()
    stopped.append(time.monotonic())


@pytest.fixture(scope="module")
def job(tmp_path_factory, fmnist_dir, ray_local):
    root = tmp_path_factory.mktemp("tracking")
    server = MlflowServer(root)
    server.start()  # boots while the shards are written
    try:
        shards = root / "fm"
        assert main(["shard", str(fmnist_dir), str(shards), "--limit", "1024", "--samples-per-shard", "256",
                     "--no-progress"]) == 0
        server.wait_up()
        cfg = load_config("fashion_mnist", [
            f"data.shards={shards}", "run.name=lineage", f"run.storage_path={root / 'ray_results'}",
            f"tracking.tracking_uri={server.uri}", "tracking.experiment=lineage",
            "tracking.register_model=fm-classifier", "tracking.system_metrics_interval_s=1",
            "tracking.flush_timeout_s=2", "train.epochs=2", "train.batch_size=64", "train.log_every_steps=2",
            "scaling.num_workers=2", "scaling.cpus_per_worker=1", "train.precision=auto",
        ])
        storage_dir = root / "ray_results" / "lineage"
        stopped: list[float] = []
        stopper = threading.Thread(target=_stop_in_epoch_1, daemon=True,
                                   args=(server, Spool(spool_dir_for(str(storage_dir))), stopped))
        stopper.start()
        result = fit(cfg)
        stopper.join(60)
        assert stopped, "the server was not stopped during the run"
        lines = summary(result).splitlines()
        server.start()
        server.wait_up()
        assert main(["tracking", "sync", str(storage_dir)]) == 0
        client = mlflow.MlflowClient(server.uri)
        mlflow.set_tracking_uri(server.uri)
        # The run may have been created only now, by the sync: its id is in the spool.
        run_id = json.loads((spool_dir_for(str(storage_dir)) / "job.json").read_text())["run_id"]
        yield {"root": root, "shards": shards, "uri": server.uri, "result": result, "client": client,
               "run": client.get_run(run_id), "lines": lines}
    finally:
        server.stop()


def test_the_job_finishes_through_an_outage_and_sync_completes_its_run(job):
    """Every epoch and logged step exactly once, the run FINISHED, and the job's last line said it was behind."""
    client, run = job["client"], job["run"]
    assert job["lines"][-1].startswith("tracking is behind") and "pipeline tracking sync" in job["lines"][-1]
    assert run.info.status == "FINISHED"
    for key in ("val_loss", "val_top1", "train_loss"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "step_train_loss"))
    assert steps and len(steps) == len(set(steps)) and all(s % 2 == 0 for s in steps)
    assert steps == list(range(2, steps[-1] + 1, 2))


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
    assert tags["pipeline.precision"] == resolve_precision("auto", "cpu")  # auto as the workers resolved it
    assert run.info.status == "FINISHED"


def test_dataset_digest_follows_the_shards(job, tmp_path, fmnist_dir):
    """Another run on the same shards shows the same digest; shards rebuilt with other options another one."""
    rebuilt = tmp_path / "fm"
    assert main(["shard", str(fmnist_dir), str(rebuilt), "--limit", "1024", "--samples-per-shard", "128",
                 "--no-progress"]) == 0
    digests = {}  # same digest -> MLflow shows one dataset; the other a second one
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
    assert {prefix + "cpu_utilization_percentage", prefix + "cpu_steal_percentage",
            prefix + "system_memory_usage_megabytes"} <= keys
    assert 0 <= job["run"].data.metrics[prefix + "cpu_steal_percentage"] <= 100
    assert prefix + "network_receive_megabytes" in keys and prefix + "disk_usage_percentage" in keys
    cpu = prefix + "cpu_utilization_percentage"
    before = sorted(m.step for m in client.get_metric_history(run_id, cpu))
    assert before == list(range(len(before))) and len(before) >= 2
    # The job's next start samples this node again: its series goes on from the next step.
    monitor = NodeMonitor(spool_dir_for(str(job["result"].storage_dir)), interval_s=0.2)
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
