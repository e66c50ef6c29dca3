"""Checkpoint layout: a directory holding ``state.pt`` (tensors and plain dicts) and ``meta.json``.

``state.pt`` loads with ``torch.load(weights_only=True)``: model (and its weight average), optimizer,
GradScaler and schedule state, epoch and global step, the best validation score
so far. ``meta.json`` says what the model is (architecture, classes, input
shape) so ``pipeline evaluate`` and ``--init-from`` can rebuild it without the
training config. The same directory is what Ray Train persists and what MLflow
stores as the best checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.fileio import write_atomic

STATE_FILE = "state.pt"
META_FILE = "meta.json"
STAGING_PREFIX = "pipeline-ckpt-"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(directory: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, dicts, numbers) and ``meta`` (JSON) into ``directory``, atomically per file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / STATE_FILE, lambda f: torch.save(state, f))
    write_atomic(directory / META_FILE, lambda f: f.write(json.dumps(meta, indent=2, sort_keys=True).encode()))
    return directory


def staging_dir() -> str:
    """A new local directory for one checkpoint before Ray Train uploads it, named after this process."""
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-")


def clear_stale_staging(root: str | Path | None = None) -> list[str]:
    """Remove staging directories whose process is gone (killed mid-checkpoint); returns their names.

    A worker killed between writing its part and removing it leaves a whole checkpoint in the
    node's temp directory, one more each fault; those of live processes (other jobs) stay.
    """
    removed = []
    for d in Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = d.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not d.is_dir() or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    return sorted(removed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _state_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise UserError(f"no checkpoint at {path} (expected a checkpoint directory with {STATE_FILE}, or the file)")
    return path


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt`` from a checkpoint directory or file, tensors only (``weights_only=True``)."""
    p = _state_path(path)
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"cannot read checkpoint {p}: {exc}") from None


def load_meta(path: str | Path) -> dict[str, Any]:
    """``meta.json`` next to ``state.pt`` ({} when absent)."""
    p = _state_path(path).parent / META_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {p}: {exc}") from None


def result_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a ``state.pt`` offers as the run's result: the moving average where the run kept one
    (``train.ema_decay``, ``pipeline.train.ema``), else the trained weights."""
    ema = state.get("ema")
    return ema["model"] if ema else state["model"]


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved in a checkpoint; returns ``(model, meta)``."""
    from pipeline.train.models import build_model

    meta = load_meta(path)
    missing = [k for k in ("model", "num_classes", "in_channels", "image_size") if k not in meta]
    if missing:
        raise UserError(f"checkpoint {path} has no {META_FILE} with {', '.join(missing)}: "
                        "was it written by pipeline train?")
    model = build_model(meta["model"], meta["num_classes"], meta["in_channels"], meta["image_size"],
                        meta.get("dropout", 0.0), meta.get("width"))
    model.load_state_dict(result_weights(load_state(path, map_location)))
    return model, meta


__all__ = ["META_FILE", "STATE_FILE", "clear_stale_staging", "load_meta", "load_model", "load_state",
           "result_weights", "save_checkpoint", "staging_dir", "unwrap"]
