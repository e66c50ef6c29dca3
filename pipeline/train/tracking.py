"""MLflow tracking from the rank-0 worker: one MLflow run per training job, reused on restart.

A job is identified by its run key (``<storage path>/<run name>``), stored as the
tag ``pipeline.run_key``. When a job restarts (worker failure, or the same job
started again), rank 0 finds its run by that tag and continues it. Metric
logging is idempotent per step: epochs and global steps already in the run's
history are not logged again, so an epoch redone after a crash does not appear
twice.

Metric names (what outside scripts read): ``train_loss``, ``train_images_per_s``,
``data_wait_frac``, ``val_loss``, ``val_top1``, ``val_top5`` (fractions 0..1),
``lr``, ``epoch_time_s``, all at ``step`` = epoch (1-based); and every N steps
``step_train_loss``, ``step_lr``, ``step_images_per_s`` at the global step.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from pipeline.config import flatten

RUN_KEY_TAG = "pipeline.run_key"
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
EPOCH_METRIC = "val_loss"  # every epoch logs it; its history says which epochs are done
STEP_METRIC = "step_train_loss"


def resolve_tracking_uri(configured: str | None, cwd: Path | None = None) -> str:
    """``tracking.tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///mlruns.db``, local paths made absolute.

    Ray Train workers run in their own working directory, so a relative SQLite
    path must be pinned to the directory the user launched from.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    cwd = cwd or Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((cwd / uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a plain directory: MLflow's file store
        return str((cwd / uri).resolve())
    return uri


def default_artifact_location(tracking_uri: str, configured: str | None, cwd: Path | None = None) -> str | None:
    """Artifact root for new experiments on a local SQLite store: ``./mlartifacts`` next to the database.

    That is where ``mlflow ui --backend-store-uri sqlite:///mlruns.db`` looks. A
    tracking server decides its own artifact root, so ``None`` there.
    """
    if configured:
        return configured if "://" in configured else (cwd or Path.cwd()).joinpath(configured).resolve().as_uri()
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).parent.joinpath(DEFAULT_ARTIFACT_DIR).as_uri()
    return None


def ui_hint(tracking_uri: str) -> str:
    """The command that opens the runs of ``tracking_uri`` in a browser."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        rel = os.path.relpath(db) if db.is_absolute() else str(db)
        shown = f"sqlite:///{rel}" if not rel.startswith("..") else tracking_uri
        return f"mlflow ui --backend-store-uri {shown}   (serves http://127.0.0.1:5000)"
    return f"mlflow ui --backend-store-uri {tracking_uri}   (serves http://127.0.0.1:5000)"


class Tracker:
    """MLflow logging for one job. Create it on rank 0 only; other ranks use ``NullTracker``."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        self.client = mlflow.MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException:
                # Another job created it between our lookup and create.
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            self.experiment_id = exp.experiment_id
        self.run_id: str | None = None
        self.last_epoch = 0
        self.last_step = 0
        self.resumed = False

    def start(self, run_key: str, run_name: str, config: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        """Find the job's run by ``run_key`` or create it; log params not yet in the run. Returns the run id."""
        run = find_run(self.client, self.experiment_id, run_key)
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags={RUN_KEY_TAG: run_key, **(tags or {})})
        else:
            self.resumed = True
            self.client.update_run(run.info.run_id, status="RUNNING")
            resumes = int(run.data.tags.get("pipeline.resumes", "0")) + 1
            self.client.set_tag(run.info.run_id, "pipeline.resumes", str(resumes))
        self.run_id = run.info.run_id
        self.last_epoch = _last_step(self.client, self.run_id, EPOCH_METRIC)
        self.last_step = _last_step(self.client, self.run_id, STEP_METRIC)
        self._log_params(run, flatten(config))
        return self.run_id

    def _log_params(self, run, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = run.data.params
        fresh = [Param(k, _param_str(v)) for k, v in params.items() if k not in existing]
        # MLflow params are immutable; a restarted job with, say, more epochs records the change as a tag.
        changed = [f"{k}: {existing[k]} -> {_param_str(v)}" for k, v in params.items()
                   if k in existing and existing[k] != _param_str(v)]
        for i in range(0, len(fresh), 100):  # the store's batch limit
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])
        if changed:
            self.client.set_tag(self.run_id, f"pipeline.changed_at_epoch_{self.last_epoch}", "; ".join(changed)[:5000])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Log one epoch's metrics at ``step=epoch``, unless that epoch is already in the run."""
        if epoch <= self.last_epoch:
            return False
        self._log(metrics, epoch)
        self.last_epoch = epoch
        return True

    def log_step(self, step: int, metrics: dict[str, float]) -> bool:
        """Log step metrics at the global step, unless that step is already in the run."""
        if step <= self.last_step:
            return False
        self._log(metrics, step)
        self.last_step = step
        return True

    def _log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_model(self, model, input_shape: tuple[int, ...], name: str = "model") -> None:
        """Log the final model with ``mlflow.pytorch.log_model`` (loads back with ``mlflow.pytorch.load_model``).

        ``input_shape`` is one image (C, H, W). MLflow 3 stores the model as a
        ``torch.export`` program traced on a 2-image example, so loading needs no
        pickle and the batch dimension stays dynamic.
        """
        import inspect

        import mlflow.pytorch
        import numpy as np

        example = np.zeros((2, *input_shape), dtype=np.float32)
        with self._mlflow.start_run(run_id=self.run_id):
            # MLflow 3 names the model with ``name=``; MLflow 2 used ``artifact_path=``.
            key = "name" if "name" in inspect.signature(mlflow.pytorch.log_model).parameters else "artifact_path"
            mlflow.pytorch.log_model(model, **{key: name}, input_example=example,
                                     pip_requirements=_pip_requirements())
            # start_run(run_id=…) on exit marks the run FINISHED; the job decides that itself.
        self.client.update_run(self.run_id, status="RUNNING")

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED`` (or ``FAILED``/``KILLED``)."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


