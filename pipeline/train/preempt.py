"""Stopping a job cleanly, and deciding on every rank alike when a checkpoint is due.

A stop is asked for with a small file, ``<storage_dir>/STOP``, holding the reason:
the driver writes it when it gets SIGTERM or SIGINT (``ray job stop`` sends
SIGTERM to the driver), and so does a worker that gets SIGTERM (a spot or
preemptible node SIGTERMs its processes before it goes; see
``Control.for_worker``); shared storage is already what every rank checkpoints
to, so every node can see it. Rank 0 reads it, the ranks agree on it in one
collective, write a checkpoint at the next step boundary and return; the driver
then exits non-zero with one line. A resubmitted job removes a leftover file
before its workers start.

``Control`` makes the per-step decision. Step triggers (``checkpoint_every_steps``)
are a function of the global step, the same on every rank. Time triggers and
stop requests come from rank 0's clock and rank 0's view of the stop file, and
reach the other ranks in a broadcast of three numbers over a CPU (gloo) group,
so all ranks checkpoint at the same step and call ``ray.train.report`` the same
number of times. That broadcast runs about once a second, not every step: rank
0 sets the number of steps to the next one from the measured step time.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.fileio import is_uri, write_atomic

if TYPE_CHECKING:
    from pipeline.train.config import RunSection

STOP_FILE = "STOP"
CHECKPOINT_FILE = "CHECKPOINT"  # a checkpoint now, training goes on (before an elastic group resizes)
# Target time between the ranks' agreed checks; PIPELINE_STOP_CHECK_S overrides it (0: every step).
CHECK_PERIOD_S = float(os.environ.get("PIPELINE_STOP_CHECK_S", "1.0"))
MAX_CHECK_INTERVAL = 100  # steps: bounds the wait when steps that were fast turn slow
DEADLINE_SLACK_S = 15.0  # after a signal's stop budget: Ray's time to return the workers' result


def stop_path(storage_dir: str | Path) -> Path:
    return Path(storage_dir) / STOP_FILE


def request_stop(storage_dir: str | Path, reason: str, origin: str = "driver") -> None:
    """Ask the job's workers to checkpoint at the next step boundary and stop (``origin``: driver or worker)."""
    path = stop_path(storage_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"reason": reason, "time": time.time(), "origin": origin}
    write_atomic(path, lambda f: f.write(json.dumps(record).encode()))


def _read_record(path: Path) -> dict | None:
    """A request file's JSON object, or None when there is none or it is unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _read_request(storage_dir: str | Path) -> dict | None:
    """The pending stop request (``reason``, ``time``, ``origin``), or None when there is none or it is unreadable."""
    record = _read_record(stop_path(storage_dir))
    return record if record is not None and "reason" in record else None


def read_stop(storage_dir: str | Path) -> str | None:
    """The reason of a pending stop request, or None."""
    record = _read_request(storage_dir)
    return str(record["reason"]) if record else None


def clear_stop(storage_dir: str | Path) -> None:
    stop_path(storage_dir).unlink(missing_ok=True)


def request_checkpoint(storage_dir: str | Path, reason: str) -> None:
    """Ask the job's workers for a checkpoint at the next agreed check; they train on after it."""
    write_atomic(Path(storage_dir) / CHECKPOINT_FILE, lambda f: f.write(json.dumps({"reason": reason}).encode()))


def read_checkpoint_request(storage_dir: str | Path) -> str | None:
    """The reason of a pending checkpoint request, or None."""
    record = _read_record(Path(storage_dir) / CHECKPOINT_FILE)
    return str(record.get("reason", "asked for")) if record is not None else None


