"""The training console: each of our lines once, Ray's internal noise off the default console, a bar on a TTY."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.train.console import DriverConsole, WorkerConsole, format_event
from pipeline.train.ray_output import FOLD_NOTE, REPEAT_NOTE, RepeatLimiter, TracebackFolder, quiet_ray_output
from _proc import descendants_with
from conftest import temp_dir_under_tmp

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


def test_an_epoch_without_validation_says_only_its_training_figures():
    no_val = {k: v for k, v in EPOCH.items() if not k.startswith("val_")}  # train.val_every_epochs skipped it
    assert format_event(("epoch", 1, 4, no_val)) == (
        "[pipeline] epoch 1/4: train_loss 1.5000 512 img/s data-wait 10% (2.5 s)")


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


# What a surviving rank forwarded when its peer's node was lost (a real job's log, paths shortened),
# split over two batches the way Ray's log monitor may read it.
WORKER_ERROR = ["Error in training function:", "Traceback (most recent call last):",
                '  File "/tmp/ray/session/working_dir_files/pipeline/train/loop.py", line 130, in train_loop_per_worker',
                "    val = _end_epoch(w, epoch, meter)",
                "          ^^^^^^^^^^^^^^^^^^^^^^^^^^^",
                '  File "/tmp/ray/session/working_dir_files/pipeline/train/loop.py", line 54, in _all_reduce_',
                "    torch.distributed.all_reduce(t)"]
WORKER_ERROR_END = ['  File "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 3913, '
                    "in all_reduce", "    work.wait()",
                    "RuntimeError: [gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:21899.", "",
                    "Graceful shutdown of backend failed. This is expected if one of the workers has crashed."]
CHAINED = ["Traceback (most recent call last):", '  File "a.py", line 1, in f', "    g()",
           "KeyError: 'x'", "", "The above exception was the direct cause of the following exception:", "",
           "Traceback (most recent call last):", '  File "b.py", line 2, in h', "    f()",
           "ValueError: no x", "Error in control loop iteration: the worker group startup timed out"]


def test_folded_tracebacks_keep_the_exception_line_across_batches_and_chains():
    folder = TracebackFolder()
    assert folder.fold("w", WORKER_ERROR) == ["Error in training function:"]
    assert folder.fold("other", ["  indented, not in a traceback"]) == ["  indented, not in a traceback"]
    assert folder.fold("w", WORKER_ERROR_END) == [WORKER_ERROR_END[2], WORKER_ERROR_END[4]]
    assert folder.fold("c", CHAINED) == ["KeyError: 'x'", "ValueError: no x", CHAINED[-1]]
    # Frames whose header Ray printed elsewhere (merged as a repeat) are folded too.
    assert folder.fold("d", ['  File "c.py", line 3, in k', "    k()", "OSError: gone"]) == ["OSError: gone"]
    assert folder.folded == 3  # a chain of exceptions is one traceback
    assert folder.exits == 0


IGNORED = "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7fae6b6ca700>"
RAY_EXIT = [IGNORED, "Traceback (most recent call last):",  # as a sweep's Ctrl-C printed it, once per trial actor
            '  File "/py/_weakrefset.py", line 39, in _remove', "    def _remove(item):", "",
            '  File "/ray/_private/worker.py", line 1063, in sigterm_handler',
            "    raise_sys_exit_with_custom_error_message(",
            '  File "python/ray/_raylet.pyx", line 712, in ray._raylet.raise_sys_exit',
            "SystemExit: 1"]


def test_ray_ending_an_actor_inside_a_gc_callback_is_left_out_and_other_ignored_exceptions_are_not():
    folder = TracebackFolder()
    # Ray's SIGTERM handler ending a Tune trial's actor inside a garbage-collection callback (a sweep's
    # Ctrl-C): its intended exit, in one batch or split across two; a blank line among the frames is the
    # traceback's own.
    assert folder.fold("t", RAY_EXIT) == []
    assert folder.fold("u", RAY_EXIT[:4]) == [] and folder.fold("u", RAY_EXIT[4:] + ["next line"]) == ["next line"]
    assert folder.exits == 2
    # The same report of any other exception is shown as a folded traceback is: both lines.
    other = [IGNORED, "Traceback (most recent call last):", '  File "/py/a.py", line 3, in __del__', "    f()",
             "OSError: gone"]
    assert folder.fold("v", other) == [IGNORED, "OSError: gone"]
    exit_elsewhere = [ln.replace("sigterm_handler", "handler") for ln in RAY_EXIT]
    assert folder.fold("w", exit_elsewhere) == [IGNORED, "SystemExit: 1"]  # not Ray's handler: shown
    # With no traceback under it the line is shown, also as a batch's last line.
    assert folder.fold("x", [IGNORED, "plain line"]) == [IGNORED, "plain line"]
    assert folder.fold("y", ["a", IGNORED]) == ["a", IGNORED]
    assert folder.exits == 2


CLEANER = ("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
           "Continuing to monitor.")  # once a second from Ray Train's PlacementGroupCleaner once the dashboard is gone


def test_a_line_a_process_repeats_is_shown_once_per_window_with_the_count():
    now = [0.0]
    limiter = RepeatLimiter(window_s=600, clock=lambda: now[0])
    shown = []
    for second in range(1500):  # 25 minutes of the cleaner's warning, and one other line in between
        now[0] = float(second)
        shown += [line for line in (limiter.admit("cleaner", CLEANER),) if line is not None]
        if second == 700:
            shown.append(limiter.admit("cleaner", "Detected that the controller actor (7f3a) is dead."))
        if second == 710:  # the same text but for numbers and ids is a repeat
            assert limiter.admit("cleaner", "Detected that the controller actor (9b1c) is dead.") is None
    assert shown == [CLEANER, f"{CLEANER} [599 more like it in the 10 min before]",
                     "Detected that the controller actor (7f3a) is dead.",
                     f"{CLEANER} [599 more like it in the 10 min before]"]
    assert limiter.held == 1500 - 3 + 1
    # Another process's line is not a repeat; blank lines pass.
    assert limiter.admit("raylet", CLEANER) == CLEANER
    assert limiter.admit("cleaner", "") == ""


def test_filters_wrap_rays_forwarding_handler_once(capsys):
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    assert quiet_ray_output() is None  # Ray forwards nothing to this process: nothing to wrap
    printed: list[list[str]] = []
    dispatcher.add_handler("ray_print_logs", lambda batch: printed.append(batch["lines"]))
    try:
        batch = {"ip": "127.0.0.4", "pid": 20431, "is_err": True, "lines": WORKER_ERROR + WORKER_ERROR_END}
        cleaner = {"ip": "127.0.0.1", "pid": 3051, "is_err": True, "actor_name": "PlacementGroupCleaner",
                   "lines": [CLEANER]}
        filters = quiet_ray_output()
        assert filters is not None and quiet_ray_output() is filters  # a second job in this process: as it is
        dispatcher.emit(batch)
        dispatcher.emit({**batch, "lines": ["Traceback (most recent call last):", '  File "x", line 1']})
        for _ in range(5):
            dispatcher.emit(cleaner)
        # The autoscaler's status report repeats too; Ray keeps only its event lines, so it passes as it is.
        status = {"ip": "127.0.0.1", "pid": "autoscaler", "is_err": False, "lines": ["Node status", "-" * 20]}
        dispatcher.emit(status)
        dispatcher.emit(status)
        assert filters[0].folded == 2 and filters[1].held == 4
        assert printed == [["Error in training function:", WORKER_ERROR_END[2], WORKER_ERROR_END[4]], [CLEANER],
                           status["lines"], status["lines"]]
        assert capsys.readouterr().err.splitlines() == [FOLD_NOTE, REPEAT_NOTE]  # each once, when it first acts
    finally:
        dispatcher.remove_handler("ray_print_logs")  # what ray.shutdown does


@pytest.fixture
def short_tmpdir():
    with temp_dir_under_tmp() as path:  # short: Ray's socket paths have a length limit
        yield path


def _local_train(tmp_path: Path, fmnist_dir: Path, tmpdir: Path, *sets: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a ``pipeline train`` on 512 Fashion-MNIST images, on a newcomer's machine:
    an empty HOME (no Ray token, no matplotlib font cache), a new SQLite store, a Ray of its own (TMPDIR=tmpdir)."""
    shards = tmp_path / "fm"
    assert main(["shard", str(fmnist_dir), str(shards), "--limit", "512", "--samples-per-shard", "256",
                 "--no-progress"]) == 0
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1", "HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_TMPDIR", None)
    env.pop("MPLCONFIGDIR", None)
    cmd = [str(Path(sys.executable).with_name("pipeline")), "train", "--config", "fashion_mnist",
           "--set", f"data.shards={shards}", "--set", "run.name=console",
           "--set", f"run.storage_path={tmp_path / 'ray_results'}",
           "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}"]
    for item in sets:
        cmd += ["--set", item]
    return cmd, env


