"""MLflow tracking from the rank-0 worker: one MLflow run per training job, reused on restart.

A job is identified by its run key (``<storage path>/<run name>``), stored as the
tag ``pipeline.run_key``. When a job restarts (worker failure, or the same job
started again), rank 0 finds its run by that tag and continues it. Metric
logging is idempotent per step: epochs and global steps already in the run's
history are not logged again, so an epoch redone after a crash does not appear
twice. Nothing here waits on the tracking server: every record goes through
``tracking_queue`` (a bounded queue, a spool under the job's storage directory,
a sender thread with backoff), so a server outage never stalls training.

Metric names (what outside scripts read): ``train_loss``, ``train_images_per_s``,
``data_wait_frac``, ``val_loss``, ``val_top1``, ``val_top5`` (fractions 0..1),
``lr``, ``epoch_time_s``, all at ``step`` = epoch (1-based; the ``val_*`` ones at the epochs that
validate, ``train.val_every_epochs``, the last always); and every N steps
``step_train_loss``, ``step_lr``, ``step_images_per_s`` at the global step.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import flatten
from pipeline.errors import UserError, first_line
from pipeline.fileio import is_uri
from pipeline.train.tracking_queue import (EPOCH_METRIC, RECORDS, RUN_KEY_TAG, SPOOL_DIRNAME, STEP_METRIC, MlflowSink,
                                           Spool, TrackingQueue, epoch_family, find_run, http_env_defaults,
                                           read_job, write_job)

if TYPE_CHECKING:
    from torch import nn

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"


def missing_sqlite_store(uri: str) -> str | None:
    """The file of a ``sqlite:///`` store that does not exist (opening it would create an empty one), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return None if Path(path).is_file() else path


SQLITE_HEADER = b"SQLite format 3\0"


def sqlite_header(path: str) -> bytes:
    """The first bytes of ``path``, as many as an SQLite database's header (``OSError`` when it cannot be read)."""
    with open(path, "rb") as f:
        return f.read(len(SQLITE_HEADER))


def check_tracking_uri(uri: str) -> None:
    """One line for a tracking URI no job can log to, before anything starts: an ``sqlite:///`` path that is a
    directory or a file of something else (MLflow would retry for minutes, then raise), or a scheme MLflow does
    not know (the workers would keep every record back as refused, and the job would end well)."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if os.path.isdir(path):
            raise UserError(f"tracking URI {uri}: {path} is a directory; an SQLite store is a file, "
                            "e.g. sqlite:///mlruns.db")
        try:
            header = sqlite_header(path)
        except FileNotFoundError:
            return  # a new store: made before the job starts
        except OSError as exc:
            raise UserError(f"tracking URI {uri}: cannot read {path}: {exc.strerror or exc}") from None
        if header and header != SQLITE_HEADER:
            raise UserError(f"tracking URI {uri}: {path} is not an SQLite database; give the store's own file "
                            "or a new one, e.g. sqlite:///mlruns.db")
        return
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme and scheme.split("+", 1)[0] not in _KNOWN_STORES:  # a store plugin's scheme, or a typo
        import mlflow

        try:
            mlflow.MlflowClient(uri)  # picks the store for the scheme: no request is made
        except Exception:  # noqa: BLE001 - MLflow's "unsupported URI" errors have several types
            raise UserError(f"tracking URI {uri}: MLflow has no store for {scheme}://; use "
                            "sqlite:///FILE, http(s)://HOST:PORT or a directory") from None


# Schemes MLflow's own stores serve (a database's with its driver, e.g. postgresql+psycopg2): not opened to
# check, since a database store connects and migrates its schema when it is made.
_KNOWN_STORES = frozenset({"http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                           "databricks-uc", "uc"})


def resolve_tracking_uri(configured: str | None, cwd: Path | None = None) -> str:
    """``tracking.tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///mlruns.db``, local paths made absolute.

    Ray Train workers run in their own working directory, so a relative SQLite
    path must be pinned to the directory the user launched from.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    cwd = cwd or Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((cwd / uri[len("sqlite:///"):]).resolve())
    if not is_uri(uri):  # a plain directory: MLflow's file store
        return str((cwd / uri).resolve())
    return uri