class NullTracker:
    """What ranks other than 0 (and ``tracking.enabled: false``) log: nothing."""

    run_id = None
    last_epoch = 0
    last_step = 0
    resumed = False

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def find_run(client, experiment_id: str, run_key: str):
    """The run tagged with ``run_key`` in ``experiment_id``, or None (the oldest if, somehow, several)."""
    escaped = run_key.replace("\\", "\\\\").replace("'", "\\'")
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{escaped}'",
                              order_by=["attributes.start_time ASC"], max_results=5)
    return runs[0] if runs else None


def find_job_run(tracking_uri: str, experiment: str, run_key: str):
    """The MLflow run of a job, for the launcher's summary (None when tracking was off or never started)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return None if exp is None else find_run(client, exp.experiment_id, run_key)


def _last_step(client, run_id: str, key: str) -> int:
    history = client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=0)


def _param_str(v: Any) -> str:
    return str(v)[:6000]


def _pip_requirements() -> list[str]:
    # Skip MLflow's requirement inference: it imports and scans the whole environment (slow on workers).
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}"]


def per_class_table(classes: list[str], confusion) -> str:
    """Per-class accuracy as CSV text: class, label, samples, correct, accuracy."""
    buf = io.StringIO()
    buf.write("label,class,samples,correct,accuracy\n")
    for i, name in enumerate(classes):
        total = int(confusion[i].sum())
        correct = int(confusion[i, i])
        acc = correct / total if total else float("nan")
        safe = '"' + name.replace('"', '""') + '"'
        buf.write(f"{i},{safe},{total},{correct},{acc:.4f}\n")
    return buf.getvalue()


def confusion_figure(classes: list[str], confusion):
    """Row-normalised confusion matrix as a matplotlib figure (Agg backend; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = min(4 + 0.5 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 50:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center",
                            color="white" if norm[i, j] > 0.5 else "black", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (rows normalised)")
    fig.tight_layout()
    return fig


__all__ = [
    "DEFAULT_TRACKING_URI", "NullTracker", "RUN_KEY_TAG", "Tracker", "confusion_figure", "default_artifact_location",
    "find_job_run", "find_run", "per_class_table", "resolve_tracking_uri", "ui_hint",
]
