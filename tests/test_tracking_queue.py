"""The non-blocking tracking path against a real ``mlflow server`` process on 127.0.0.1 that goes away.

One server, started and stopped by the test, serves every case, in order:
1. a job whose tracker starts while the server is still down, and which logs on after it comes up;
2. a job during which the server is stopped in epoch 1 and started again 60 s later, while training
   goes on; two more jobs end inside that outage and are completed later, one by the next start of the
   same job, one by ``pipeline tracking sync``.
Each run must end with every epoch's and every step's metrics exactly once. Timings are printed, never
asserted (the machine is shared).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from pipeline.cli import main
from pipeline.train.lineage import capture_code, code_tags
from pipeline.train.tracking import Tracker, spool_dir_for, tracking_behind
from pipeline.train.tracking_queue import Spool
from _mlflow_server import MlflowServer

pytestmark = pytest.mark.slow  # two server start-ups and a 60 s outage

OUTAGE_S = 60.0
STEPS_PER_EPOCH = 20
CFG = {"train": {"epochs": 3, "batch_size": 64}, "run": {"name": "job"}}


class FakeTraining:
    """A training loop's tracking calls at a steady pace (one ``log_step`` a step, ``log_epoch`` per epoch)."""

    def __init__(self, tracker: Tracker, step_s: float = 0.05) -> None:
        self.tracker = tracker
        self.step_s = step_s
        self.epoch = 0
        self.step = 0
        self.epoch_times: list[float] = []
        self.slowest_call_s = 0.0

    def _timed(self, fn, *args) -> None:
        t = time.perf_counter()
        fn(*args)
        self.slowest_call_s = max(self.slowest_call_s, time.perf_counter() - t)

    def run_epoch(self, on_step=None) -> None:
        t0 = time.perf_counter()
        for i in range(STEPS_PER_EPOCH):
            time.sleep(self.step_s)
            self.step += 1
            self._timed(self.tracker.log_step, self.step, {"step_train_loss": 1.0 / self.step, "step_lr": 0.1})
            if on_step:
                on_step(i)
        self.epoch += 1
        self._timed(self.tracker.log_epoch, self.epoch, {"val_loss": 1.0 / self.epoch, "train_loss": 2.0})
        self.epoch_times.append(time.perf_counter() - t0)


def _check_run(uri: str, run_key: Path, epochs: int, steps: int, status: str = "FINISHED") -> mlflow.entities.Run:
    """The job's run holds epochs 1..epochs and steps 1..steps, each exactly once, and ``status``."""
    client = mlflow.MlflowClient(uri)
    run_id = (spool_dir_for(str(run_key)) / "job.json").read_text()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`pipeline.run_key` = '{run_key}'")
    assert len(runs) == 1 and runs[0].info.run_id in run_id
    run = runs[0]
    for key in ("val_loss", "train_loss"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, epochs + 1))
    for key in ("step_train_loss", "step_lr"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, steps + 1))
    assert run.info.status == status
    assert run.data.params["train.epochs"] == "3"
    return run


