"""A checkpoint just before Ray Train resizes a running elastic worker group.

When a lost node comes back, Ray Train's controller grows the group: it shuts the running
workers down and starts a bigger group from the latest checkpoint, so every step since that
checkpoint (up to ``run.checkpoint_every_minutes``) would be trained again. This callback runs in
the controller: when it decides to resize a running group (the ``RESIZING`` state; a group that
failed goes through ``RESTARTING`` instead, with nothing left to save), it asks the workers for a
checkpoint (``pipeline.train.preempt.request_checkpoint``), which they write at their next agreed
check, about a second away, and waits until it is complete on storage before letting the resize
go on. The new group starts from it (``pipeline.train.resume`` takes the newest complete
checkpoint on storage). As another world size restarts the epoch in progress from its first
batch, what this keeps is the weights and optimizer state those steps produced.

It needs the shared file system the stop requests use; with storage on a URI the job resizes as
Ray Train does on its own. Ray Train 2.60 passes a ``RunConfig`` callback that is not a
``UserCallback`` to its controller as is: this is such a ``ControllerCallback``.
"""

from __future__ import annotations

import logging
import time

from ray.train.v2._internal.execution.callback import ControllerCallback

log = logging.getLogger(__name__)

WAIT_S = 120.0  # for the checkpoint; past it the group resizes without one, as it would without this
POLL_S = 0.5


class CheckpointBeforeResize(ControllerCallback):
    """Ask for a checkpoint and wait for it when the controller is about to resize a running group."""

    def __init__(self, storage_dir: str, run_name: str, wait_s: float = WAIT_S) -> None:
        self.storage_dir = storage_dir
        self.run_name = run_name
        self.wait_s = wait_s
        # The driver's ``ConsoleSink`` (set once it exists): its lines come out as ours, without the
        # ``(TrainController pid=…)`` prefix Ray puts on an actor's prints. None: print them.
        self.console = None

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.put.remote(("line", text))
        else:
            print(f"[pipeline] {text}", flush=True)

    def after_controller_state_update(self, previous_state, current_state) -> None:
        from ray.train.v2._internal.execution.controller.state import ResizingState

        if not isinstance(current_state, ResizingState):
            return
        try:
            self._checkpoint_now(getattr(current_state.scaling_decision, "num_workers", "?"))
        except Exception:  # noqa: BLE001 - never fail the job over it: the group resizes as it would have
            log.warning("checkpoint before the resize failed; resizing from the latest checkpoint", exc_info=True)

    def _checkpoint_now(self, num_workers) -> None:
        from pipeline.train.preempt import clear_checkpoint_request, request_checkpoint
        from pipeline.train.resume import newest_global_step

        t0 = time.monotonic()
        before = newest_global_step(self.storage_dir)
        request_checkpoint(self.storage_dir, f"the worker group resizes to {num_workers} worker(s)")
        try:
            while (reached := newest_global_step(self.storage_dir)) <= before:
                if time.monotonic() - t0 > self.wait_s:
                    self._say(f"{self.run_name}: no checkpoint within {self.wait_s:.0f} s before the worker group "
                              f"resizes to {num_workers} worker(s); it starts from step {before}")
                    return
                time.sleep(POLL_S)
        finally:
            clear_checkpoint_request(self.storage_dir)  # not for the new group
        self._say(f"{self.run_name}: checkpoint at step {reached} before the worker group resizes to "
                  f"{num_workers} worker(s) ({time.monotonic() - t0:.1f} s)")


__all__ = ["CheckpointBeforeResize"]