@pytest.mark.slow
def test_train_console_has_each_line_once_and_no_ray_noise(tmp_path, fmnist_dir):
    # A batch scheduler's per-job TMPDIR (49 bytes), too long for Ray's socket paths: Ray alone would fail at start.
    fallback = Path(f"/tmp/ray-{os.getuid()}")
    with temp_dir_under_tmp("slurm-job-1234567.head-node.example-") as tmpdir:
        cmd, env = _local_train(tmp_path, fmnist_dir, tmpdir, "train.epochs=2", "train.log_every_steps=2")
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
            for session in fallback.glob(f"session_*_{proc.pid}"):  # this job's Ray session: started by its driver
                shutil.rmtree(session, ignore_errors=True)
    console = out + err
    assert proc.returncode == 0, console
    assert console.count(f"this job's Ray keeps its session in {fallback}") == 1, console
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


@pytest.mark.slow
def test_training_goes_on_when_the_dashboard_dies_and_the_cleaners_warning_shows_once(tmp_path, fmnist_dir,
                                                                                    short_tmpdir):
    # Without the dashboard's State API, Ray Train's PlacementGroupCleaner warns every second until the job ends.
    cmd, env = _local_train(tmp_path, fmnist_dir, short_tmpdir, "train.epochs=4", "train.batch_size=32")
    log = tmp_path / "console.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while "console: starting;" not in log.read_text():  # the cleaner is watching by now
                assert proc.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.2)
            dashboards = descendants_with(proc.pid, b"dashboard/dashboard.py")
            assert len(dashboards) == 1, dashboards  # this job's own Ray, started by the driver
            os.kill(dashboards[0], signal.SIGKILL)
            killed_at = time.time()
            assert proc.wait(timeout=600) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    console = log.read_text()
    assert time.time() - killed_at > 5, "the job ended too soon after the kill to show a repeat"
    assert console.count("Failed to query Ray Train Controller actor state") == 1, console
    assert console.count(REPEAT_NOTE) == 1, console
    assert "[pipeline] epoch 4/4: train_loss" in console and "test accuracy (val split)" in console