def runs_uri_hint(src: str, name: str = "<model.name>") -> str:
    """For a ``runs:/`` URI that named no model: where ``pipeline train`` logs its model ("" for other URIs)."""
    return (f"; pipeline train logs its model under the model's name: runs:/<run id>/{name}"
            if src.startswith("runs:/") else "")


def logged_model_name(client, src: str) -> str | None:
    """The name of the logged model an MLflow model URI leads to (runs:/ID/NAME, models:/MODEL_ID,
    models:/NAME/VERSION); None where it cannot be told. ``pipeline train`` names its model ``model.name``."""
    parts = src.split(":/", 1)[1].strip("/").split("/")
    try:
        if src.startswith("runs:/") and len(parts) == 2:
            return parts[1]
        if src.startswith("models:/") and len(parts) == 1 and parts[0].startswith("m-"):
            return client.get_logged_model(parts[0]).name
        if src.startswith("models:/") and len(parts) == 2:
            version = client.get_model_version(*parts)
            return client.get_logged_model(version.model_id).name if version.model_id else None
    except Exception:  # noqa: BLE001 - not found or not told: the caller goes on without it
        return None
    return None


def load_mlflow_model(src: str, tracking_uri: str) -> nn.Module:
    """The PyTorch module of MLflow model ``src`` in the store at ``tracking_uri``, on the CPU and out of any
    DDP or compile wrapper; a model that cannot be loaded is one ``UserError``."""
    import mlflow.pytorch

    from pipeline.train.checkpoint import unwrap

    mlflow.set_tracking_uri(tracking_uri)
    try:
        return unwrap(mlflow.pytorch.load_model(src, map_location="cpu"))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI; all mean "cannot load it"
        raise UserError(f"cannot load MLflow model {src}: {first_line(exc)}{runs_uri_hint(src)}") from None


