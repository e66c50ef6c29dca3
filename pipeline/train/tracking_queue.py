"""The non-blocking path from the training loop to MLflow: a bounded queue, a local spool, a sender thread.

The training loop never talks to the tracking server. It puts small records
(metrics at a step, params, tags, artifact files, the end status) on a bounded
in-memory queue and goes on. A spooler thread appends them to an append-only
JSON-lines file under the job's storage directory; a sender thread replays that
file to MLflow in order and records, in a cursor file written atomically, how
far it got. A server that is down, slow or failing costs the loop nothing: the
sender retries with exponential backoff while the spool grows; when the server
is back it sends the backlog in order. What is still unsent when the job ends
is sent at the next start of the same job (the same spool), or by ``pipeline
tracking sync RUN_DIR``.

Layout of ``<storage path>/<run name>/tracking/``::

    job.json            tracking URI, experiment, run key and name; the run id once known
    records.jsonl       rank 0's records, one JSON object a line, in order
    records.sent        {"offset": bytes sent, "records": count}
    system-<node>.jsonl system metrics of one node (its own sender; never creates the run)
    files/<n>/...       artifact files the records refer to
    rejected.jsonl      records the server refused as invalid (set aside so they block nothing)

Records are applied idempotently where MLflow allows: epoch and step metrics at
or below the run's last logged step are skipped, params already in the run are
not logged again, so a record sent twice (a crash between sending and saving
the cursor) does not duplicate anything.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import described, first_line
from pipeline.fileio import write_atomic

log = logging.getLogger("pipeline.tracking")

SPOOL_DIRNAME = "tracking"
JOB_FILE = "job.json"
RECORDS = "records"
RUN_KEY_TAG = "pipeline.run_key"
END_REASON_TAG = "pipeline.end_reason"  # why a run ended FAILED or KILLED
EPOCH_METRIC = "train_loss"  # every epoch logs it; its history says which epochs are done
_OLD_EPOCH_FAMILY = "val_loss"  # what spooled epoch records were filed under before validation could skip epochs
STEP_METRIC = "step_train_loss"
BATCH_METRICS = 1000  # MLflow's log_batch limit
# MLflow's own HTTP retries happen inside one call; keep them short so our backoff decides.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class RunNotReady(Exception):
    """The run a sender logs to does not exist yet (system metrics wait for rank 0 to create it)."""


class Spool:
    """An append-only JSON-lines file of records plus an atomically written cursor of what was sent."""

    def __init__(self, directory: str | Path, name: str = RECORDS) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{name}.jsonl"
        self.cursor_path = self.dir / f"{name}.sent"
        self._repair()
        self._lock = threading.Lock()
        self.appended = self._count_lines()

    def _repair(self) -> None:
        # A process killed mid-write leaves a partial last line: drop it (its record was never acknowledged).
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def _count_lines(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            return sum(1 for _ in f)

    def cursor(self) -> tuple[int, int]:
        """(byte offset, record count) already sent."""
        try:
            c = json.loads(self.cursor_path.read_text())
            return int(c["offset"]), int(c["records"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0, 0

    def append(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, separators=(",", ":"), allow_nan=True) + "\n" for r in records)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            self.appended += len(records)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record ever appended, sent or not (for the tracker's own bookkeeping at start)."""
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

    def pending(self, limit: int = 500) -> tuple[list[dict[str, Any]], int]:
        """Up to ``limit`` unsent records and the byte offset just after them."""
        out = self.pending_each(limit)
        return [r for r, _ in out], (out[-1][1] if out else self.cursor()[0])

    def pending_each(self, limit: int = 500) -> list[tuple[dict[str, Any], int]]:
        """Up to ``limit`` unsent records, each with the byte offset just after it."""
        offset, _ = self.cursor()
        out: list[tuple[dict[str, Any], int]] = []
        if not self.path.exists():
            return out
        with open(self.path, "rb") as f:
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # being written right now
                offset += len(line)
                out.append((json.loads(line), offset))
                if len(out) >= limit:
                    break
        return out

    def reject(self, record: dict[str, Any], error: str) -> None:
        """Keep a record the server refuses for good (beside the spool), so it does not block the ones after it."""
        with open(self.dir / "rejected.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"error": error, "record": record}) + "\n")

    def mark_sent(self, offset: int, count: int) -> None:
        _, done = self.cursor()
        _write_text(self.cursor_path, json.dumps({"offset": offset, "records": done + count}))

    def unsent(self) -> int:
        return max(self.appended - self.cursor()[1], 0)


def epoch_family(record: dict[str, Any]) -> str | None:
    """The metric family a spooled metrics record belongs to (``EPOCH_METRIC``, ``STEP_METRIC``), or None."""
    family = record.get("family")
    return EPOCH_METRIC if family == _OLD_EPOCH_FAMILY else family


def read_job(spool_dir: str | Path) -> dict[str, Any]:
    path = Path(spool_dir) / JOB_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_job(spool_dir: str | Path, job: dict[str, Any]) -> None:
    _write_text(Path(spool_dir) / JOB_FILE, json.dumps(job, indent=1, sort_keys=True))


def unsent_records(spool_dir: str | Path) -> int:
    """Records of every spool in ``spool_dir`` not yet acknowledged by the server (0 when there is none)."""
    d = Path(spool_dir)
    if not d.is_dir():
        return 0
    return sum(Spool(d, p.stem).unsent() for p in sorted(d.glob("*.jsonl")))


class MlflowSink:
    """Applies spooled records to one MLflow run, found by its run key or created (``create=False``: only found)."""

    def __init__(self, spool_dir: str | Path, create: bool = True) -> None:
        self.dir = Path(spool_dir)
        self.create = create
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._last: dict[str, int] = {}
        self._created = False  # this sink created the run (its first "begin" is no resume)

    def _connect(self) -> None:
        import mlflow

        job = read_job(self.dir)
        if not job:
            raise RunNotReady(f"no {JOB_FILE} in {self.dir} yet")
        # The registry resolves ``models:/`` sources through the process's tracking URI.
        mlflow.set_tracking_uri(job["tracking_uri"])
        self.client = self.client or mlflow.MlflowClient(job["tracking_uri"])
        if self.run_id is not None:
            return
        exp = self.client.get_experiment_by_name(job["experiment"])
        if exp is None:
            if not self.create:
                raise RunNotReady(job["run_key"])
            try:
                self.experiment_id = self.client.create_experiment(job["experiment"],
                                                                   artifact_location=job.get("artifact_location"))
            except mlflow.exceptions.MlflowException:  # another job created it between lookup and create
                self.experiment_id = self.client.get_experiment_by_name(job["experiment"]).experiment_id
        else:
            self.experiment_id = exp.experiment_id
        run = find_run(self.client, self.experiment_id, job["run_key"])
        if run is None:
            if not self.create:
                raise RunNotReady(job["run_key"])
            run = self.client.create_run(self.experiment_id, run_name=job.get("run_name"),
                                         start_time=job.get("start_ms"),
                                         tags={RUN_KEY_TAG: job["run_key"], **job.get("tags", {})})
            self._created = True
        self.run_id = run.info.run_id
        for key in (EPOCH_METRIC, STEP_METRIC):
            self._last[key] = _last_step(self.client, self.run_id, key)
        if self.create and read_job(self.dir).get("run_id") != self.run_id:
            write_job(self.dir, {**read_job(self.dir), "run_id": self.run_id})

    def send(self, records: list[dict[str, Any]]) -> None:
        """Apply ``records`` in order; raises on any failure (the caller retries the same records later)."""
        self._connect()
        metrics: list[dict[str, Any]] = []
        for rec in records:
            if rec["t"] == "metrics":
                metrics.append(rec)
                continue
            self._send_metrics(metrics)
            metrics = []
            getattr(self, "_apply_" + rec["t"])(rec)
        self._send_metrics(metrics)

    def _send_metrics(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        batch = []
        for rec in records:
            family = epoch_family(rec)
            if family in self._last and rec["step"] <= self._last[family]:
                continue  # already in the run (sent before a crash, or a redone epoch)
            batch += [Metric(k, float(v), rec["ts"], rec["step"]) for k, v in rec["m"].items()]
        for i in range(0, len(batch), BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=batch[i:i + BATCH_METRICS])
        for rec in records:
            family = epoch_family(rec)
            if family in self._last:
                self._last[family] = max(self._last[family], rec["step"])

    def _apply_params(self, rec: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        params = rec["p"]
        fresh = [Param(k, v) for k, v in params.items() if k not in existing]
        # MLflow params are immutable; a restarted job with, say, more epochs records the change as a tag.
        changed = [f"{k}: {existing[k]} -> {v}" for k, v in params.items() if k in existing and existing[k] != v]
        for i in range(0, len(fresh), 100):  # the store's batch limit
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])
        if changed:
            self.client.set_tag(self.run_id, f"pipeline.changed_at_epoch_{rec.get('epoch', 0)}",
                                "; ".join(changed)[:5000])

    def _apply_tags(self, rec: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])

    def _apply_begin(self, rec: dict[str, Any]) -> None:
        """One start of the job: every start after the one that created the run counts as a resume."""
        if self._created:
            self._created = False
            return
        run = self.client.get_run(self.run_id)
        self.client.update_run(self.run_id, status="RUNNING")
        resumes = int(run.data.tags.get("pipeline.resumes", "0")) + 1
        self.client.set_tag(self.run_id, "pipeline.resumes", str(resumes))

    def _apply_inputs(self, rec: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(**d["dataset"]), [InputTag("mlflow.data.context", d["context"])])
                  for d in rec["datasets"]]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def _apply_artifact(self, rec: dict[str, Any]) -> None:
        path = self.dir / rec["path"]
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), rec.get("dest"))
        else:
            self.client.log_artifact(self.run_id, str(path), rec.get("dest"))

    def _apply_model(self, rec: dict[str, Any]) -> None:
        from mlflow.entities import LoggedModelOutput

        # A retry after a partial send finds the model it created (tagged with the record's spool path).
        found = self.client.search_logged_models([self.experiment_id], max_results=1,
                                                 filter_string=f"tags.`pipeline.record` = '{rec['path']}' AND "
                                                               f"source_run_id = '{self.run_id}'")
        if found:
            model = found[0]
        else:
            model = self.client.create_logged_model(self.experiment_id, name=rec["name"], source_run_id=self.run_id,
                                                    tags={**rec.get("tags", {}), "pipeline.record": rec["path"]},
                                                    model_type=rec.get("model_type"))
        if str(model.status) != "READY":
            self.client.log_model_artifacts(model.model_id, str(self.dir / rec["path"]))
            self.client.finalize_logged_model(model.model_id, "READY")
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=rec.get("step", 0))])
        if rec.get("register"):
            self._register(rec["register"], model.model_id, rec.get("version_tags", {}))

    def _register(self, name: str, model_id: str, tags: dict[str, str]) -> None:
        import mlflow

        try:
            self.client.create_registered_model(name)
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if any(v.run_id == self.run_id for v in self.client.search_model_versions(f"name = '{name}'")):
            return  # registered by an earlier try
        self.client.create_model_version(name, source=f"models:/{model_id}", run_id=self.run_id, tags=tags,
                                         model_id=model_id)

    def _apply_end(self, rec: dict[str, Any]) -> None:
        if rec.get("reason"):
            self.client.set_tag(self.run_id, END_REASON_TAG, rec["reason"][:5000])
        self.client.set_terminated(self.run_id, status=rec["status"], end_time=rec["ts"])


