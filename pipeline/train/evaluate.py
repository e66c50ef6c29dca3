"""``pipeline evaluate``: top-1, top-5 and per-class accuracy of a trained model on a shard split.

Runs in this process (no Ray): a checkpoint directory or file written by
``pipeline train``, or an MLflow model URI (``runs:/<run id>/<model name>``,
``models:/<model id>``, ``models:/<name>/<version>``) whose shape comes from the shard set.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.train.config import MLFLOW_MODEL_SCHEMES


@dataclasses.dataclass
class EvalResult:
    """Accuracy figures over one split."""

    split: str
    samples: int
    loss: float
    top1: float
    top5: float
    classes: list[str]  # per-class labels: the class id, plus its human name when the shards record one
    confusion: Any  # numpy int64 [num_classes, num_classes], rows = true label

    def per_class(self) -> list[tuple[str, int, float]]:
        """(class, samples, accuracy) per label."""
        out = []
        for i, name in enumerate(self.classes):
            n = int(self.confusion[i].sum())
            out.append((name, n, float(self.confusion[i, i]) / n if n else float("nan")))
        return out

    def format(self) -> str:
        """Human-readable report: totals, then one line per class."""
        lines = [f"{self.split}: {self.samples} samples  top-1 {self.top1:.4f}  top-5 {self.top5:.4f}  "
                 f"loss {self.loss:.4f}", "per-class accuracy:"]
        width = max((len(c) for c in self.classes), default=5)
        for name, n, acc in self.per_class():
            lines.append(f"  {name:<{width}}  {acc:.4f}  ({n} samples)")
        return "\n".join(lines)


def load_for_eval(model_ref: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A model from a checkpoint path or an MLflow model URI, on the CPU.

    MLflow 3 loads a pytorch-flavor model as an exported ``GraphModule`` that refuses ``eval()``;
    a model ``pipeline train`` logged (named after ``model.name``) is rebuilt from its weights instead.
    """
    from pipeline.train.checkpoint import load_model, unwrap

    if model_ref.startswith(MLFLOW_MODEL_SCHEMES):
        import mlflow.pytorch

        from pipeline.train.models import MODEL_NAMES, build_model
        from pipeline.train.tracking import logged_model_name, resolve_tracking_uri, runs_uri_hint

        uri = resolve_tracking_uri(None)  # $MLFLOW_TRACKING_URI or ./mlruns.db, as for train
        mlflow.set_tracking_uri(uri)
        try:
            loaded = unwrap(mlflow.pytorch.load_model(model_ref, map_location="cpu"))
        except Exception as exc:  # MLflow raises many types for a bad URI; all mean "cannot load it"
            raise UserError(f"cannot load MLflow model {model_ref}: {str(exc).splitlines()[0]}"
                            f"{runs_uri_hint(model_ref)}") from None
        name = logged_model_name(mlflow.MlflowClient(uri), model_ref)
        if name not in MODEL_NAMES:
            return loaded  # a model from elsewhere: as MLflow gives it
        model = build_model(name, num_classes, in_channels, image_size)
        try:
            model.load_state_dict(loaded.state_dict())
        except RuntimeError as exc:
            raise UserError(f"--model {model_ref} ({name}) does not fit {num_classes} classes of "
                            f"{in_channels}×{image_size}² inputs: {str(exc).splitlines()[-1].strip()}") from None
        return model
    if not Path(model_ref).exists():
        raise UserError(f"--model {model_ref}: no such checkpoint (a directory with state.pt, the file, or runs:/…)")
    model, meta = load_model(model_ref)
    if meta["num_classes"] != num_classes or (meta["in_channels"], meta["image_size"]) != (in_channels, image_size):
        raise UserError(
            f"--model {model_ref} expects {meta['num_classes']} classes of {meta['in_channels']}×{meta['image_size']}"
            f"² inputs, the shards give {num_classes} classes of {in_channels}×{image_size}²"
        )
    return model


def _trained_preset(model_ref: str) -> str | None:
    """The preset recorded in a checkpoint's meta, or None (MLflow URIs, checkpoints from before it was recorded)."""
    from pipeline.train.checkpoint import load_meta

    if model_ref.startswith(MLFLOW_MODEL_SCHEMES) or not Path(model_ref).exists():
        return None
    return load_meta(model_ref).get("preset")


def evaluate_model(model_ref: str, shards: str | Path, split: str = "val", *, batch_size: int = 256,
                   backend: str = "auto", device: str = "auto", precision: str = "fp32") -> EvalResult:
    """Evaluate ``model_ref`` on ``shards``/``split`` in this process."""
    from pipeline.data import make_loader
    from pipeline.data.presets import get_preset
    from pipeline.train.loop import evaluate

    if split not in ("train", "val"):
        raise UserError(f"--split {split!r}: allowed values: train, val")
    # The model sees its inputs through the preset it was trained with (``data.preset`` may have
    # overridden the shard set's); MLflow models carry no meta and use the shard set's preset.
    preset = _trained_preset(model_ref)
    loader = make_loader(shards, split, batch_size=batch_size, backend=backend, device=device, preset=preset)
    channels, size, _ = get_preset(loader.preset).output_shape()
    model = load_for_eval(model_ref, loader.num_classes, channels, size)
    dev = torch.device("cuda" if torch.cuda.is_available() and device != "cpu" else "cpu")
    model = model.to(dev)
    if precision == "fp32":
        autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
        in_dtype = torch.float32
    else:
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        in_dtype = None
    out = evaluate(model, loader, dev, autocast, loader.num_classes, in_dtype, torch.contiguous_format)
    return EvalResult(split=split, samples=out["val_samples"], loss=out["val_loss"], top1=out["val_top1"],
                      top5=out["val_top5"], classes=list(loader.class_labels), confusion=out["confusion"].numpy())


__all__ = ["EvalResult", "evaluate_model", "load_for_eval"]