def clear_checkpoint_request(storage_dir: str | Path) -> None:
    (Path(storage_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)


def drop_worker_stop(storage_dir: str | Path) -> str | None:
    """Remove a stop request a worker of an earlier worker group wrote; its reason, or None.

    A worker group that starts inside a running job replaces one that failed: Ray tears
    the old group down, and its surviving workers get SIGTERM on the way, which their
    handler takes for a preemption. Such a request is not for the new group. (A worker
    SIGTERM that ends the job stops it before any new group starts; the driver's own
    requests stay.)
    """
    record = _read_request(storage_dir)
    if not record or record.get("origin") != "worker":
        return None
    clear_stop(storage_dir)
    return str(record["reason"])


class Control:
    """At each step boundary: is a checkpoint due, and has a stop been asked for? The same answer on all ranks."""

    def __init__(self, *, storage_dir: str | Path, rank: int, world_size: int, every_steps: int | None,
                 every_minutes: float | None) -> None:
        self.storage_dir = storage_dir
        self.rank, self.world_size = rank, world_size
        self.every_steps = every_steps
        self.every_s = every_minutes * 60 if every_minutes else None
        self.group = None
        if world_size > 1 and torch.distributed.is_initialized():
            # Its own CPU group: with NCCL, a host-side flag needs no device sync.
            self.group = torch.distributed.new_group(backend="gloo")
        self.stop_reason: str | None = None
        self.requested: str | None = None  # rank 0: the reason of a checkpoint request being served
        self.note: str | None = None  # rank 0: a line for the console about a request it dropped at start
        self._shared_files = not is_uri(storage_dir)  # stop and checkpoint requests are files there
        self._next_check = 0
        self._last_check: tuple[float, int] | None = None  # (time, step) of the last agreed check
        self._last_checkpoint = time.monotonic()

    @classmethod
    def for_worker(cls, storage_dir: str, rank: int, world_size: int, run: "RunSection") -> "Control":
        """A Ray Train worker's ``Control`` for ``run``'s checkpoint triggers; SIGTERM to the worker asks for a stop."""
        control = cls(storage_dir=storage_dir, rank=rank, world_size=world_size,
                      every_steps=run.checkpoint_every_steps, every_minutes=run.checkpoint_every_minutes)
        if not is_uri(storage_dir):  # the stop file needs storage the ranks share as a file system
            stale = drop_worker_stop(storage_dir) if rank == 0 else None
            if stale:  # rank 0's console says it, once it exists
                control.note = (f"ignored a stop request from the previous worker group ({stale}: Ray's restart "
                                "of a failed group, not a preemption)")
            stop_on_worker_sigterm(storage_dir, rank)
        return control

    def poll(self, global_step: int) -> tuple[bool, bool]:
        """(checkpoint due, stop) after ``global_step`` steps; called by every rank at every step."""
        due = bool(self.every_steps and global_step % self.every_steps == 0)
        if global_step < self._next_check:
            return due, False
        stop, time_due, interval = self._agree(global_step)
        self._next_check = global_step + interval
        return due or time_due or stop, stop

    def checkpointed(self) -> None:
        """A checkpoint was written: the time trigger counts from now, and a request it served is done."""
        self._last_checkpoint = time.monotonic()
        if self.requested is not None:  # the controller says so when it sees it (pipeline.train.resize)
            clear_checkpoint_request(self.storage_dir)
            self.requested = None

    def _agree(self, global_step: int) -> tuple[bool, bool, int]:
        flags = torch.zeros(3, dtype=torch.float64)
        if self.rank == 0:
            now = time.monotonic()
            self.stop_reason = read_stop(self.storage_dir) if self._shared_files else None
            if self._shared_files and self.requested is None:
                self.requested = read_checkpoint_request(self.storage_dir)
            if self._last_check is None:
                interval = 1  # no step time measured yet
            else:
                t0, s0 = self._last_check
                step_s = (now - t0) / max(global_step - s0, 1)
                interval = min(max(int(CHECK_PERIOD_S / max(step_s, 1e-6)), 1), MAX_CHECK_INTERVAL)
            self._last_check = (now, global_step)
            flags[0] = self.stop_reason is not None
            flags[1] = (self.every_s is not None and now - self._last_checkpoint >= self.every_s) or \
                self.requested is not None
            flags[2] = interval
        if self.group is not None:
            torch.distributed.broadcast(flags, src=0, group=self.group)  # the group spans all ranks
        return bool(flags[0]), bool(flags[1]), int(flags[2])


def _driver_line(text: str) -> None:
    """A line on the driver's stderr, above the progress bar the console may be drawing on the terminal."""
    tqdm = sys.modules.get("tqdm")  # imported by the console once it drew a bar
    if tqdm is not None:
        tqdm.tqdm.write(text, file=sys.stderr)  # clears the bar, writes, draws it again
        sys.stderr.flush()
    else:
        print(text, file=sys.stderr, flush=True)


@dataclass
class SignalStop:
    """What ``stop_on_signals`` did: whether its handlers are in place, and the first signal's name once one came."""

    handled: bool
    signal: str | None = None


@contextmanager
def stop_on_signals(storage_dirs: str | Path | Sequence[str | Path], timeout_s: float,
                    enabled: bool = True) -> Iterator[SignalStop]:
    """While the driver waits for its job(s): SIGTERM/SIGINT ask the workers for a checkpoint and a stop.

    The request goes to every job in ``storage_dirs`` (a sweep's trials: those not started yet
    see it before they start). ``handled`` is False when disabled or off the main thread; code
    that would set its own handlers later must then be kept from doing so. If the jobs have not
    ended ``timeout_s`` after the signal (plus a little for Ray to return), the driver exits
    anyway; a second signal exits at once.
    """
    dirs = [storage_dirs] if isinstance(storage_dirs, (str, Path)) else list(storage_dirs)
    state = SignalStop(handled=False)

    def handler(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if state.signal:
            _driver_line(f"[pipeline] {name} again: exiting now without waiting for the checkpoint")
            os._exit(128 + signum)
        state.signal = name
        for d in dirs:
            request_stop(d, f"{name} to the driver")
        _driver_line(f"[pipeline] {name}: checkpointing at the next step, then stopping (up to {timeout_s:.0f} s)")
        threading.Thread(target=_deadline, args=(timeout_s, signum), daemon=True).start()

    if not enabled or threading.current_thread() is not threading.main_thread():
        yield state  # signals reach only the main thread; an embedding caller keeps its own handlers
        return
    note = job_stop_wait_note(timeout_s)
    if note:
        print(note, file=sys.stderr, flush=True)
    # Replaces the handlers Ray's core installs on the driver, which dump a native stack and abort (exit 134).
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    state.handled = True
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# The loop this worker process runs: (storage dir, stop reason, the loop's thread); set on each rank.
_worker_loop: tuple[str, str, threading.Thread] | None = None


def stop_on_worker_sigterm(storage_dir: str, rank: int) -> None:
    """While this rank's loop runs, SIGTERM to its worker process asks the job to checkpoint and stop.

    Ray Train V2 runs the loop in a thread of the worker actor; the actor's main thread
    runs its tasks (Ray's task loop), and only a process's main thread may set a signal
    handler. Ray's own handler there exits the worker (SystemExit): the group fails, and
    restarts from the last checkpoint if ``run.max_failures`` allows, losing the steps
    since. So the handler is set by a task on this worker's own actor, which runs on that
    thread. It writes the stop file, as SIGTERM to the driver does (rank 0 reads it at the
    next agreed check); once the loop has ended, and for a second SIGTERM, Ray's handler
    applies.
    """
    import ray

    global _worker_loop
    node = ray.util.get_node_ip_address()
    _worker_loop = (storage_dir, f"SIGTERM to worker rank {rank} on {node}", threading.current_thread())
    try:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_set_worker_handler))  # RayTrainWorker.execute: a task on the main thread
    except (AttributeError, RuntimeError, ValueError) as exc:  # another Ray: train on, with Ray's handling
        if rank == 0:
            print(f"[pipeline] SIGTERM to a worker will not checkpoint ({type(exc).__name__}: {exc})",
                  file=sys.stderr, flush=True)