class TrackingQueue:
    """A bounded queue in front of a ``Spool``, drained by two daemon threads: spooler and sender.

    ``put`` never waits on the network; it waits only if ``maxsize`` records are
    queued and the local disk cannot take them.
    """

    def __init__(self, spool: Spool, sink: Callable[[list[dict[str, Any]]], None], maxsize: int = 10_000,
                 backoff_s: tuple[float, float] = (0.5, 10.0), name: str = "tracking", warn: bool = True) -> None:
        self.spool = spool
        self.warn = warn  # one console line when the server goes away and when it is back
        self.sink = sink
        self.backoff_s = backoff_s
        self.name = name
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._spooler = threading.Thread(target=self._spool_loop, name=f"{name}-spool", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name=f"{name}-send", daemon=True)
        self._spooler.start()
        self._sender.start()

    def put(self, record: dict[str, Any]) -> None:
        record.setdefault("ts", int(time.time() * 1000))
        self._q.put(record)

    def backlog(self) -> int:
        """Records not yet acknowledged by the tracking server (queued in memory or spooled)."""
        return self._q.qsize() + self.spool.unsent()

    def _spool_loop(self) -> None:
        while True:
            rec = self._q.get()
            batch = [] if rec is None else [rec]
            while not self._q.empty() and len(batch) < 1000:
                nxt = self._q.get_nowait()
                if nxt is None:
                    rec = None
                    break
                batch.append(nxt)
            if batch:
                self.spool.append(batch)
                self._wake.set()
            if rec is None:
                return

    def _send_loop(self) -> None:
        delay = self.backoff_s[0]
        while True:
            if self._stop.is_set() and not self._spooler.is_alive():
                return  # closed: close() flushed what its time allowed; the rest stays in the spool
            records, offset = self.spool.pending()
            if not records:
                with self._idle:
                    self._idle.notify_all()
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self.sink(records)
            except Exception as exc:  # any failure: the records stay in the spool and are retried
                if refused(exc) and send_each(self.spool, self.sink):
                    continue
                self._failed(exc)
                if self._stop.wait(delay):
                    return  # closing: what is left stays in the spool
                delay = min(delay * 2, self.backoff_s[1])
                continue
            self.spool.mark_sent(offset, len(records))
            if self.failing_since is not None and self.warn:
                log.warning("[pipeline] tracking server reachable again after %.0f s; sending the backlog",
                            time.monotonic() - self.failing_since)
            self.failing_since = None
            delay = self.backoff_s[0]

    def _failed(self, exc: Exception) -> None:
        self.last_error = described(exc)[:250]
        if self.failing_since is None and not isinstance(exc, RunNotReady):
            self.failing_since = time.monotonic()
            if self.warn:
                log.warning("[pipeline] tracking server unavailable (%s); training goes on, records are "
                            "spooled to %s", self.last_error, self.spool.path)

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for everything queued so far to reach the server; True when it has."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        while self.backlog() > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._idle:
                self._idle.wait(min(left, 0.5))
        return True

    def close(self, timeout_s: float = 30.0) -> int:
        """Flush for at most ``timeout_s``, stop both threads; returns the records left unsent (kept in the spool)."""
        deadline = time.monotonic() + timeout_s
        self._q.put(None)
        self._spooler.join(max(deadline - time.monotonic(), 1.0))  # local disk: quick
        self.flush(max(deadline - time.monotonic(), 0.0))
        self._stop.set()
        self._wake.set()
        self._sender.join(1.0)  # one stuck in a request is a daemon thread: it ends with the process
        return self.spool.unsent()