# What a rank's process prints when DALI's decoder takes it down (Ray's fatal-signal handler), and the
# text of the error Ray Train gives the driver for it: a failed health check, from a real run.
CRASH_DUMP = ["\x1b[0;31m[ERROR] \x1b[0m[png_parser] Unexpected bitdepth: ",
              "*** SIGSEGV received at time=1796312739 on cpu 0 ***",
              "PC: @     0x7f8571e703ab  (unknown)  dali::imgcodec::ImageDecoder<>::RunImplImpl()::{lambda()#1}::"
              "operator()()",
              "    @     0x7f8854e5a050  (unknown)  (unknown)",
              "[2026-12-03 15:45:39,567 E 4184 4380] logging.cc:474: *** SIGSEGV received at time=1796312739 on cpu 0 ***",
              "[2026-12-03 15:45:39,567 E 4184 4380] logging.cc:474:     @     0x7f8854e5a050  (unknown)  (unknown)",
              "Fatal Python error: Segmentation fault",
              "",
              "Extension modules: msgpack._cmsgpack, google._upb._message, psutil._psutil_linux, yaml._yaml, "
              "ray._raylet, numpy._core._multiarray_umath, torch._C (total: 90)"]
DIED = ("Worker info: Worker(\n  actor=Actor(RayTrainWorker, 9ae2a44249145ec05b6f254e01000000),\n  metadata=ActorMetadata("
        "\n    hostname='vm',\n    node_id='4f79',\n    node_ip='{ip}',\n    pid={pid},\n  ),\n)\nThe actor died "
        "unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n\tpid: {pid}\n\tip: {ip}\nThe actor is "
        "dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker "
        "unexpectedly exits with a connection error code 2. End of file.")


