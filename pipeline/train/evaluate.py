"""``pipeline evaluate``: top-1, top-5 and per-class accuracy of a trained model on a shard split.

Runs in this process (no Ray): a checkpoint directory or file written by
``pipeline train``, or an MLflow model URI (``runs:/<run id>/<model name>``,
``models:/<model id>``, ``models:/<name>/<version>``) whose shape comes from the shard set.
``RunLog`` adds the figures to the MLflow run that trained the model, under a name of
their own (``--log-as test``: ``test_top1``, ``test_top5``, ``test_loss``), so a test split read
once after training sits beside the run's per-epoch validation figures in the MLflow UI.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError, first_line
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
    precision: str = "fp32"  # what the forward passes ran in

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
                 f"loss {self.loss:.4f}  ({self.precision})", "per-class accuracy:"]
        width = max((len(c) for c in self.classes), default=5)
        for name, n, acc in self.per_class():
            lines.append(f"  {name:<{width}}  {acc:.4f}  ({n} samples)")
        return "\n".join(lines)


def load_for_eval(model_ref: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A model from a checkpoint path or an MLflow model URI, on the CPU.

    MLflow 3 loads a pytorch-flavor model as an exported ``GraphModule`` that refuses ``eval()``;
    a model ``pipeline train`` logged (named after ``model.name``) is rebuilt from its weights instead.
    """
    from pipeline.train.checkpoint import load_model

    if model_ref.startswith(MLFLOW_MODEL_SCHEMES):
        import mlflow

        from pipeline.train.models import MODEL_NAMES, build_model, width_of
        from pipeline.train.tracking import (load_mlflow_model, logged_model_name, missing_sqlite_store,
                                             resolve_tracking_uri)

        uri = resolve_tracking_uri(None)  # $MLFLOW_TRACKING_URI or ./mlruns.db, as for train
        if missing_sqlite_store(uri):  # opening it would create an empty store (and its directory)
            raise UserError(f"--model {model_ref}: no MLflow store at {uri}; set MLFLOW_TRACKING_URI to the one "
                            "the model was logged to")
        loaded = load_mlflow_model(model_ref, uri)
        name = logged_model_name(mlflow.MlflowClient(uri), model_ref)
        if name not in MODEL_NAMES:
            return loaded  # a model from elsewhere: as MLflow gives it
        state = loaded.state_dict()
        try:
            model = build_model(name, num_classes, in_channels, image_size, width=width_of(name, state))
            model.load_state_dict(state)
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


def _trained_meta(model_ref: str) -> dict[str, Any]:
    """A checkpoint's meta ({} for MLflow URIs): the preset and precision it was trained with, where recorded."""
    from pipeline.train.checkpoint import load_meta

    if model_ref.startswith(MLFLOW_MODEL_SCHEMES) or not Path(model_ref).exists():
        return {}
    return load_meta(model_ref)


def default_precision(trained: str | None, device: torch.device) -> str:
    """What ``evaluate`` runs in unless told: the precision the model was trained in (a checkpoint records
    it; ``auto`` resolved), so the figures match the job's own validation; fp32 where none is recorded
    and for fp16 off CUDA."""
    if trained in ("bf16", "fp32") or (trained == "fp16" and device.type == "cuda"):
        return trained
    return "fp32"


def evaluate_model(model_ref: str, shards: str | Path, split: str = "val", *, batch_size: int = 256,
                   backend: str = "auto", device: str = "auto", precision: str | None = None) -> EvalResult:
    """Evaluate ``model_ref`` on ``shards``/``split`` in this process (``precision`` None: ``default_precision``)."""
    from pipeline.data import make_loader
    from pipeline.data.presets import get_preset
    from pipeline.train.loop import evaluate
    from pipeline.train.step import precision_context, resolve_precision

    if split not in ("train", "val"):
        raise UserError(f"--split {split!r}: allowed values: train, val")
    # The model sees its inputs through the preset it was trained with (``data.preset`` may have
    # overridden the shard set's); MLflow models carry no meta and use the shard set's preset.
    trained = _trained_meta(model_ref)
    preset = trained.get("preset")
    loader = make_loader(shards, split, batch_size=batch_size, backend=backend, device=device, preset=preset,
                         train=False)  # the train split too: in order, no augmentation, each sample once
    channels, size, _ = get_preset(loader.preset).output_shape()
    model = load_for_eval(model_ref, loader.num_classes, channels, size)
    dev = torch.device("cuda" if torch.cuda.is_available() and device != "cpu" else "cpu")
    model = model.to(dev)
    precision = resolve_precision(precision or default_precision(trained.get("precision"), dev), dev)
    autocast, _, in_dtype = precision_context(precision, dev)
    out = evaluate(model, loader, dev, autocast, loader.num_classes, in_dtype, torch.contiguous_format)
    return EvalResult(split=split, samples=out["val_samples"], loss=out["val_loss"], top1=out["val_top1"],
                      top5=out["val_top5"], classes=list(loader.class_labels), confusion=out["confusion"].numpy(),
                      precision=precision)