def send_each(spool: Spool, sink: Callable[[list[dict[str, Any]]], None]) -> bool:
    """Send pending records one at a time, setting aside those the server refuses; True if all got through."""
    for rec, end in spool.pending_each():
        try:
            sink([rec])
        except Exception as exc:
            if not refused(exc):
                return False
            spool.reject(rec, f"{type(exc).__name__}: {exc}"[:2000])
            log.warning("[pipeline] the tracking server refused a %s record (%s); kept in %s", rec.get("t"),
                        first_line(exc)[:200],
                        spool.dir / "rejected.jsonl")
        spool.mark_sent(end, 1)
    return True


def sync(spool_dir: str | Path) -> tuple[int, str | None]:
    """Send every unsent record of a job's spools now, in this process. Returns (records sent, run id)."""
    d = Path(spool_dir)
    job = read_job(d)
    if not job:
        raise FileNotFoundError(d / JOB_FILE)
    http_env_defaults()  # an unreachable server fails fast instead of MLflow's minutes of retries
    sent = 0
    run_id = None
    names = [RECORDS] + sorted(p.stem for p in d.glob("system-*.jsonl"))
    for name in names:
        spool = Spool(d, name)
        sink = MlflowSink(d, create=name == RECORDS)
        while True:
            records, offset = spool.pending()
            if not records:
                break
            try:
                sink.send(records)
            except Exception as exc:
                if not refused(exc) or not send_each(spool, sink.send):
                    raise
            else:
                spool.mark_sent(offset, len(records))
            sent += len(records)
        run_id = run_id or sink.run_id
    return sent, run_id or read_job(d).get("run_id")


def http_env_defaults() -> None:
    """Short MLflow HTTP waits and retries in this process: 15 s per request, one retry (MLflow's own
    defaults wait 120 s per request and retry 7 times with a growing backoff, over ten minutes in
    silence). The tracking sender retries with its own backoff; a user's own values are kept."""
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)


# Answers that no retry will change (a malformed or invalid request): the record is set aside.
REFUSED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_STATE"}


def refused(exc: Exception) -> bool:
    """True when the tracking server rejected the request itself, not when it could not be reached."""
    return getattr(exc, "error_code", None) in REFUSED


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def find_run(client, experiment_id: str, run_key: str):
    """The run tagged with ``run_key`` in ``experiment_id``, or None (the oldest if, somehow, several)."""
    escaped = run_key.replace("\\", "\\\\").replace("'", "\\'")
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{escaped}'",
                              order_by=["attributes.start_time ASC"], max_results=5)
    return runs[0] if runs else None


def _last_step(client, run_id: str, key: str) -> int:
    history = client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=0)


__all__ = ["MlflowSink", "RunNotReady", "Spool", "TrackingQueue", "epoch_family", "find_run", "http_env_defaults",
           "read_job", "sync", "unsent_records", "write_job"]
