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
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ANSI_COLOUR, UserError, first_line
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
    """Load ``state.pt`` from a checkpoint directory or file, tensors only (``weights_only=True``).

    A file that cannot be loaded so (empty, truncated, not a PyTorch file, one holding other objects)
    is one ``UserError`` line with the first line of the reason.
    """
    p = _state_path(path)
    try:
        if p.stat().st_size == 0:
            raise UserError(f"cannot read checkpoint {p}: empty file")
        with warnings.catch_warnings(record=True) as caught:  # torch's pickle-protocol warnings of foreign files
            warnings.simplefilter("always")
            state = torch.load(p, map_location=map_location, weights_only=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a file it cannot read
        raise UserError(f"cannot read checkpoint {p}: {_load_failure(exc)}") from None
    for w in caught:  # a file that loaded: its warnings as they would have been
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return state


def _load_failure(exc: BaseException) -> str:
    """The first line of why ``torch.load`` failed, without torch's advice to load with ``weights_only=False``
    (which runs whatever code the file holds)."""
    text = str(exc)
    if "weights_only" in text or "Weights only" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
        detail = next((line.strip() for line in detail.splitlines() if line.strip()), "")
        detail = ANSI_COLOUR.sub("", detail).split(". ", 1)[0].rstrip(".")
        if "weights_only" in detail:
            detail = ""
        return ("not a tensors-only PyTorch file, which is all a checkpoint is loaded as"
                + (f" ({detail})" if detail else ""))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if isinstance(exc, (OSError, RuntimeError)) and first:
        return first
    return f"not a PyTorch file ({type(exc).__name__}{': ' + first if first else ''})"


def load_meta(path: str | Path) -> dict[str, Any]:
    """``meta.json`` next to ``state.pt`` ({} when absent); one that is not a JSON object is a ``UserError``."""
    p = _state_path(path).parent / META_FILE
    if not p.is_file():
        return {}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, not UTF-8
        raise UserError(f"cannot read {p}: {first_line(exc)}") from None
    if not isinstance(meta, dict):
        raise UserError(f"cannot read {p}: a JSON object of the model's name, classes and input shape expected, "
                        f"not a JSON {_json_kind(meta)}; was it written by pipeline train?")
    return meta


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def result_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a ``state.pt`` offers as the run's result: the moving average where the run kept one
    (``train.ema_decay``, ``pipeline.train.ema``), else the trained weights."""
    ema = state.get("ema")
    return ema["model"] if ema else state["model"]


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved in a checkpoint; returns ``(model, meta)``.

    Weights that do not fit the model ``meta.json`` describes (another architecture, class count or
    input shape than ``state.pt`` holds) are one ``UserError`` naming the checkpoint.
    """
    from pipeline.train.models import build_model

    meta = load_meta(path)
    missing = [k for k in ("model", "num_classes", "in_channels", "image_size") if k not in meta]
    if missing:
        raise UserError(f"checkpoint {path} has no {META_FILE} with {', '.join(missing)}: "
                        "was it written by pipeline train?")
    described = (f"{meta['model']}, {meta['num_classes']} classes of "
                 f"{meta['in_channels']}×{meta['image_size']}² inputs")
    try:
        model = build_model(meta["model"], meta["num_classes"], meta["in_channels"], meta["image_size"],
                            meta.get("dropout", 0.0), meta.get("width"))
    except (TypeError, ValueError, RuntimeError) as exc:  # UserError too: an unknown model name
        raise UserError(f"checkpoint {path}: its {META_FILE} does not describe a model pipeline train builds "
                        f"({described}): {first_line(exc)}") from None
    state = load_state(path, map_location)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"checkpoint {path}: its {STATE_FILE} holds no model weights: "
                        "was it written by pipeline train?")
    try:
        model.load_state_dict(result_weights(state))
    except (RuntimeError, TypeError, KeyError) as exc:  # RuntimeError: missing keys, other shapes
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = (lines[1] if len(lines) > 1 else lines[0]) if lines else type(exc).__name__
        raise UserError(f"checkpoint {path}: the weights in its {STATE_FILE} do not fit the model its {META_FILE} "
                        f"describes ({described}): {reason}") from None
    return model, meta


__all__ = ["META_FILE", "STATE_FILE", "clear_stale_staging", "load_meta", "load_model", "load_state",
           "result_weights", "save_checkpoint", "staging_dir", "unwrap"]