def test_a_rank_whose_process_crashed_is_named_with_its_signal_and_where_it_struck():
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from pipeline.train.config import load_config
    from pipeline.train.launch import _failed_line

    def failed(ip: str, pid: int) -> WorkerGroupError:
        return WorkerGroupError("", {1: RuntimeError("Connection reset by peer"), 0: WorkerHealthCheckFailedError(
            "A worker health check failed.", RuntimeError(DIED.format(ip=ip, pid=pid)))})

    cfg = load_config("fashion_mnist", ["run.name=r", "data.shards=/data/fm", "run.max_failures=0"])
    printed: list[str] = []
    dispatcher.add_handler("ray_print_logs", lambda batch: printed.extend(batch["lines"]))
    try:
        assert quiet_ray_output() is not None
        dispatcher.emit({"ip": "127.0.0.4", "pid": 4184, "is_err": True, "lines": CRASH_DUMP})
        # The handler's own lines stay; their copy in Ray's C++ log format and the module list do not.
        assert printed == CRASH_DUMP[:4] + CRASH_DUMP[6:8], printed
        line = _failed_line(cfg, failed("127.0.0.4", 4184), -1, tracked=True)
        assert line.startswith("job r failed: Ray Train gave up after 1 failure (run.max_failures=0) (rank 0: its "
                               "process (pid 4184 on 127.0.0.4) died: SIGSEGV in "
                               "dali::imgcodec::ImageDecoder<>::RunImplImpl); a corrupt image can crash DALI: "
                               "`pipeline verify --decode /data/fm` names it; no checkpoint was written"), line
        # A process whose dump this driver did not see (--verbose, another driver): Ray's exit type.
        other = _failed_line(cfg, failed("127.0.0.5", 4184), -1, tracked=True)
        assert "(rank 0: its process (pid 4184 on 127.0.0.5) died: Ray's exit type SYSTEM_ERROR: a crash such as " \
               "SIGSEGV, or the OOM killer; its last lines say which); no checkpoint" in other, other
        assert "verify" not in other
    finally:
        dispatcher.remove_handler("ray_print_logs")


GLOO_PEER_LOST = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:9350: "
                  "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the "
                  "application.")  # what rank 0 raised when rank 1's process died under it, in a real run


def test_the_rank_that_caused_a_failure_is_named_not_the_peer_that_lost_it():
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from pipeline.train.launch import _failure_text

    died = WorkerHealthCheckFailedError("A worker health check failed.",
                                        RuntimeError(DIED.format(ip="127.0.0.2", pid=20650)))
    # Ray Train lists both ranks; the lower one only lost its connection to the one whose process died.
    text = _failure_text(WorkerGroupError("", {0: RuntimeError(GLOO_PEER_LOST), 1: died}))
    assert text.startswith("rank 1: its process (pid 20650 on 127.0.0.2) died: Ray's exit type SYSTEM_ERROR"), text
    # A rank's own error comes before a peer's lost connection; then the lowest rank, counted as a number.
    text = _failure_text(WorkerGroupError("", {0: RuntimeError(GLOO_PEER_LOST), 3: ValueError("bad label 12")}))
    assert text == "rank 3: ValueError: bad label 12", text
    text = _failure_text(WorkerGroupError("", {10: ValueError("late"), 2: ValueError("early")}))
    assert text == "rank 2: ValueError: early", text
