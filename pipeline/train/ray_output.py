"""Ray's forwarded output on the driver's console during a fault: each traceback as its last line.

When a node is lost or a worker killed, every Ray process that notices logs a Python
traceback: the surviving ranks' collective that lost its peer, Ray Train's controller
failing to shut the old group down or to place the new one. Ray forwards them all to
the driver, so one node loss printed some 75 lines, nearly all of them stack frames
inside Ray and torch, around the one line of ours that says what happens next
("resuming after epoch N; 1 worker(s) …"). A run of days meets several such faults.

Unless ``--verbose``, the driver prints each forwarded traceback as its exception line,
under the line that introduced it, and says once that it does so. The whole tracebacks
stay in every node's Ray session logs, and ``--verbose`` prints them here too.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.train.console import PREFIX

_HEADER = "Traceback (most recent call last):"
_CHAINS = ("The above exception was the direct cause of the following exception:",
           "During handling of the above exception, another exception occurred:")
_FRAME = re.compile(r'\s+File ".*", line \d+')
_RAY_HANDLER = "ray_print_logs"  # the name ray.init gives its handler of forwarded output
FOLD_NOTE = (f"{PREFIX} Ray's tracebacks are shown by their last line; --verbose shows them whole "
             "(each node's Ray session logs keep them)")


class TracebackFolder:
    """Takes a traceback's header, frames and chaining lines out of forwarded lines; keeps its exception line.

    Lines come in batches per process, and a traceback may run over several batches,
    so where each ``source`` stands is kept between batches: inside a traceback, just
    past one (a blank line there is the traceback's own), or neither.
    """

    def __init__(self) -> None:
        self._state: dict[Any, str] = {}
        self.folded = 0  # tracebacks shortened so far

    def fold(self, source: Any, lines: list[str]) -> list[str]:
        out = []
        state = self._state.pop(source, "")
        for line in lines:
            text = line.strip()
            starts = text == _HEADER or bool(_FRAME.match(line))  # frames alone: Ray merged their header away
            if starts or text in _CHAINS:
                if starts and state != "inside":
                    self.folded += 1
                state = "inside"
            elif state == "inside" and (not text or line[:1].isspace()):
                continue  # source lines, carets, blank lines between chained tracebacks
            elif state == "past" and not text:
                state = ""
            else:
                out.append(line)
                state = "past" if state == "inside" else ""
        if state:
            self._state[source] = state
        return out


@contextlib.contextmanager
def folded_tracebacks(enabled: bool = True) -> Iterator[TracebackFolder | None]:
    """While open, Ray's forwarded output reaches the console with its tracebacks folded.

    Wraps the handler ``ray.init(log_to_driver=True)`` installs; a no-op (yields None) when
    ``enabled`` is false or Ray forwards nothing to this process.
    """
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray layout: its output goes through unchanged
        dispatcher = None
    original = None
    if enabled and dispatcher is not None:
        original = next((h for name, h in list(dispatcher.handlers) if name == _RAY_HANDLER), None)
    if original is None:
        yield None
        return
    folder = TracebackFolder()
    dispatcher.remove_handler(_RAY_HANDLER)
    dispatcher.add_handler(_RAY_HANDLER, _folding(folder, original))
    try:
        yield folder
    finally:
        dispatcher.remove_handler(_RAY_HANDLER)
        dispatcher.add_handler(_RAY_HANDLER, original)


def _folding(folder: TracebackFolder, print_batch: Callable[[dict], None]) -> Callable[[dict], None]:
    def handle(batch: dict) -> None:
        before = folder.folded
        lines = folder.fold((batch.get("ip"), batch.get("pid"), batch.get("is_err")), batch.get("lines") or [])
        if lines:
            print_batch({**batch, "lines": lines})
        if folder.folded and not before:
            print(FOLD_NOTE, file=sys.stderr, flush=True)

    return handle


__all__ = ["FOLD_NOTE", "TracebackFolder", "folded_tracebacks"]
