"""An exponential moving average of the model's weights (``train.ema_decay``).

After every optimizer step the average moves towards the trained weights,
``avg = d * avg + (1 - d) * w``, with ``d = min(decay, (1 + n) / (10 + n))`` at
update ``n``: the average follows the model closely at first, so the random
initial weights fade out within a few dozen steps, and settles at ``decay``
(a horizon of about ``1 / (1 - decay)`` steps) once ``n`` is large. BatchNorm's
running statistics are averaged the same way, so the averaged model is
evaluated with statistics that match its weights.

Where it is on, the average is the model a run evaluates, checkpoints as its
result and logs to MLflow: the validation figures, ``pipeline evaluate`` and
``--init-from`` all see it. The trained weights stay in the checkpoint too,
because a resume continues training them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pipeline.train.checkpoint import unwrap


class WeightAverage:
    """The running average of ``model``'s parameters and buffers, kept as a second copy of the module."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self._bound = False
        self._avg: list[torch.Tensor] = []  # floats: averaged towards _src, pairwise
        self._src: list[torch.Tensor] = []
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # counters: copied

    def _bind(self, model: nn.Module) -> None:
        """Pair each averaged tensor with the trained one, once the model is on its device for good."""
        src = unwrap(model).state_dict(keep_vars=True)
        for key, avg in self.module.state_dict(keep_vars=True).items():
            if avg.is_floating_point():
                self._avg.append(avg)
                self._src.append(src[key])
            else:
                self._copies.append((avg, src[key]))
        self._bound = True

    def decay_at(self, updates: int) -> float:
        """The decay of update number ``updates`` (1-based)."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights (no host sync)."""
        if not self._bound:
            self._bind(model)
        self.updates += 1
        torch._foreach_lerp_(self._avg, self._src, 1.0 - self.decay_at(self.updates))
        for dst, value in self._copies:
            dst.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])


__all__ = ["WeightAverage"]
