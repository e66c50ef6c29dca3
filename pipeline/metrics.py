"""Throughput meter for a training or loading loop: images/s, data-wait fraction, step time.

The loop marks two points per step: when the batch arrived (``data_ready``) and
when the step's work was issued (``step_done``). Time between the previous
``step_done`` and ``data_ready`` is time spent waiting for data; the rest is
compute. Clocks are host wall clocks and never synchronize the GPU: on CUDA, the
step times even out over an epoch because the loop synchronizes at its log
steps (``.item()``) and at the epoch end; calling ``flush`` right after that
epoch-end sync books the device's queued work as compute, so totals read after
it are accurate.
"""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass
class Throughput:
    """Totals over a window of steps."""

    images: int
    steps: int
    data_s: float
    compute_s: float

    @property
    def total_s(self) -> float:
        return self.data_s + self.compute_s

    @property
    def images_per_s(self) -> float:
        return self.images / self.total_s if self.total_s > 0 else 0.0

    @property
    def data_wait_frac(self) -> float:
        return self.data_s / self.total_s if self.total_s > 0 else 0.0

    @property
    def step_time_s(self) -> float:
        return self.total_s / self.steps if self.steps else 0.0


class ThroughputMeter:
    """Split a loop's wall time into data wait and compute.

    Usage::

        meter = ThroughputMeter()
        meter.start()
        for x, y in loader:
            meter.data_ready()
            ...  # forward, backward, step
            meter.step_done(len(x))
        epoch = meter.total()
    """

    def __init__(self) -> None:
        self._clock = time.perf_counter
        self.reset()

    def reset(self) -> None:
        """Zero the totals (the clock restarts at the next ``start``)."""
        self._images = 0
        self._steps = 0
        self._data_s = 0.0
        self._compute_s = 0.0
        self._mark = self._clock()
        self._ready = self._mark

    def start(self) -> None:
        """Start the clock: call right before asking the loader for the first batch."""
        self._mark = self._clock()

    def data_ready(self) -> None:
        """The batch is in hand."""
        self._ready = self._clock()
        self._data_s += self._ready - self._mark

    def step_done(self, images: int) -> None:
        """The step for ``images`` samples has been issued; the next data wait starts now."""
        self._mark = self._clock()
        self._compute_s += self._mark - self._ready
        self._images += images
        self._steps += 1

    def flush(self) -> None:
        """The device has just been synchronized: the time since the last step is compute of that step."""
        now = self._clock()
        self._compute_s += now - self._mark
        self._mark = now

    def total(self) -> Throughput:
        """Totals since the last ``reset``."""
        return Throughput(self._images, self._steps, self._data_s, self._compute_s)


__all__ = ["Throughput", "ThroughputMeter"]
