"""The training console: each of our lines once, Ray's internal noise off the default console, a bar on a TTY."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.train.console import DriverConsole, WorkerConsole, format_event

EPOCH = {"train_loss": 1.5, "val_loss": 1.2, "val_top1": 0.61, "val_top5": 0.97, "train_images_per_s": 512.0,
         "data_wait_frac": 0.1, "epoch_time_s": 2.5}
FIGURES = {"loss": 1.7, "lr": 0.002, "images_per_s": 600.0, "data_wait_frac": 0.05}


def _events(steps: int = 8, log_every: int = 4) -> list[tuple]:
    out: list[tuple] = [("line", "job: starting")]
    for s in range(1, steps + 1):
        out.append(("step", 1, 2, FIGURES if s % log_every == 0 else None, s, steps))
    out.append(("epoch", 1, 2, EPOCH))
    return out


def test_plain_console_prints_log_steps_and_one_line_per_epoch():
    out = io.StringIO()
    console = DriverConsole(tty=False, stream=out)
    for event in _events():
        console.show(event)
    lines = out.getvalue().splitlines()
    assert lines == ["[pipeline] job: starting",
                     "[pipeline] epoch 1/2 step 4/8 loss 1.7000 lr 0.002 600 img/s data-wait 5%",
                     "[pipeline] epoch 1/2 step 8/8 loss 1.7000 lr 0.002 600 img/s data-wait 5%",
                     "[pipeline] epoch 1/2: train_loss 1.5000 val_loss 1.2000 val_top1 0.6100 val_top5 0.9700 "
                     "512 img/s data-wait 10% (2.5 s)"]


def test_tty_console_draws_a_bar_instead_of_step_lines():
    out = io.StringIO()
    console = DriverConsole(tty=True, stream=out)
    for event in _events():
        console.show(event)
    text = out.getvalue()
    assert "epoch 1/2:" in text and "step 4/8" not in text  # no periodic lines on a terminal
    assert "8/8" in text and "loss 1.7000" in text  # tqdm's counter and postfix
    assert text.count("[pipeline] epoch 1/2: train_loss") == 1


def test_worker_console_without_sink_writes_once_and_throttles_bar_events():
    out = io.StringIO()
    console = WorkerConsole("stdout", enabled=True, stream=out)
    for event in _events():
        if event[0] == "step":
            console.step(event[1], event[2], event[4], event[5], event[3])
        elif event[0] == "epoch":
            console.epoch(event[1], event[2], event[3])
        else:
            console.line(event[1])
    assert out.getvalue().splitlines() == [format_event(e) for e in _events() if e[0] != "step" or e[3]]
    silent = io.StringIO()
    other_rank = WorkerConsole("stdout", enabled=False, stream=silent)
    other_rank.line("x")
    other_rank.epoch(1, 2, EPOCH)
    assert silent.getvalue() == ""


@pytest.mark.slow
def test_train_console_has_each_line_once_and_no_ray_noise(tmp_path, fmnist_dir):
    shards = tmp_path / "fm"
    assert main(["shard", str(fmnist_dir), str(shards), "--limit", "512", "--samples-per-shard", "256",
                 "--no-progress"]) == 0
    # A newcomer's machine: an empty HOME (no Ray token, no matplotlib font cache) and a new SQLite store.
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "TMPDIR": tempfile.mkdtemp(prefix="pl-", dir="/tmp"), "PYTHONUNBUFFERED": "1",  # short: Ray's socket paths
           "HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MPLCONFIGDIR", None)
    cmd = [str(Path(sys.executable).with_name("pipeline")), "train", "--config", "fashion_mnist",
           "--set", f"data.shards={shards}", "--set", "train.epochs=2", "--set", "train.log_every_steps=2",
           "--set", "run.name=console", "--set", f"run.storage_path={tmp_path / 'ray_results'}",
           "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console
    lines = [line for line in console.splitlines() if line.strip()]
    # Ours: every [pipeline] line (from the driver or, for the rank layout, a worker) and the summary.
    ours = [line for line in lines if "[pipeline]" in line or line.startswith(("test accuracy", "checkpoint:"))]
    repeated = {line: n for line, n in Counter(ours).items() if n > 1}
    assert not repeated, console
    # Nothing but ours: no Ray or MLflow log records (PlacementGroupCleaner, core_worker.cc's PreemptionWatcher
    # line, "Creating initial MLflow database tables"), no Python warnings, no matplotlib font-cache notice.
    summary = ("test accuracy", "checkpoint:", "MLflow run ", "resume or extend this job:")
    foreign = [line for line in lines if not line.startswith(("[pipeline] ", *summary))]
    assert not foreign, console
    assert "PlacementGroupCleaner" not in console, console
    assert "TrainingReport(" not in console, console
    epoch_lines = [line for line in lines if line.startswith("[pipeline] epoch") and ": train_loss" in line]
    assert [line.split(":")[0] for line in epoch_lines] == ["[pipeline] epoch 1/2", "[pipeline] epoch 2/2"]
    assert any(line.startswith("[pipeline] epoch 1/2 step 2/") for line in lines), console  # plain lines: no TTY
    assert "test accuracy (val split)" in console