def default_artifact_location(tracking_uri: str, configured: str | None, cwd: Path | None = None) -> str | None:
    """Artifact root for new experiments on a local SQLite store: ``./mlartifacts`` next to the database.

    That is where ``mlflow ui --backend-store-uri sqlite:///mlruns.db`` looks. A
    tracking server decides its own artifact root, so ``None`` there.
    """
    if configured:
        return configured if is_uri(configured) else (cwd or Path.cwd()).joinpath(configured).resolve().as_uri()
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
    """MLflow logging for one job through a non-blocking queue. Create it on rank 0 only; others use ``NullTracker``.

    No method waits on the tracking server: records go to a bounded queue and a
    spool under the job's storage directory (``tracking_queue``), and a background
    thread sends them. ``start`` with the server down returns at once; the run is
    found or created when the server answers. ``end`` waits at most
    ``flush_timeout_s`` for the backlog; what is left is sent at the next start of
    the same job or by ``pipeline tracking sync``.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None,
                 flush_timeout_s: float = 30.0) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.flush_timeout_s = flush_timeout_s
        self.spool_dir: Path | None = None
        self.queue: TrackingQueue | None = None
        self.last_epoch = 0
        self.last_step = 0
        self.resumed = False
        self.final_metrics: dict[str, float] = {}  # the last epoch's, as the registered version's tags
        self._source_tags: dict[str, str] = {}
        self._files = 0

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once the server has answered (None before)."""
        return read_job(self.spool_dir).get("run_id") if self.spool_dir else None

    def start(self, run_key: str, run_name: str, config: dict[str, Any], tags: dict[str, str] | None = None,
              datasets: list[dict[str, Any]] | None = None) -> None:
        """Queue the job's run (found by ``run_key`` or created), its params, tags and dataset inputs.

        Unsent records of an earlier start of this job are sent first, in order.
        """
        http_env_defaults()
        self.spool_dir = spool_dir_for(run_key)
        spool = Spool(self.spool_dir)
        self._resume_from(spool)
        job = read_job(self.spool_dir)
        write_job(self.spool_dir, {
            "tracking_uri": self.tracking_uri, "experiment": self.experiment, "run_key": run_key,
            "run_name": run_name, "artifact_location": self.artifact_location, "tags": dict(tags or {}),
            "start_ms": job.get("start_ms", int(time.time() * 1000)),
            # The run found before, unless the job now tracks to another server.
            **({"run_id": job["run_id"]} if job.get("run_id") and job.get("tracking_uri") == self.tracking_uri
               else {}),
        })
        self.queue = TrackingQueue(spool, MlflowSink(self.spool_dir).send)
        self._source_tags = {k: str(v) for k, v in (tags or {}).items() if k.startswith("mlflow.source.")}
        self._put({"t": "begin"})
        self._put({"t": "tags", "tags": {k: str(v) for k, v in (tags or {}).items()}})
        self._put({"t": "params", "epoch": self.last_epoch,
                   "p": {k: _param_str(v) for k, v in flatten(config).items()}})
        if datasets:
            self._put({"t": "inputs", "datasets": datasets})

    def _resume_from(self, spool: Spool) -> None:
        """Epochs and steps already logged by earlier starts of this job (so a redone epoch is not logged twice)."""
        for rec in spool.records():
            self.resumed = True
            family = epoch_family(rec)
            if family == EPOCH_METRIC:
                self.last_epoch = max(self.last_epoch, rec["step"])
            elif family == STEP_METRIC:
                self.last_step = max(self.last_step, rec["step"])
            elif rec.get("path", "").startswith("files/"):
                self._files = max(self._files, int(rec["path"].split("/")[1]) + 1)

    def _put(self, record: dict[str, Any]) -> None:
        if self.queue is not None:
            self.queue.put(record)

    def backlog(self) -> int:
        """Records not yet acknowledged by the tracking server."""
        return self.queue.backlog() if self.queue is not None else 0

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Log one epoch's metrics at ``step=epoch``, unless that epoch is already in the run."""
        if epoch <= self.last_epoch:
            return False
        self._put({"t": "metrics", "family": EPOCH_METRIC, "step": epoch, "m": _floats(metrics)})
        self.last_epoch = epoch
        self.final_metrics = _floats(metrics)
        return True

    def log_step(self, step: int, metrics: dict[str, float]) -> bool:
        """Log step metrics at the global step, unless that step is already in the run."""
        if step <= self.last_step:
            return False
        self._put({"t": "metrics", "family": STEP_METRIC, "step": step, "m": _floats(metrics)})
        self.last_step = step
        return True

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Other metrics at ``step`` (no idempotence by step)."""
        self._put({"t": "metrics", "step": step, "m": _floats(metrics)})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put({"t": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def _file(self, artifact_file: str) -> tuple[Path, str]:
        """A fresh spool path for an artifact file; returns it and its path relative to the spool."""
        rel = f"files/{self._files}/{Path(artifact_file).name}"
        self._files += 1
        path = self.spool_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, rel

    def _put_file(self, rel: str, artifact_file: str) -> None:
        dest = str(Path(artifact_file).parent)
        self._put({"t": "artifact", "path": rel, "dest": None if dest == "." else dest})

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.spool_dir is None:
            return
        path, rel = self._file(artifact_file)
        path.write_text(text, encoding="utf-8")
        self._put_file(rel, artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        import json

        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            self.log_text(yaml.safe_dump(data, sort_keys=False), artifact_file)
        else:
            self.log_text(json.dumps(data, indent=2), artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        """Queue the upload of ``local_dir``: copied into the spool first unless it lies in the job's directory."""
        import shutil

        if self.spool_dir is None:
            return
        local = Path(local_dir).resolve()
        if local.is_relative_to(self.spool_dir.parent.resolve()):  # kept there (best checkpoint): no copy
            self._put({"t": "artifact", "path": str(local), "dest": artifact_path})
            return
        path, rel = self._file(artifact_path)
        shutil.copytree(local, path)  # a temporary directory may be gone before the upload
        self._put({"t": "artifact", "path": rel, "dest": artifact_path})

    def log_figure(self, figure, artifact_file: str) -> None:
        if self.spool_dir is None:
            return
        path, rel = self._file(artifact_file)
        figure.savefig(path)
        self._put_file(rel, artifact_file)

    def log_model(self, model, input_shape: tuple[int, ...], name: str = "model", classes: list[str] | None = None,
                  register: str | None = None, tags: dict[str, str] | None = None,
                  version_tags: dict[str, str] | None = None, step: int = 0) -> None:
        """Save the final model (MLflow pytorch flavor) into the spool and queue it as the run's logged model.

        ``input_shape`` is one image (C, H, W); the signature says float32
        ``(-1, C, H, W)`` in, one logit per class out. With ``register``, the
        model becomes a new version of that registered model, ``version_tags``
        (default: the last epoch's metrics) on it. The model carries the run's
        source tags, so MLflow shows the job's command, not the Ray worker's script. Loads back with
        ``mlflow.pytorch.load_model("models:/<model id>")`` or ``models:/NAME/VERSION``.
        """
        import mlflow.pytorch
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        if self.spool_dir is None:
            return
        path, rel = self._file(name)
        n_out = len(classes) if classes else -1
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape), "images")]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_out), "logits")]))
        example = np.zeros((2, *input_shape), dtype=np.float32)
        metadata = {"classes": list(classes)} if classes else None
        with warnings.catch_warnings():
            # torch's archive writer warns that CPU weights are "not on CPU" when it groups the state dict.
            warnings.filterwarnings("ignore", message="No complete tensor found in the group", category=UserWarning)
            mlflow.pytorch.save_model(model, str(path), signature=signature, input_example=example,
                                      pip_requirements=_pip_requirements(), metadata=metadata)
        version_tags = self.final_metrics if version_tags is None else version_tags
        self._put({"t": "model", "path": rel, "name": name, "register": register,
                   "tags": {**self._source_tags, **(tags or {})}, "step": step or self.last_epoch,
                   "version_tags": {k: str(v) for k, v in version_tags.items()}})

    def end(self, status: str = "FINISHED", reason: str | None = None, timeout_s: float | None = None) -> int:
        """Mark the run ``FINISHED``/``FAILED``/``KILLED`` (``reason`` as the tag ``pipeline.end_reason``).

        Waits at most ``timeout_s`` for the backlog (default ``flush_timeout_s``;
        5 s at most for ``KILLED``: a preempted node has little time left) and
        returns the records still unsent, kept in the spool for the next start or
        ``pipeline tracking sync``.
        """
        from pipeline.train.sysmetrics import stop_node_monitor

        if self.queue is None:
            return 0
        if timeout_s is None:
            timeout_s = min(self.flush_timeout_s, 5.0) if status == "KILLED" else self.flush_timeout_s
        stop_node_monitor(min(timeout_s, 5.0))  # this node's last samples before the run ends
        self._put({"t": "end", "status": status, "reason": reason})
        left = self.queue.close(timeout_s)
        self.queue = None
        return left