def _set_worker_handler() -> None:
    global _ray_sigterm
    if signal.getsignal(signal.SIGTERM) is not _on_worker_sigterm:  # once per process
        _ray_sigterm = signal.signal(signal.SIGTERM, _on_worker_sigterm)


_ray_sigterm = signal.SIG_DFL  # the handler ours replaced on the worker's main thread


def _on_worker_sigterm(signum: int, frame) -> None:
    global _worker_loop
    loop, _worker_loop = _worker_loop, None  # a second SIGTERM goes to Ray's handler
    if loop is not None and loop[2].is_alive():
        # No line here: Ray's teardown of a failed group SIGTERMs the ranks still waiting for the failed
        # one, and "checkpointing" would be false then. A stop that happens is said by rank 0 and the driver.
        request_stop(loop[0], loop[1], origin="worker")
        return
    if callable(_ray_sigterm):
        _ray_sigterm(signum, frame)  # Ray's: SystemExit, the worker exits
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def job_stop_wait_note(timeout_s: float) -> str | None:
    """For a driver run by ``ray job submit``: a line if ``ray job stop`` would SIGKILL it before the stop checkpoint.

    Ray's job supervisor sends SIGTERM to the entrypoint, waits ``RAY_JOB_STOP_WAIT_TIME_S``
    (3 s unless the job's runtime env or the head sets it), then SIGKILLs it.
    """
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return None  # not a submitted job
    need = int(timeout_s + DEADLINE_SLACK_S + 0.999)
    try:
        wait = float(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "3"))
    except ValueError:
        wait = 3.0
    if wait >= need:
        return None
    return (f"[pipeline] `ray job stop` SIGKILLs this job {wait:g} s after SIGTERM, before its stop checkpoint "
            f"(up to {need} s): set RAY_JOB_STOP_WAIT_TIME_S={max(need, 60)} in the job's runtime_env env_vars")


def exit_code(reason: str) -> int:
    """The shell's code for a job stopped by ``reason`` ("SIGTERM to the driver": 143; SIGINT: 130; else 1)."""
    name = reason.split()[0] if reason else ""
    return 128 + signal.Signals[name].value if name in ("SIGTERM", "SIGINT") else 1


def _deadline(timeout_s: float, signum: int) -> None:
    time.sleep(timeout_s + DEADLINE_SLACK_S)  # the workers' budget, plus Ray's time to return their result
    _driver_line(f"[pipeline] stopped without a checkpoint: the job did not stop within {timeout_s:.0f} s of "
                 f"{signal.Signals(signum).name}")
    os._exit(128 + signum)


__all__ = ["Control", "STOP_FILE", "clear_stop", "drop_worker_stop", "exit_code", "job_stop_wait_note", "read_stop",
           "request_stop", "SignalStop", "stop_on_signals", "stop_on_worker_sigterm", "stop_path"]
