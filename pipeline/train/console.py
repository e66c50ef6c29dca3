"""What a training job prints, and where Ray's own output goes.

Our lines are rendered by the driver, not by the workers: rank 0 sends its
events (a line, a step, an epoch) to a small ``ConsoleSink`` actor and the
driver drains it every half second. So each line is printed once, in the
driver's terminal, where a tqdm bar per epoch can be drawn on a TTY; without a
TTY (logs, ``ray job submit``) the driver prints the periodic step lines and one
summary line per epoch instead.

Ray's own output, and why it used to flood the console:

* ``(PlacementGroupCleaner) Failed to query Ray Train Controller actor state``:
  Ray Train's cleaner actor asks the State API every second whether the
  controller is alive. The State API is served by the dashboard; a local Ray
  started without it answers every poll with ServerUnavailable, so the warning
  came once a second for the whole run. With several Ray instances on one
  machine the API client cannot even tell which cluster to ask and the
  cleaner's thread dies with a traceback. Local clusters therefore start with
  the dashboard (on 127.0.0.1, token auth on), and ``setup_ray_worker`` pins
  ``RAY_ADDRESS`` in every worker to its own cluster.
* Every ``print`` on a worker twice: Ray's worker process rebinds
  ``sys.stdout`` to its log file, so Ray Train's print patch (which tees when
  stdout looks wrapped) both prints and logs each line, and Ray forwards both.
  ``setup_ray_worker`` turns the patch off (``RAY_TRAIN_ENABLE_PRINT_PATCH=0``).
* Ray Train's INFO lines (worker group start, ``Reporting training result …
  TrainingReport(…)``, checkpoint paths) stay in Ray Train's log files under the
  session directory; ``--verbose`` shows them on the console as well.
  ``Reporting training result … TrainingReport(…)`` escaped that level: Ray
  names its logger after the file path instead of the module, so
  ``setup_ray_worker`` sets that logger's level itself.
* MLflow's INFO lines on the workers (creating a new store's tables) follow
  ``MLFLOW_LOGGING_LEVEL``: WARNING unless ``--verbose``. Its "View run … at URL"
  line, printed at every end of a run on a tracking server (each restart too), is off
  (``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``): the driver's closing lines name the run
  once. So is its artifact download bar, drawn by every rank that loads an MLflow
  ``--init-from`` model. urllib3's "Retrying … after connection broken" at every try while a tracking
  server is away is off as well: the tracker's own two lines say when it went and came
  back (``pipeline.train.tracking_queue``). The driver creates a new SQLite store
  quietly too. matplotlib's "generated new fontManager" (once per fresh ``HOME``, when
  rank 0 draws its first plot) is an INFO line kept off as well.
* ``core_worker.cc: Actor with class name: 'PreemptionWatcher' … has constructor
  arguments in the object store``, an error-level line from Ray's C++ core at
  every worker-group start: Ray Train 2.60 starts a watcher actor that polls the
  GCS for node drain notices and hands them to ``ray.train.get_preemption_info()``.
  Our loop does not read that: a preemption reaches it as SIGTERM (driver or
  worker, ``pipeline.train.preempt``). ``ray_init_options`` turns the watcher off
  (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` for the job), and with it the line.
* Tracebacks that Ray's processes log when a node or worker is lost, and a line
  one Ray process repeats (the placement-group cleaner's, every second once the
  dashboard is gone): shown by the exception line, and once per 10 minutes with a
  count, unless ``--verbose`` (``pipeline.train.ray_output``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from typing import Any, TextIO

from pipeline.ray_logging import quiet_token_notice

PREFIX = "[pipeline]"
POLL_S = 0.5  # how often the driver drains the sink; also the least time between two bar updates


VERBOSE_ENV = "PIPELINE_VERBOSE"  # set for every worker of the job by ``ray_init_options``
# Ray Train logs each ``ray.train.report`` with the result's full repr, at INFO, on a logger named after
# this file's path rather than its module (so ``ray.train``'s level does not reach it).
_REPORT_LOGGER_FILE = ("train", "v2", "_internal", "execution", "context.py")
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def setup_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for our jobs: runs once in every worker process."""
    import ray

    # Ray Train's PlacementGroupCleaner (and any State API call) finds its cluster through
    # RAY_ADDRESS, else by scanning this machine, which fails when it runs more than one Ray instance.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    # Read when each Train worker starts: print once to the worker's stdout, not also through a logger.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if os.environ.get(VERBOSE_ENV) == "1":
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow's "View run … at: URL" at each end of a run on a tracking server (see the module doc).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # "Downloading artifacts: 100%|…" from each rank that loads --init-from runs:/… or models:/….
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("matplotlib.font_manager").setLevel(logging.WARNING)
    # "Retrying (Retry(total=…)) after connection broken by …" at each try of the MLflow client while
    # its server is away: the tracker says once that the server went away and once that it is back.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    report_logger = os.path.join(os.path.dirname(ray.__file__), *_REPORT_LOGGER_FILE)
    logging.getLogger(report_logger).setLevel(logging.WARNING)


def ray_init_options(verbose: bool) -> dict[str, Any]:
    """``ray.init`` arguments common to local and remote clusters; quiets the driver's Ray loggers too."""
    quiet_token_notice(verbose)
    return {
        "runtime_env": {"worker_process_setup_hook": f"{__name__}.setup_ray_worker",
                        # Read by Ray Train's controller (see the module doc: the watcher nobody reads).
                        "env_vars": {VERBOSE_ENV: "1" if verbose else "0", PREEMPTION_WATCHER_ENV: "0"}},
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }


def train_log_level(verbose: bool) -> str:
    """Level of Ray Train's ``ray.train`` loggers on the console (their log files keep everything)."""
    return "INFO" if verbose else "WARNING"


class ConsoleSink:
    """Actor that buffers rank 0's events until the driver collects them (create with ``sink_actor``)."""

    def __init__(self) -> None:
        self._events: list[tuple] = []

    def put(self, event: tuple) -> None:
        self._events.append(event)

    def drain(self) -> list[tuple]:
        events, self._events = self._events, []
        return events


def sink_actor():
    """A ``ConsoleSink`` actor that needs no CPU, on the driver's node.

    Pinned there because a worker node that dies (and with it any actor placed on
    it) must not silence the console for the rest of the job.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_restarts=0)(ConsoleSink).options(scheduling_strategy=here).remote()


class WorkerConsole:
    """Rank 0's side: ``line``, ``step`` and ``epoch`` events, sent without waiting.

    ``sink`` is a ``ConsoleSink`` handle, ``"stdout"`` (write the lines to this
    process's stdout) or None (silent: a sweep reports its trials itself).
    Other ranks get ``enabled=False`` and send nothing.
    """

    def __init__(self, sink: Any, enabled: bool = True, stream: TextIO | None = None) -> None:
        self._sink = sink if enabled else None
        self._stream = stream or sys.stdout
        self._last = 0.0

    def _send(self, event: tuple) -> None:
        if self._sink is None:
            return
        if isinstance(self._sink, str):  # "stdout"
            if event[0] in ("line", "epoch") or event[3] is not None:
                self._stream.write(format_event(event) + "\n")
                self._stream.flush()
            return
        self._sink.put.remote(event)  # fire and forget: the step never waits on the driver

    def line(self, text: str) -> None:
        self._send(("line", text))

    def step(self, epoch: int, epochs: int, step: int, steps: int, figures: dict[str, float] | None = None) -> None:
        """Called every step; sends at most one event per ``POLL_S``, and always one with ``figures``."""
        now = time.monotonic()
        if figures is None and now - self._last < POLL_S and step != steps:
            return
        self._last = now
        self._send(("step", epoch, epochs, figures, step, steps))

    def epoch(self, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        self._send(("epoch", epoch, epochs, metrics))


def format_event(event: tuple) -> str:
    """The console line of a ``line``, ``epoch`` or step-with-figures event."""
    kind = event[0]
    if kind == "line":
        return f"{PREFIX} {event[1]}"
    if kind == "epoch":
        _, epoch, epochs, m = event
        val = "".join(f" {k} {m[k]:.4f}" for k in ("val_loss", "val_top1", "val_top5") if k in m)  # when validated
        return (f"{PREFIX} epoch {epoch}/{epochs}: train_loss {m['train_loss']:.4f}{val} "
                f"{m['train_images_per_s']:.0f} img/s data-wait {m['data_wait_frac']:.0%} ({m['epoch_time_s']:.1f} s)")
    _, epoch, epochs, f, step, steps = event
    return (f"{PREFIX} epoch {epoch}/{epochs} step {step}/{steps} loss {f['loss']:.4f} lr {f['lr']:.3g} "
            f"{f['images_per_s']:.0f} img/s data-wait {f['data_wait_frac']:.0%}")


class DriverConsole:
    """The driver's side: owns the sink while ``trainer.fit()`` runs and prints what rank 0 sent.

    ``tty`` None means: a bar if ``stream`` is a terminal. ``sink`` is what goes
    into the loop config; ``None`` when ``enabled`` is false.
    """

    def __init__(self, enabled: bool = True, tty: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.enabled = enabled
        self.sink: Any = None
        self._bar = None
        self._bar_epoch = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DriverConsole:
        if self.enabled:
            self.sink = sink_actor()
            self._thread = threading.Thread(target=self._poll, name="pipeline-console", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._drain()  # what rank 0 sent after the last poll
        self._close_bar()
        import ray

        ray.kill(self.sink)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._drain()

    def _drain(self) -> None:
        import ray

        try:
            events = ray.get(self.sink.drain.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            return  # the console is best effort; the job's own errors surface from fit()
        for event in events:
            self.show(event)

    def show(self, event: tuple) -> None:
        """Render one event: bar updates on a TTY, lines otherwise."""
        if event[0] == "step":
            if self.tty:
                self._update_bar(event)
            elif event[3] is not None:
                self._write(format_event(event))
            return
        if event[0] == "epoch":
            self._close_bar()
        self._write(format_event(event))

    def say(self, text: str) -> None:
        """One line of the driver's own, between the bar's updates (printed even when rank 0's are not)."""
        self._close_bar()
        self._write(text)

    def _update_bar(self, event: tuple) -> None:
        from tqdm import tqdm

        _, epoch, epochs, figures, step, steps = event
        if self._bar is None or epoch != self._bar_epoch:
            self._close_bar()
            # Size per epoch: tqdm hides its bar on a terminal that reports 0×0 (a bare pty).
            size = shutil.get_terminal_size((100, 24))
            # From the step this first event reports: a rate over the steps before would be per nothing.
            self._bar = tqdm(total=steps, initial=step, desc=f"epoch {epoch}/{epochs}", unit="step",
                             file=self.stream, ncols=size.columns, nrows=size.lines, leave=False)
            self._bar_epoch = epoch
        self._bar.update(step - self._bar.n)
        if figures is not None:
            self._bar.set_postfix_str(f"loss {figures['loss']:.4f} {figures['images_per_s']:.0f} img/s")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()


__all__ = ["ConsoleSink", "DriverConsole", "PREFIX", "WorkerConsole", "format_event", "ray_init_options",
           "setup_ray_worker", "sink_actor", "train_log_level"]