def test_tracking_survives_a_late_server_and_a_60s_outage(tmp_path, capsys):
    server = MlflowServer(tmp_path)
    store = tmp_path / "storage"
    try:
        # 1. The server is down when the job starts: start() returns at once, training logs on.
        late_key = store / "late"
        late = Tracker(server.uri, "outage", flush_timeout_s=240)
        t = time.perf_counter()
        late.start(str(late_key), "late", CFG, tags=code_tags(capture_code()))
        start_s = time.perf_counter() - t
        late_train = FakeTraining(late)
        late_train.run_epoch()
        assert late.backlog() > 0 and late.run_id is None  # nothing reached a server yet
        server.start()
        while not server.up():  # training goes on while the server boots
            assert server.proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            late_train.run_epoch()
        late_train.run_epoch()
        assert late.end("FINISHED") == 0
        run = _check_run(server.uri, late_key, late_train.epoch, late_train.step)
        assert run.data.tags["mlflow.source.name"].startswith("pipeline")

        # 2. The server stops during epoch 1 and comes back OUTAGE_S later; training never waits.
        key = store / "outage"
        tracker = Tracker(server.uri, "outage", flush_timeout_s=240)
        tracker.start(str(key), "outage", CFG)
        training = FakeTraining(tracker, step_s=0.1)
        stopped_at: list[float] = []
        stop_now = threading.Event()

        def stop_mid_epoch(i: int) -> None:
            if training.epoch == 0 and i == STEPS_PER_EPOCH // 4:
                stop_now.set()  # the server is stopped beside training, as an outage would happen

        # Before the outage: one full epoch with the server up, for the comparison.
        baseline = FakeTraining(Tracker(server.uri, "outage"), step_s=0.1)
        baseline.tracker.start(str(store / "baseline"), "baseline", CFG)
        baseline.run_epoch()
        baseline.tracker.end("FINISHED")

        back = threading.Event()

        def restart_later() -> None:
            stop_now.wait()
            server.stop()
            stopped_at.append(time.monotonic())
            time.sleep(max(0.0, stopped_at[0] + OUTAGE_S - time.monotonic()))
            server.start()
            server.wait_up()
            back.set()

        restarter = threading.Thread(target=restart_later, daemon=True)
        restarter.start()
        training.run_epoch(stop_mid_epoch)
        while not stopped_at:
            training.run_epoch()

        # Two jobs that end inside the outage: their records wait in the spool.
        leftover = {}
        for name in ("next-start", "synced"):
            tr = Tracker(server.uri, "outage", flush_timeout_s=1)
            tr.start(str(store / name), name, CFG)
            ft = FakeTraining(tr)
            ft.run_epoch()
            leftover[name] = tr.end("FINISHED")
            assert leftover[name] > 0
            assert "tracking is behind" in tracking_behind(str(store / name))
        assert main(["tracking", "sync", str(store / "synced")]) == 2  # still down: one line, non-zero
        err = capsys.readouterr().err
        assert "still unsent" in err and "Traceback" not in err

        while not back.is_set():  # training goes on through the whole outage
            training.run_epoch()
        training.run_epoch()
        epochs = training.epoch
        assert tracker.end("FINISHED") == 0
        _check_run(server.uri, key, epochs, epochs * STEPS_PER_EPOCH)

        # What a job left unsent goes out at its next start, before anything new, and nothing twice.
        again = Tracker(server.uri, "outage", flush_timeout_s=240)
        again.start(str(store / "next-start"), "next-start", CFG)
        assert again.resumed and again.last_epoch == 1 and again.last_step == STEPS_PER_EPOCH
        assert not again.log_epoch(1, {"val_loss": 9.0})
        assert again.end("FINISHED") == 0
        _check_run(server.uri, store / "next-start", 1, STEPS_PER_EPOCH)

        # ... or by `pipeline tracking sync`.
        assert main(["tracking", "sync", str(store / "synced")]) == 0
        assert "nothing left" in capsys.readouterr().out
        _check_run(server.uri, store / "synced", 1, STEPS_PER_EPOCH)
        assert Spool(spool_dir_for(str(store / "synced"))).unsent() == 0

        times = sorted(training.epoch_times)
        with capsys.disabled():
            print(f"\n[tracking outage] tracker start with the server down: {start_s * 1000:.1f} ms; slowest "
                  f"tracker call: late job {late_train.slowest_call_s * 1000:.2f} ms, outage job "
                  f"{training.slowest_call_s * 1000:.2f} ms; epoch wall time without outage "
                  f"{baseline.epoch_times[0]:.2f} s; with the outage ({len(times)} epochs): first "
                  f"{training.epoch_times[0]:.2f} s, median {times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s",
                  file=sys.stderr)
    finally:
        server.stop()

