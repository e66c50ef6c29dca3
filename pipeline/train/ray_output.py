"""Ray's forwarded output on the driver's console: tracebacks by their last line, repeats held back.

Two kinds of Ray output buried the lines of ours on a long job's console:

* Tracebacks at a fault. When a node is lost or a worker killed, every Ray process that
  notices logs one: the surviving ranks' collective that lost its peer, Ray Train's
  controller failing to shut the old group down or to place the new one. One node loss
  (tests/test_cluster_multinode.py) printed 80 lines from Ray's processes, nearly all of
  them stack frames inside Ray and torch, around the one line of ours that says what
  happens next ("resuming after epoch N; 1 worker(s) …"). Each traceback is now shown as
  its exception line, under the line that introduced it: 8 lines.
* A line a Ray process logs again and again. When the dashboard process dies (it serves
  the State API), Ray Train's ``PlacementGroupCleaner`` warns "Failed to query Ray Train
  Controller actor state" every second or two for the rest of the job (52 lines in a run of
  about a minute; tens of thousands a day) while training goes on. Ray folds repeats across
  processes within seconds, not those of one process over hours. A line that one process
  repeats (the same text but for numbers and ids) is now shown once per ``REPEAT_WINDOW_S``,
  with the count of the rest.

A third kind says nothing at all: when Ray ends an actor (a sweep's trials at a Ctrl-C), its
SIGTERM handler raises ``SystemExit`` wherever the process happens to be, and inside a
garbage-collection callback Python reports that as "Exception ignored in: …" with a traceback
through ``sigterm_handler``. That is the actor's intended exit, not a fault: it is left out whole.

A crash dump (a rank's process killed by SIGSEGV, say in DALI's decoder) keeps the lines Ray's
signal handler prints, which name the signal and the function it struck in (``crash_of`` keeps
them for the driver's failure line), and loses their copy in Ray's C++ log format and Python's
list of loaded extension modules: 3 lines and one of some thousand characters per crash.

Each of the first two says so once on the console when it first acts. Unless ``--verbose``; the
session logs on every node keep everything, and ``--verbose`` prints it here too.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from typing import Any

from pipeline.train.console import PREFIX

_HEADER = "Traceback (most recent call last):"
_CHAINS = ("The above exception was the direct cause of the following exception:",
           "During handling of the above exception, another exception occurred:")
_FRAME = re.compile(r'\s+File ".*", line \d+')
_IGNORED = "Exception ignored in:"  # Python's report of an exception it could not raise (GC callbacks, __del__)
_RAY_EXIT_FRAME = re.compile(r"\bin sigterm_handler$")  # Ray's handler that ends an actor with SystemExit
_RAY_HANDLER = "ray_print_logs"  # the name ray.init gives its handler of forwarded output
FOLD_NOTE = (f"{PREFIX} Ray's tracebacks are shown by their last line; --verbose shows them whole "
             "(each node's Ray session logs keep them)")
REPEAT_WINDOW_S = 600.0
REPEAT_NOTE = (f"{PREFIX} a line a Ray process repeats is shown once per {REPEAT_WINDOW_S / 60:.0f} min, "
               "with the count of the rest; --verbose shows every one")
_NUMBERED = re.compile(r"\d|0x[0-9a-fA-F]")  # words that differ between repeats: counts, ids, times


class TracebackFolder:
    """Takes a traceback's header, frames and chaining lines out of forwarded lines; keeps its exception line.

    Lines come in batches per process, and a traceback may run over several batches,
    so where each ``source`` stands is kept between batches: inside a traceback, just
    past one (a blank line there is the traceback's own), or neither. An "Exception
    ignored in" line waits for the traceback under it: when that is Ray's SIGTERM handler
    ending the process with ``SystemExit``, neither is shown.
    """

    def __init__(self) -> None:
        self._state: dict[Any, str] = {}
        self._ignored: dict[Any, list] = {}  # source -> [its "Exception ignored in" line, whether Ray's exit raised]
        self.folded = 0  # tracebacks shortened so far
        self.exits = 0  # Ray's own SIGTERM exits left out

    def fold(self, source: Any, lines: list[str]) -> list[str]:
        out = []
        state = self._state.pop(source, "")
        ignored = self._ignored.pop(source, None)
        for line in lines:
            text = line.strip()
            starts = text == _HEADER or bool(_FRAME.match(line))  # frames alone: Ray merged their header away
            if ignored is not None and state != "inside" and not starts:
                out.append(ignored[0])  # no traceback under it: shown as it came
                ignored = None
            if starts or text in _CHAINS:
                if starts and state != "inside":
                    self.folded += 1
                if ignored is not None and _RAY_EXIT_FRAME.search(text):
                    ignored[1] = True
                state = "inside"
            elif state == "inside" and (not text or line[:1].isspace()):
                continue  # source lines, carets, blank lines between chained tracebacks
            elif state == "past" and not text:
                state = ""
            elif state != "inside" and text.startswith(_IGNORED):
                ignored, state = [line, False], ""
            elif ignored is not None:  # the exception line of the traceback under "Exception ignored in"
                if ignored[1] and text.startswith("SystemExit"):
                    self.exits += 1
                else:
                    out += [ignored[0], line]
                ignored, state = None, "past"
            else:
                out.append(line)
                state = "past" if state == "inside" else ""
        if ignored is not None and state != "inside":
            out.append(ignored[0])  # the batch's last line: not held back on the chance of a traceback to come
        elif ignored is not None:
            self._ignored[source] = ignored
        if state:
            self._state[source] = state
        return out


class RepeatLimiter:
    """Shows a ``source``'s line once per ``window_s``; the repeats in between are counted, not shown.

    A repeat is the same text but for words with digits in them. The next line shown after a
    window carries the count of those held back before it.
    """

    def __init__(self, window_s: float = REPEAT_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._shown: dict[tuple, list] = {}  # (source, text) -> [when last shown, repeats held since]
        self.held = 0  # repeats held back so far

    def admit(self, source: Any, line: str) -> str | None:
        """The line to show (None: a repeat, held back)."""
        if not line.strip():
            return line
        now = self._clock()
        key = (source, " ".join(w for w in line.split() if not _NUMBERED.search(w)))
        entry = self._shown.get(key)
        if entry is not None and now - entry[0] < self.window_s:
            entry[1] += 1
            self.held += 1
            return None
        if len(self._shown) > 10_000:  # a job of weeks: forget what has not come back for a window
            self._shown = {k: v for k, v in self._shown.items() if now - v[0] < self.window_s}
        self._shown[key] = [now, 0]
        if entry is None or not entry[1]:
            return line
        return f"{line} [{entry[1]} more like it in the {(now - entry[0]) / 60:.0f} min before]"


def quiet_ray_output() -> tuple[TracebackFolder, RepeatLimiter] | None:
    """From now on in this process, Ray's forwarded output reaches the console with tracebacks folded and
    repeats held back; returns the two filters (the same ones on a second call).

    Wraps the handler ``ray.init(log_to_driver=True)`` installs, for as long as Ray runs here: lines
    keep coming after a job ends, until Ray shuts down, which removes the handler. None when Ray
    forwards nothing to this process.
    """
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray layout: its output goes through unchanged
        return None
    handler = next((h for name, h in list(dispatcher.handlers) if name == _RAY_HANDLER), None)
    if handler is None:
        return None
    if getattr(handler, "filters", None):
        return handler.filters
    filters = TracebackFolder(), RepeatLimiter()
    wrapped = _filtered(*filters, handler)
    wrapped.filters = filters
    dispatcher.remove_handler(_RAY_HANDLER)
    dispatcher.add_handler(_RAY_HANDLER, wrapped)
    return filters


_FATAL_SIGNAL = re.compile(r"^\*\*\* (SIG[A-Z]+) received at time=")  # Ray's handler of a fatal signal, first line
_CRASH_PC = re.compile(r"^PC: @\s+0x[0-9a-fA-F]+\s+\S+\s+(\S.*)$")  # its next: the function that faulted
_crashes: dict[tuple[str, str], str] = {}  # (node ip, pid) -> "SIGSEGV in dali::imgcodec::ImageDecoder<>::…"
# The rest of a crash dump, left out: Ray's C++ log repeating the handler's lines with its own prefix, and
# Python's faulthandler list of every extension module loaded (one line of some thousand characters).
_CRASH_REPEATS = re.compile(r"^(Extension modules: |\[\d{4}-\d\d-\d\d [\d:,]+ [EF] \d+ \d+\] logging\.cc:\d+: )")


def _note_crash(ip: Any, pid: Any, lines: list[str]) -> None:
    """Remember a process's fatal signal and where it struck, from the dump Ray's signal handler prints."""
    key = (str(ip), str(pid))
    for line in lines:
        line = line.strip()
        fatal = _FATAL_SIGNAL.match(line)
        if fatal and key not in _crashes:
            _crashes[key] = fatal.group(1)
            continue
        pc = _CRASH_PC.match(line)
        if pc and key in _crashes and " in " not in _crashes[key] and not pc.group(1).startswith("(unknown)"):
            _crashes[key] += f" in {pc.group(1).split('(', 1)[0]}"


def crash_of(ip: str, pid: int | str) -> str | None:
    """The fatal signal a Ray process on ``ip`` with ``pid`` printed, and where (``SIGSEGV in dali::…``), if it did.

    Known where this driver shows Ray's forwarded output through ``quiet_ray_output`` (not with ``--verbose``).
    """
    return _crashes.get((str(ip), str(pid)))


def _filtered(folder: TracebackFolder, limiter: RepeatLimiter,
              print_batch: Callable[[dict], None]) -> Callable[[dict], None]:
    def handle(batch: dict) -> None:
        if batch.get("pid") == "autoscaler":  # its status report, of which Ray shows only event lines itself
            print_batch(batch)
            return
        given = batch.get("lines") or []
        if batch.get("is_err"):
            _note_crash(batch.get("ip"), batch.get("pid"), given)
            given = [line for line in given if not _CRASH_REPEATS.match(line)]
        folded, held = folder.folded, limiter.held
        source = (batch.get("ip"), batch.get("pid"), batch.get("is_err"))
        lines = [shown for line in folder.fold(source, given)
                 if (shown := limiter.admit(source, line)) is not None]
        if lines:
            print_batch({**batch, "lines": lines})
        for now, before, note in ((folder.folded, folded, FOLD_NOTE), (limiter.held, held, REPEAT_NOTE)):
            if now and not before:
                print(note, file=sys.stderr, flush=True)

    return handle


__all__ = ["FOLD_NOTE", "REPEAT_NOTE", "RepeatLimiter", "TracebackFolder", "crash_of", "quiet_ray_output"]
