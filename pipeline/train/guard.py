"""Divergence guard: a job whose weights became NaN or inf ends before it checkpoints them.

A diverged run (a learning rate too high for the batch, an fp16 overflow in BatchNorm's running
statistics) otherwise trains on for days on weights that can never recover, and every checkpoint it
writes is worthless. Worse, ``run.checkpoints_to_keep`` then deletes the last good ones. So the loop
checks the weights where it already waits for the device (every ``train.log_every_steps``, beside the
step loss it reads there) and before every checkpoint; on the first non-finite value the job ends
without writing it: the run is FAILED in MLflow with the reason, the driver prints one line naming
the step and the newest checkpoint (from before the divergence), and Ray Train does not retry a job
that would only diverge again from the same state: the workers end their loop normally, and rank 0
leaves a ``DIVERGED`` record beside the checkpoints for the driver.

Parameters are identical on every rank after DDP's all-reduce, so every rank finds the same thing at
the same step without talking to the others. BatchNorm's running statistics are rank 0's business
(DDP broadcasts rank 0's buffers before every forward; the checkpoint holds rank 0's), so they are
checked on rank 0, before a checkpoint, where the ranks agree on the outcome anyway.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from pipeline.errors import UserError


class Diverged(UserError):
    """The weights became NaN or inf; raised by ``fit`` with the step and the newest good checkpoint."""


def nonfinite(model: nn.Module, *, buffers: bool = False) -> str | None:
    """The name of ``model``'s first parameter (and floating buffer, with ``buffers``) that holds NaN or
    inf, or None; one host sync."""
    tensors = [(name, p.detach()) for name, p in model.named_parameters()]
    if buffers:
        tensors += [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
    if not tensors:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if bool(finite.all()):  # host sync
        return None
    return tensors[int((~finite).nonzero()[0, 0])][0]


class DivergedInLoop(Exception):
    """Raised inside the worker loop on every rank at the same step; the loop ends the job cleanly on it."""

    def __init__(self, global_step: int, epoch: int, tensor: str) -> None:
        super().__init__(f"the weights became non-finite (NaN or inf) by step {global_step} "
                         f"(epoch {epoch + 1}; first: {tensor})")
        self.global_step = global_step
        self.epoch = epoch
        self.tensor = tensor


RECORD_FILE = "DIVERGED"  # beside the job's checkpoints: rank 0 writes it, the driver reads it when fit returns


def _record_path(storage_dir: str) -> tuple:
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_dir)  # a local directory or a URI, as the checkpoints
    return fs, f"{root.rstrip('/')}/{RECORD_FILE}"


def record_divergence(storage_dir: str, exc: DivergedInLoop) -> None:
    """Rank 0: leave what the driver says (Ray Train hands the driver only checkpointed reports)."""
    fs, path = _record_path(storage_dir)
    with fs.open_output_stream(path) as out:
        out.write(json.dumps({"global_step": exc.global_step, "epoch": exc.epoch, "tensor": exc.tensor}).encode())


def read_divergence(storage_dir: str) -> dict | None:
    """The record a diverged job left, or None."""
    fs, path = _record_path(storage_dir)
    try:
        with fs.open_input_stream(path) as f:
            record = json.loads(f.read())
    except (OSError, ValueError):  # none (FileNotFoundError is an OSError), or cut short
        return None
    return record if isinstance(record, dict) and "global_step" in record else None


def clear_divergence(storage_dir: str) -> None:
    """At a job's start: a record of an earlier attempt is not about this one."""
    fs, path = _record_path(storage_dir)
    try:
        fs.delete_file(path)
    except (OSError, ValueError):  # FileNotFoundError is an OSError
        pass


def diverged_message(run_name: str, record: dict, newest_step: int, newest_path: str | None = None) -> str:
    """The driver's one line for a job whose workers ended on ``DivergedInLoop``."""
    kept = (f"the newest checkpoint, step {newest_step}, is from before it"
            if newest_step >= 0 else "no checkpoint was written")
    # The same run.name would resume the optimizer and schedule as they were, and diverge again.
    again = (f"start a new run.name (--init-from {newest_path} starts it from that checkpoint's weights)"
             if newest_step >= 0 and newest_path else "start a new run.name")
    return (f"training diverged: the weights of {run_name} became non-finite (NaN or inf) by step "
            f"{record['global_step']} (epoch {int(record.get('epoch', 0)) + 1}; first: {record.get('tensor', '?')}); "
            f"the job stopped without checkpointing them, {kept}, and its MLflow run is FAILED. Lower optim.lr, "
            f"set optim.grad_clip or a longer optim.warmup_epochs, or train in bf16/fp32, and {again}")


__all__ = ["Diverged", "DivergedInLoop", "clear_divergence", "diverged_message", "nonfinite", "read_divergence",
           "record_divergence"]