_LOG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")


def training_run_id(client, model_ref: str) -> str:
    """The MLflow run that trained ``model_ref``: an MLflow model's source run, or the job run of a checkpoint
    (the run tagged with the job's directory, the checkpoint's parent, in any experiment of the store)."""
    from pipeline.train.tracking_queue import find_run

    if model_ref.startswith(MLFLOW_MODEL_SCHEMES):
        from mlflow.models import get_model_info

        try:
            run_id = get_model_info(model_ref).run_id
        except Exception as exc:  # MLflow raises many types for a bad URI; all mean "not there"
            raise UserError(f"cannot read MLflow model {model_ref}: {first_line(exc)}") from None
        if not run_id:
            raise UserError(f"MLflow model {model_ref} names no run that logged it: nowhere to log its evaluation")
        return run_id
    path = Path(model_ref).resolve()
    job_dir = path.parent if path.is_dir() else path.parent.parent  # <storage>/<run.name>/checkpoint_*/[state.pt]
    for experiment in client.search_experiments():
        run = find_run(client, experiment.experiment_id, str(job_dir))
        if run is not None:
            return run.info.run_id
    raise UserError(f"no MLflow run of the job {job_dir} in this store: set MLFLOW_TRACKING_URI to the one the "
                    "job logged to")


class RunLog:
    """``--log-as NAME``: an evaluation's figures in the MLflow run that trained the model.

    Built before the evaluation runs, so a bad name or a run that cannot be found is one error line
    before any work. ``log`` writes ``<name>_top1``, ``<name>_top5``, ``<name>_loss``, ``<name>_samples``
    (step = the checkpoint's epoch), the per-class table as ``eval/<name>_per_class_accuracy.csv`` and
    what was evaluated as the tag ``pipeline.eval.<name>``.
    """

    def __init__(self, model_ref: str, name: str, tracking_uri: str | None = None) -> None:
        import mlflow

        from pipeline.train.runs import check_store
        from pipeline.train.tracking import resolve_tracking_uri

        if not _LOG_NAME.fullmatch(name):
            raise UserError(f"--log-as {name!r}: a letter, then letters, digits or _ (at most 40), e.g. test")
        self.model_ref, self.name = model_ref, name
        if not model_ref.startswith(MLFLOW_MODEL_SCHEMES):
            from pipeline.train.checkpoint import load_meta

            load_meta(model_ref)  # a path with no checkpoint is about --model, not about the store
        uri = resolve_tracking_uri(tracking_uri)
        try:  # a store that is missing, not MLflow's or not answering: one line, before the work
            check_store(uri, hint="set MLFLOW_TRACKING_URI to the one the job logged to")
        except UserError as exc:
            raise UserError(f"--log-as: {exc}") from None
        self.client = mlflow.MlflowClient(uri)
        self.run_id = training_run_id(self.client, model_ref)

    def log(self, res: EvalResult, shards: str | Path) -> None:
        from mlflow.entities import Metric, RunTag

        from pipeline.train.tracking import per_class_table

        step = 0
        if not self.model_ref.startswith(MLFLOW_MODEL_SCHEMES):
            from pipeline.train.checkpoint import load_meta

            step = int(load_meta(self.model_ref).get("epoch", 0))
        now, name = int(time.time() * 1000), self.name
        figures = {"top1": res.top1, "top5": res.top5, "loss": res.loss, "samples": float(res.samples)}
        what = f"{res.split} split of {Path(shards).resolve()}, model {self.model_ref}"
        self.client.log_batch(self.run_id, metrics=[Metric(f"{name}_{k}", float(v), now, step)
                                                    for k, v in figures.items()],
                              tags=[RunTag(f"pipeline.eval.{name}", what[:5000])])
        self.client.log_text(self.run_id, per_class_table(res.classes, res.confusion),
                             f"eval/{name}_per_class_accuracy.csv")


__all__ = ["EvalResult", "RunLog", "default_precision", "evaluate_model", "load_for_eval", "training_run_id"]