def spool_dir_for(run_key: str) -> Path:
    """``<run key>/tracking`` for a local storage directory; for a URI (``s3://…``), a local directory."""
    if is_uri(run_key):
        import re
        import tempfile

        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_key)
        return Path(tempfile.gettempdir()) / "pipeline-tracking" / safe
    return Path(run_key) / SPOOL_DIRNAME


def tracking_behind(run_key: str) -> str | None:
    """One line when the job's tracking records are not all on the server yet, else None."""
    d = spool_dir_for(run_key)
    left = Spool(d).unsent() if (d / f"{RECORDS}.jsonl").exists() else 0
    if not left:
        return None
    return (f"tracking is behind: {left} record(s) not yet on the tracking server; they are sent at the next "
            f"start of this job, or now with: pipeline tracking sync {Path(run_key)}")


def _floats(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


class NullTracker:
    """What ranks other than 0 (and ``tracking.enabled: false``) log: nothing."""

    run_id = None
    last_epoch = 0
    last_step = 0
    resumed = False

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def job_run_id(run_key: str) -> str | None:
    """The job's MLflow run id as its spool knows it (no server call; None before the server first answered)."""
    return read_job(spool_dir_for(run_key)).get("run_id")


def find_job_run(tracking_uri: str, experiment: str, run_key: str):
    """The MLflow run of a job, for the launcher's summary (None when tracking was off or never started)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return None if exp is None else find_run(client, exp.experiment_id, run_key)


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
    "DEFAULT_TRACKING_URI", "NullTracker", "RUN_KEY_TAG", "SQLITE_HEADER", "Tracker", "check_tracking_uri",
    "confusion_figure", "default_artifact_location", "find_job_run", "find_run", "job_run_id", "missing_sqlite_store",
    "per_class_table", "resolve_tracking_uri", "spool_dir_for", "sqlite_header", "tracking_behind", "ui_hint",
]
