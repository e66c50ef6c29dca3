"""Process-tree helpers for tests that start servers or kill workers: only ever touch our own processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def descendants(root: int) -> list[int]:
    """Process ids below ``root`` (read from /proc), so a test signals only what it started."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            ppid = int(rest.rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we read
        children.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def descendants_with(root: int, needle: bytes) -> list[int]:
    """Process ids below ``root`` whose command line contains ``needle`` (a Ray worker, a dashboard, …)."""
    found = []
    for pid in descendants(root):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue  # the process ended while we read
    return found


@contextmanager
def a_worker_killed_after_a_checkpoint(storage: Path) -> Iterator[list[int]]:
    """Chaos beside a job run in the block: once the job under ``storage`` has a complete checkpoint
    (``meta.json``, ``state.pt`` and every rank's file: the progress ``fit`` and a restarted group go by;
    a checkpoint directory may hold one rank's upload only), SIGKILL one Ray Train worker this test process
    started. Yields the list the killed pid goes into."""
    from pipeline.train.resume import newest_global_step

    killed: list[int] = []
    stop = threading.Event()

    def chaos() -> None:
        while not stop.is_set():
            if newest_global_step(str(storage)) >= 0:
                workers = descendants_with(os.getpid(), b"RayTrainWorker")
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=chaos, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        stop.set()
        watcher.join()
