"""Progress reporting: a tqdm bar (items/s, MB/s, ETA) on a terminal, plain periodic lines otherwise.

Logs and CI capture non-TTY output, where a redrawn bar turns into noise; there, a line
every ``interval`` seconds carries the same figures.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or unknown
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Counts items and bytes toward ``total`` items; use as a context manager.

    ``enabled=False`` prints nothing (library use); ``stream`` defaults to stderr.
    """

    def __init__(self, total: int, *, desc: str = "", unit: str = "img", enabled: bool = True,
                 stream: TextIO | None = None, interval: float = 10.0) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.items = 0
        self.bytes = 0
        self._start = time.perf_counter()
        self._last_line = self._start
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, smoothing=0.1)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def rates(self) -> tuple[float, float]:
        """(items/s, MB/s) since the start."""
        t = max(self.elapsed, 1e-9)
        return self.items / t, self.bytes / 1e6 / t

    def update(self, items: int, nbytes: int = 0) -> None:
        """Add ``items`` finished items that wrote ``nbytes`` bytes."""
        self.items += items
        self.bytes += nbytes
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(items)
            self._bar.set_postfix_str(f"{self.rates()[1]:.1f} MB/s", refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._line()

    def _line(self) -> None:
        ips, mbs = self.rates()
        left = (self.total - self.items) / ips if ips > 0 else float("nan")
        pct = 100.0 * self.items / self.total if self.total else 100.0
        prefix = f"{self.desc}: " if self.desc else ""
        print(f"{prefix}{self.items}/{self.total} {self.unit} ({pct:.0f}%) {ips:.0f} {self.unit}/s "
              f"{mbs:.1f} MB/s ETA {_fmt_eta(left)}", file=self.stream, flush=True)

    def close(self) -> None:
        """Finish the bar (or print a last line when the run was long enough to have printed any)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
