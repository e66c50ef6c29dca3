"""The tracker's spool on a real MLflow SQLite store: one run per job, nothing twice, nothing lost."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest

from pipeline.cli import main
from pipeline.train.config import load_config
from pipeline.train.lineage import capture_code, code_tags, split_digest
from pipeline.train.tracking import Tracker, spool_dir_for
from pipeline.train.tracking_queue import Spool


def _epoch(loss: float) -> dict[str, float]:
    return {"train_loss": loss, "val_loss": loss}


def test_tracker_reuses_the_job_run_and_never_repeats_an_epoch(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    key = str(tmp_path / "storage" / "job")
    cfg = {"train": {"epochs": 2}, "run": {"name": "job"}}
    first = Tracker(uri, "exp", (tmp_path / "art").as_uri())
    first.start(key, "job", cfg)
    assert first.log_epoch(1, _epoch(1.0)) and first.log_step(10, {"step_train_loss": 2.0})
    for d in (tmp_path / "storage" / "job" / "best", tmp_path / "elsewhere"):  # kept in the job dir / copied
        d.mkdir()
        (d / "weights.txt").write_text(d.name)
        first.log_artifacts(d, f"dirs/{d.name}")
    shutil.rmtree(tmp_path / "elsewhere")  # a temporary directory, gone before the upload
    assert first.end("FAILED", reason="RuntimeError: boom") == 0
    run_id = first.run_id
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).data.tags["pipeline.end_reason"] == "RuntimeError: boom"
    assert {a.path for a in client.list_artifacts(run_id, "dirs")} == {"dirs/best", "dirs/elsewhere"}
    # A restart (new Tracker) continues the same run from its spool, and knows what was logged.
    again = Tracker(uri, "exp")
    again.start(key, "job", {"train": {"epochs": 3}, "run": {"name": "job"}})
    assert again.resumed and again.last_epoch == 1 and again.last_step == 10
    assert not again.log_epoch(1, _epoch(9.0))
    assert again.log_epoch(2, _epoch(0.5))
    assert again.end() == 0 and again.run_id == run_id
    # Even without its spool, a job finds its run on the server and logs no epoch twice.
    shutil.rmtree(spool_dir_for(key))
    lost = Tracker(uri, "exp")
    lost.start(key, "job", cfg)
    lost.log_epoch(2, _epoch(7.0))
    lost.log_epoch(3, {"train_loss": 0.25})  # an epoch that did not validate
    assert lost.end() == 0 and lost.run_id == run_id
    run = client.get_run(run_id)
    hist = [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(hist) == [(1, 1.0), (2, 0.5)]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")) == [
        (1, 1.0), (2, 0.5), (3, 0.25)]
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.resumes"] == "2"
    assert run.data.params["train.epochs"] == "2"  # params are immutable; the change is a tag
    assert any("train.epochs: 2 -> 3" in v for v in run.data.tags.values())
    other = Tracker(uri, "exp")
    other.start(str(tmp_path / "storage" / "other"), "other", cfg)
    assert other.end() == 0 and other.run_id != run_id


def test_a_spool_of_an_earlier_version_still_says_which_epochs_are_logged(tmp_path):
    """Spooled epoch records were once filed under ``val_loss``; a job resumed from such a spool logs no epoch twice."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    key = str(tmp_path / "storage" / "job")
    first = Tracker(uri, "exp")
    first.start(key, "job", {})
    assert first.log_epoch(1, _epoch(1.0)) and first.end("KILLED") == 0
    for path in spool_dir_for(key).rglob("*"):
        if path.is_file() and b'"family":"train_loss"' in path.read_bytes():  # same length: the cursor holds
            path.write_bytes(path.read_bytes().replace(b'"family":"train_loss"', b'"family":"val_loss"  '))
            break
    else:
        pytest.fail("no spooled epoch record")
    again = Tracker(uri, "exp")
    again.start(key, "job", {})
    assert again.last_epoch == 1 and not again.log_epoch(1, _epoch(5.0))
    assert again.log_epoch(2, _epoch(0.5)) and again.end() == 0
    client = mlflow.MlflowClient(uri)
    assert sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "train_loss")) == [
        (1, 1.0), (2, 0.5)]


def test_spool_drops_a_torn_last_line_and_sync_sends_the_rest(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    key = str(tmp_path / "job")
    tracker = Tracker(uri, "exp", flush_timeout_s=0)
    tracker.start(key, "job", {"a": 1}, tags=code_tags(capture_code()))
    tracker.queue.close(0)  # as if the process died before sending anything
    spool = Spool(spool_dir_for(key))
    spool.append([{"t": "tags", "tags": {"": "a tag without a key"}},  # refused by the server, set aside
                  {"t": "metrics", "family": "val_loss", "step": 1, "ts": 1, "m": {"val_loss": 0.5}}])
    with open(spool.path, "a") as f:
        f.write('{"t": "metrics", "step": 2')  # killed mid-write
    assert main(["tracking", "sync", key]) == 0
    assert "nothing left" in capsys.readouterr().out
    client = mlflow.MlflowClient(uri)
    run = client.get_run(json.loads((spool_dir_for(key) / "job.json").read_text())["run_id"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1]
    rejected = [json.loads(line) for line in (spool_dir_for(key) / "rejected.jsonl").read_text().splitlines()]
    assert [r["record"]["t"] for r in rejected] == ["tags"]
    assert run.data.tags["mlflow.source.name"] == "pipeline train" and run.data.params["a"] == "1"
    assert main(["tracking", "sync", key]) == 0  # again: nothing to send, nothing twice
    assert main(["tracking", "sync", str(tmp_path / "nothing")]) == 2
    assert "no tracking spool" in capsys.readouterr().err


def test_split_digest_changes_with_any_shard():
    manifest = {"options": {"size": 28}, "classes": ["a", "b"],
                "splits": {"train": {"shards": [{"tar": "train-000000.tar", "sha256": "11"},
                                                {"tar": "train-000001.tar", "sha256": "22"}]}}}
    same = json.loads(json.dumps(manifest))
    assert split_digest(manifest, "train") == split_digest(same, "train")
    same["splits"]["train"]["shards"][1]["sha256"] = "23"
    assert split_digest(manifest, "train") != split_digest(same, "train")


def test_tracking_config_keys_are_validated():
    cfg = load_config("fashion_mnist", ["tracking.register_model=fm", "tracking.system_metrics_interval_s=0"])
    assert cfg.tracking.register_model == "fm" and cfg.tracking.system_metrics_interval_s == 0
    with pytest.raises(ValueError, match="system_metrics_interval_s"):
        load_config("fashion_mnist", ["tracking.system_metrics_interval_s=-1"])
