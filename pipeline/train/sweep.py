"""``pipeline sweep``: one training job per point of a grid (and of random draws), as Ray Tune trials.

Each trial is a Tune function trainable that runs a whole ``pipeline train`` job
(``launch.fit``: its own TorchTrainer and workers; Ray Train's
``TuneReportCallback`` passes each epoch's figures to Tune). In MLflow the sweep
is one parent run holding the sweep's definition (params and ``sweep.yaml``),
a table of the trials with their final figures (``trials.csv``) and a plot of
the metric against each swept key (``sweep.png``); every trial is its own run,
a child of the parent (tag ``mlflow.parentRunId``). A trial that fails is a
FAILED child carrying its error; the others carry on, and the sweep exits
non-zero with a summary.

Keys and values are checked against the config schema before anything starts;
what only a run can find out (a missing shard directory, a diverging lr) fails
its own trial. Trial ``i`` of sweep ``NAME`` is the job ``run.name=NAME-i``, so
running the same sweep again resumes its trials from their checkpoints. SIGTERM or
SIGINT to the sweep's driver writes a stop request into every trial's job
directory (``pipeline.train.preempt``): running trials checkpoint and stop, the
others see it before they start and return at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

SWEEP_KEY_TAG = "pipeline.sweep_key"
TRIAL_TAG = "pipeline.sweep_trial"
HIGHER_IS_BETTER = ("val_top1", "val_top5", "train_images_per_s")
TABLE_METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "epoch")
TRIAL_DRIVER_MEMORY = 512 * 2**20  # bytes: a trial's process runs launch.fit, which waits on its workers


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What to run: the base config and overrides, the swept keys, and how to pick the best trial."""

    config: str
    overrides: tuple[str, ...] = ()
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()  # key, raw values as typed (YAML scalars)
    random: tuple[tuple[str, float, float, bool], ...] = ()  # key, low, high, log scale
    samples: int = 1
    metric: str = "val_top1"
    name: str = ""
    seed: int = 0

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.grid] + [k for k, *_ in self.random]

    def points(self, integer_keys: frozenset[str] = frozenset()) -> list[dict[str, str]]:
        """Every trial's overrides: the grid's product, once per sample; each trial draws its random keys anew.

        Draws for ``integer_keys`` (an int in the config) are rounded.
        """
        rng = random.Random(self.seed)
        grid = list(itertools.product(*[[(k, v) for v in values] for k, values in self.grid]))
        out = []
        for _ in range(self.samples):
            for combo in grid:
                point = dict(combo)
                for key, low, high, log in self.random:
                    value = math.exp(rng.uniform(math.log(low), math.log(high))) if log else rng.uniform(low, high)
                    point[key] = str(round(value)) if key in integer_keys else f"{value:.6g}"
                out.append(point)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "set": list(self.overrides), "grid": {k: list(v) for k, v in self.grid},
                "random": {k: {"low": lo, "high": hi, "log": log} for k, lo, hi, log in self.random},
                "samples": self.samples, "metric": self.metric, "name": self.name, "seed": self.seed}


def parse_grid(text: str) -> tuple[str, tuple[str, ...]]:
    """``KEY=V1,V2,…`` → (key, values)."""
    key, sep, values = text.partition("=")
    items = tuple(v.strip() for v in values.split(","))
    if not sep or not key.strip() or not all(items):
        raise UserError(f"invalid --grid {text!r}: expected KEY=V1,V2,… e.g. optim.lr=0.001,0.003")
    return key.strip(), items


def parse_random(text: str) -> tuple[str, float, float, bool]:
    """``KEY=LOW:HIGH[:log]`` → (key, low, high, log)."""
    key, sep, spec = text.partition("=")
    parts = spec.split(":")
    try:
        if not sep or not key.strip() or len(parts) not in (2, 3) or parts[2:] not in ([], ["log"]):
            raise ValueError
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise UserError(f"invalid --random {text!r}: expected KEY=LOW:HIGH or KEY=LOW:HIGH:log, "
                        "e.g. optim.lr=1e-4:1e-2:log") from None
    log = parts[2:] == ["log"]
    if not low < high or (log and low <= 0):
        raise UserError(f"invalid --random {text!r}: need LOW < HIGH{' and LOW > 0 on a log scale' if log else ''}")
    return key.strip(), low, high, log


def validate(sweep: Sweep):
    """The base config, after checking every swept key exists and every grid value passes the config's checks."""
    from pipeline.config import flatten
    from pipeline.train.config import load_config

    if not sweep.grid and not sweep.random:
        raise UserError("nothing to sweep: give at least one --grid KEY=V1,V2 or --random KEY=LOW:HIGH")
    if sweep.samples < 1:
        raise UserError(f"--samples must be >= 1, got {sweep.samples}")
    try:  # the trials' names: NAME-000, … must be valid job names
        base = load_config(sweep.config, [*sweep.overrides, f"run.name={sweep.name}-000"])
    except UserError as exc:
        if "run.name" not in str(exc) and "run: name" not in str(exc):
            raise
        raise UserError(f"--name {sweep.name!r}: {exc}") from None
    base = load_config(sweep.config, list(sweep.overrides))
    known = flatten(base.to_dict())
    for key in sweep.keys:
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise UserError(f"unknown config key {key!r} to sweep{hint}")
        if key == "run.name":
            raise UserError("run.name cannot be swept: each trial's name is the sweep's name and its number")
    dupes = {k for k in sweep.keys if sweep.keys.count(k) > 1}
    if dupes:
        raise UserError(f"{', '.join(sorted(dupes))} swept twice")
    for key, values in sweep.grid:
        for value in values:
            try:
                load_config(sweep.config, [*sweep.overrides, f"{key}={value}"])
            except UserError as exc:
                raise UserError(f"--grid {key}={value}: {exc}") from None
    for key, low, high, _ in sweep.random:
        for value in (low, high):
            try:
                load_config(sweep.config, [*sweep.overrides, f"{key}={value}"])
            except UserError as exc:
                raise UserError(f"--random {key}: {value:g}: {exc}") from None
    return base


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every trial needs, resolved on the driver (trials run in their own working directories)."""

    sweep: Sweep
    points: tuple[dict[str, str], ...]
    fixed: tuple[str, ...]  # absolute shards, storage and tracking store, before the sweep's own overrides
    tracking_uri: str
    experiment: str
    parent_id: str
    verbose: bool

    def trial_name(self, index: int) -> str:
        return f"{self.sweep.name}-{index:03d}"

    def trial_dir(self, index: int) -> str:
        """The trial's job directory: its checkpoints and its stop request (``pipeline.train.preempt``)."""
        return f"{self.fixed_storage.rstrip('/')}/{self.trial_name(index)}"

    def overrides(self, index: int) -> list[str]:
        # The driver's resolved paths after the user's own --set (a relative path there would be taken in
        # the trial's working directory); the points' paths were resolved on the driver too.
        point = [f"{k}={v}" for k, v in self.points[index].items()]
        return [*self.sweep.overrides, *self.fixed, *point, f"run.name={self.trial_name(index)}"]

    def tags(self, index: int) -> dict[str, str]:
        return {"mlflow.parentRunId": self.parent_id, SWEEP_KEY_TAG: self.parent_key, TRIAL_TAG: str(index)}

    @property
    def parent_key(self) -> str:
        return self.fixed_storage + "/" + self.sweep.name

    @property
    def fixed_storage(self) -> str:
        return next(o.split("=", 1)[1] for o in self.fixed if o.startswith("run.storage_path="))


def _resolved(point: dict[str, str]) -> dict[str, str]:
    """A point's swept paths (``data.shards``, ``train.init_from``) made absolute here, on the driver."""
    from pipeline.fileio import is_uri
    from pipeline.train.config import MLFLOW_MODEL_SCHEMES

    def absolute(key: str, value: str) -> str:
        if key not in ("data.shards", "train.init_from") or not value or is_uri(value) \
                or value.startswith(MLFLOW_MODEL_SCHEMES):
            return value
        return str((Path.cwd() / Path(value).expanduser()).resolve())

    return {k: absolute(k, v) for k, v in point.items()}


def run_trial(job: _Job, index: int) -> None:
    """One Tune trial: a full training job; on failure its MLflow run is (made and) marked FAILED."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train.config import load_config
    from pipeline.train.launch import fit

    if _stop_reason(job, index):
        return  # the sweep was stopped before this trial began
    try:
        cfg = load_config(job.sweep.config, job.overrides(index))
        fit(cfg, verbose=job.verbose, console=False, run_tags=job.tags(index), callbacks=(TuneReportCallback(),),
            stop_requests=True)  # a Ctrl-C between the check above and the job's start still stops it
    except BaseException as exc:
        _record_failure(job, index, exc)
        raise


def _record_failure(job: _Job, index: int, exc: BaseException) -> None:
    """The trial's child run FAILED with its error; created here when the job failed before its worker made it."""
    import mlflow

    from pipeline.train.tracking import RUN_KEY_TAG

    client = mlflow.MlflowClient(job.tracking_uri)
    key = f"{job.fixed_storage}/{job.trial_name(index)}"
    runs = client.search_runs([_experiment_id(client, job.experiment)],
                              filter_string=f"tags.`{RUN_KEY_TAG}` = '{_quote(key)}'", max_results=1)
    if runs:
        run_id = runs[0].info.run_id
    else:
        run = client.create_run(_experiment_id(client, job.experiment), run_name=job.trial_name(index),
                                tags={RUN_KEY_TAG: key, **job.tags(index)})
        run_id = run.info.run_id
        _log_trial_params(client, run_id, job, index)
    client.set_tag(run_id, "pipeline.error", f"{type(exc).__name__}: {exc}"[:5000])
    client.set_terminated(run_id, status="FAILED")


def _log_trial_params(client, run_id: str, job: _Job, index: int) -> None:
    """The trial's whole config as params, as its training job would have logged them."""
    from mlflow.entities import Param

    from pipeline.config import flatten
    from pipeline.train.config import load_config

    try:
        cfg = load_config(job.sweep.config, job.overrides(index))
        params = {k: str(v)[:6000] for k, v in flatten(cfg.to_dict()).items()}
    except UserError:
        params = dict(job.points[index])
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # the store's batch limit
        client.log_batch(run_id, params=items[i:i + 100])


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it between the lookup and the create
        return client.get_experiment_by_name(name).experiment_id


def _start_parent(client, sweep: Sweep, key: str, experiment_id: str) -> str:
    """The sweep's parent run (the one from an earlier start of the same sweep, if any), RUNNING."""
    params = {"sweep.config": sweep.config, "sweep.metric": sweep.metric, "sweep.samples": sweep.samples,
              "sweep.seed": sweep.seed, **{f"sweep.grid.{k}": ",".join(v) for k, v in sweep.grid},
              **{f"sweep.random.{k}": f"{lo:g}:{hi:g}{':log' if log else ''}" for k, lo, hi, log in sweep.random},
              **{f"sweep.set.{o.split('=', 1)[0]}": o.split("=", 1)[1] for o in sweep.overrides}}
    params = {k: str(v)[:6000] for k, v in params.items()}
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_KEY_TAG}` = '{_quote(key)}' and "
                                                              f"tags.`{TRIAL_TAG}` = 'parent'", max_results=1)
    if found:
        # Trial i resumes job <name>-i from its checkpoint: only the very same points may do that.
        if found[0].data.params != params:
            raise UserError(f"sweep {sweep.name!r} already ran with another definition (MLflow run "
                            f"{found[0].info.run_id}): give this one another --name")
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=sweep.name, tags={SWEEP_KEY_TAG: key, TRIAL_TAG: "parent"})
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    import yaml

    client.log_text(run.info.run_id, yaml.safe_dump(sweep.to_dict(), sort_keys=False), "sweep.yaml")
    return run.info.run_id


class _Reporter:
    """Tune callback on the driver: one line per trial start, epoch, end and failure.

    A ``TrialProgressCallback``, so that Tune does not add its own, which prints every
    result dict (and "Trial … completed. Last result:" for a trial the sweep's stop
    kept from starting); with ``--verbose`` its lines are printed too.
    """

    def __new__(cls, job: _Job):
        from ray.tune.progress_reporter import TrialProgressCallback

        class Reporter(TrialProgressCallback):
            def on_trial_start(self, iteration, trials, trial, **info):
                print(f"[pipeline] {_describe(job, trial)}: started", flush=True)

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if job.verbose:
                    super().on_trial_result(iteration, trials, trial, result, **info)
                if "train_loss" not in result:
                    return  # a mid-epoch checkpoint's report (a stop), not an epoch's end
                figures = " ".join(f"{k} {result[k]:.4f}" for k in ("val_top1", "val_loss") if k in result)
                print(f"[pipeline] {_describe(job, trial)}: epoch {result.get('epoch', '?')} {figures}", flush=True)

            def on_trial_complete(self, iteration, trials, trial, **info):
                if job.verbose:
                    super().on_trial_complete(iteration, trials, trial, **info)
                stopped = _stop_reason(job, trial.config["trial"])
                print(f"[pipeline] {_describe(job, trial)}: " + (f"stopped ({stopped})" if stopped else "finished"),
                      flush=True)

            def on_trial_error(self, iteration, trials, trial, **info):
                if job.verbose:
                    super().on_trial_error(iteration, trials, trial, **info)
                print(f"[pipeline] {_describe(job, trial)}: FAILED", flush=True)

        return Reporter()


def _stop_reason(job: _Job, index: int) -> str | None:
    """Why trial ``index`` was stopped before its end (a stop request left in its job directory), or None."""
    from pipeline.fileio import is_uri
    from pipeline.train.preempt import read_stop

    return None if is_uri(job.trial_dir(index)) else read_stop(job.trial_dir(index))


def _describe(job: _Job, trial) -> str:
    index = trial.config["trial"]
    point = " ".join(f"{k}={v}" for k, v in job.points[index].items())
    return f"trial {index + 1}/{len(job.points)} ({point})"


def _run_tune(job: _Job, max_concurrent: int) -> dict[int, str]:
    """All trials through Ray Tune; returns the error of each failed trial by index."""
    import logging

    from ray import tune

    if not job.verbose:
        # Tune logs each failed trial's whole traceback; the sweep's summary names the error instead.
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
        # Tune's newer output engine prints its configuration box whatever the verbosity; the older one
        # honours verbose=0. The sweep prints its own line per trial event (``_Reporter``).
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

    def trainable(config: dict[str, Any]) -> None:
        run_trial(job, config["trial"])

    tuner = tune.Tuner(
        # The trial's Ray Train workers hold its CPUs/GPUs; the trial itself (a driver waiting on them) holds
        # only memory, so a cluster that fits N jobs' workers runs N trials. (Tune rejects an empty request.)
        tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}),
        param_space={"trial": tune.grid_search(list(range(len(job.points))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=f"{job.sweep.name}-tune", storage_path=job.fixed_storage,
                                  verbose=1 if job.verbose else 0, callbacks=[_Reporter(job)]),
    )
    results = tuner.fit()
    errors = {}
    for result in results:
        if result.error is not None:
            errors[result.config["trial"]] = _error_line(result.error)
    return errors


def _error_line(error: BaseException) -> str:
    """The innermost cause's type and first line (Tune and Ray Train wrap the trial's exception)."""
    cause = error
    while getattr(cause, "cause", None) is not None or cause.__cause__ is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause).strip().splitlines()
    last = [line for line in text if line.strip()]
    return f"{type(cause).__name__}: {last[-1] if last else ''}"[:300]


def _default_concurrency(cfg) -> int:
    import ray

    resources = ray.cluster_resources()
    per_trial = cfg.scaling.resources_per_worker()
    fits = [int(resources.get(k, 0) // (v * cfg.scaling.num_workers)) for k, v in per_trial.items() if v > 0]
    return max(1, min(fits) if fits else 1)


def run_sweep(sweep: Sweep, *, max_concurrent: int | None = None, verbose: bool = False) -> int:
    """Validate, run every trial, log the table and plot to the parent, print the summary; 1 if any trial failed."""
    import mlflow
    import ray

    from pipeline.fileio import is_uri
    from pipeline.train.launch import _create_sqlite_store, _environ, check_ray, ensure_ray, resolve_paths
    from pipeline.train.preempt import clear_stop, exit_code, stop_on_signals
    from pipeline.train.ray_output import quiet_ray_output
    from pipeline.train.runs import format_table
    from pipeline.train.tracking import check_tracking_uri, default_artifact_location, resolve_tracking_uri

    base = resolve_paths(validate(sweep))
    if not base.tracking.enabled:
        raise UserError("a sweep records its trials in MLflow: tracking.enabled must be true")
    from pipeline.config import flatten

    ints = frozenset(k for k, v in flatten(base.to_dict()).items() if isinstance(v, int) and not isinstance(v, bool))
    points = sweep.points(ints)
    if not ray.is_initialized():
        check_ray(base)  # before the store and the parent run are made
    tracking_uri = resolve_tracking_uri(base.tracking.tracking_uri)
    fixed = (f"data.shards={base.data.shards}", f"run.storage_path={base.run.storage_path}",
             f"tracking.tracking_uri={tracking_uri}",
             *([f"train.init_from={base.train.init_from}"] if base.train.init_from else []))
    points = [_resolved(point) for point in points]
    check_tracking_uri(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        _create_sqlite_store(tracking_uri, verbose)
    client = mlflow.MlflowClient(tracking_uri)
    exp_id = _experiment_id(client, base.tracking.experiment,
                            default_artifact_location(tracking_uri, base.tracking.artifact_location))
    key = f"{base.run.storage_path}/{sweep.name}"
    parent_id = _start_parent(client, sweep, key, exp_id)
    job = _Job(sweep, tuple(points), fixed, tracking_uri, base.tracking.experiment, parent_id, verbose)
    ensure_ray(base, verbose)
    if not verbose:
        # The trials' output reaches this process, not theirs: fold it here (a trial killed at a stop
        # prints Ray's SIGTERM traceback as it goes).
        quiet_ray_output()
    concurrency = max_concurrent or _default_concurrency(base)
    print(f"[pipeline] sweep {sweep.name}: {len(points)} trial(s) of {sweep.config}, {concurrency} at a time; "
          f"MLflow parent run {parent_id}", flush=True)
    local = not is_uri(job.fixed_storage)
    trial_dirs = [job.trial_dir(i) for i in range(len(points))] if local else []
    for d in trial_dirs:
        clear_stop(d)  # a stop of an earlier, interrupted start of this sweep is not for this one
    # SIGTERM/SIGINT (Ctrl-C, `ray job stop`): running trials checkpoint and stop, the others do not start.
    with stop_on_signals(trial_dirs, base.run.preempt_timeout_s, enabled=local) as signals:
        # Tune's own SIGINT handler would end the trials without their checkpoints.
        with _environ({"TUNE_DISABLE_SIGINT_HANDLER": "1"} if signals.handled else {}):
            errors = _run_tune(job, concurrency)
    stopped = f"{signals.signal} to the driver" if signals.signal else None
    rows = trial_rows(client, exp_id, job, errors)
    best = _best(rows, sweep.metric)
    _log_parent(client, parent_id, job, rows, best, errors, stopped)
    columns = ["trial", "status", *sweep.keys, *TABLE_METRICS, "run"]
    print(format_table([{**r, "run": r["run_id"][:8]} for r in rows], columns))
    if best is not None:
        print(f"best: trial {best['trial']} ({' '.join(f'{k}={best[k]}' for k in sweep.keys)}) "
              f"{sweep.metric} {best[sweep.metric]:.4f}, MLflow run {best['run_id']}")
    if errors:
        print(f"{len(errors)} of {len(points)} trial(s) failed:")
        for index, error in sorted(errors.items()):
            print(f"  trial {index + 1} ({' '.join(f'{k}={v}' for k, v in points[index].items())}): {error}")
    if stopped:
        cut = sum(1 for r in rows if r["status"] == "KILLED")
        unstarted = sum(1 for r in rows if r["status"] == "MISSING")
        print(f"pipeline sweep: stopped by {stopped}: {cut} trial(s) stopped after a checkpoint, {unstarted} not "
              f"started; run the same command again to continue", file=sys.stderr)
        return exit_code(stopped)
    return 1 if errors else 0



def trial_rows(client, experiment_id: str, job: _Job, errors: dict[int, str]) -> list[dict[str, Any]]:
    """One row per trial: number, status, swept values, final metrics, run id (from the children in MLflow)."""
    children = client.search_runs([experiment_id], max_results=5000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{job.parent_id}'")
    by_index = {int(r.data.tags[TRIAL_TAG]): r for r in children if r.data.tags.get(TRIAL_TAG, "").isdigit()}
    rows = []
    for index, point in enumerate(job.points):
        run = by_index.get(index)
        status = "FAILED" if index in errors else (run.info.status if run else "MISSING")
        row: dict[str, Any] = {"trial": index + 1, "status": status, **point,
                               "run_id": run.info.run_id if run else ""}  # the table shows its first 8
        for m in TABLE_METRICS:
            row[m] = run.data.metrics.get(m) if run else None
        if row["epoch"] is None and run is not None:
            row["epoch"] = _last_epoch(client, run.info.run_id)
        rows.append(row)
    return rows


def _last_epoch(client, run_id: str) -> int | None:
    from pipeline.train.tracking_queue import EPOCH_METRIC

    history = client.get_metric_history(run_id, EPOCH_METRIC)  # logged at step = epoch
    return max((m.step for m in history), default=None)


def _best(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "FINISHED" and r.get(metric) is not None]
    if not done:
        return None
    sign = 1 if metric in HIGHER_IS_BETTER else -1
    return max(done, key=lambda r: sign * r[metric])


def _log_parent(client, parent_id: str, job: _Job, rows: list[dict[str, Any]], best, errors,
                stopped: str | None = None) -> None:
    """trials.csv, sweep.png, the best trial as tags and metric; FAILED when any trial failed, else KILLED
    when the sweep was stopped (``stopped``: why, also the tag ``pipeline.end_reason``)."""
    import csv
    import io

    import matplotlib.pyplot as plt

    from pipeline.train.tracking_queue import END_REASON_TAG

    columns = ["trial", "status", *job.sweep.keys, *TABLE_METRICS, "run_id"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    client.log_text(parent_id, buf.getvalue(), "trials.csv")
    fig = sweep_figure(rows, job.sweep)
    client.log_figure(parent_id, fig, "sweep.png")
    plt.close(fig)
    if best is not None:
        client.set_tag(parent_id, "pipeline.best_trial", str(best["trial"]))
        client.set_tag(parent_id, "pipeline.best_run_id", best["run_id"])
        client.log_metric(parent_id, f"best_{job.sweep.metric}", float(best[job.sweep.metric]))
    client.set_tag(parent_id, "pipeline.failed_trials", str(len(errors)))
    if stopped:
        client.set_tag(parent_id, END_REASON_TAG, stopped)
    client.set_terminated(parent_id, status="FAILED" if errors else "KILLED" if stopped else "FINISHED")


def sweep_figure(rows: list[dict[str, Any]], sweep: Sweep):
    """The metric against each swept key (one panel per key); failed trials are marked on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sweep.keys
    logs = {k for k, _, _, log in sweep.random if log}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ok = [r for r in rows if r.get(sweep.metric) is not None and r["status"] == "FINISHED"]
        numeric = all(_is_number(r[key]) for r in rows)
        labels = sorted({str(r[key]) for r in rows}, key=lambda v: float(v) if numeric else v)
        x_of = (lambda v: float(v)) if numeric else (lambda v: labels.index(str(v)))
        ax.scatter([x_of(r[key]) for r in ok], [r[sweep.metric] for r in ok], color="tab:blue", label="finished")
        failed = [r for r in rows if r["status"] != "FINISHED"]
        if failed:
            ax.scatter([x_of(r[key]) for r in failed], [ax.get_ylim()[0]] * len(failed), marker="x",
                       color="tab:red", label="failed")
        if not numeric:
            ax.set_xticks(range(len(labels)), [_short(v) for v in labels], rotation=20)
        elif key in logs:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(sweep.metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"sweep {sweep.name}: final {sweep.metric} per trial")
    fig.tight_layout()
    return fig


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _short(text: str, width: int = 18) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sweep`` to the ``pipeline`` command."""
    p = subparsers.add_parser(
        "sweep", help="train once per point of a grid or random search (Ray Tune), as MLflow child runs",
        description="Run one training job per point (Ray Tune trials, each with its own Ray Train workers). "
                    "MLflow gets one parent run with the sweep's definition, trials.csv and sweep.png, and one "
                    "child run per trial. Starting the same --name again resumes its trials.")
    p.add_argument("--config", default="fashion_mnist", metavar="NAME_OR_FILE", help="base config (as for train)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,…",
                   help="try each value of KEY (repeatable: the grid is the product)")
    p.add_argument("--random", action="append", default=[], metavar="KEY=LOW:HIGH[:log]",
                   help="draw KEY uniformly (or log-uniformly) once per sample (repeatable)")
    p.add_argument("--samples", type=int, default=1, metavar="N",
                   help="with --random: run the grid N times, every trial with its own draws (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every trial (repeatable)")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="trials at a time (default: as many as the cluster's CPUs/GPUs fit)")
    p.add_argument("--metric", default="val_top1", help="what picks the best trial (default val_top1)")
    p.add_argument("--name", default=None, help="sweep name; trials are NAME-000, NAME-001, … "
                                                "(default: <config>-sweep-<time>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--verbose", action="store_true", help="also show Ray's, Tune's and Ray Train's own lines")
    p.set_defaults(func=_cli, on_interrupt="run the same command again to continue")


def _cli(args: argparse.Namespace) -> int:
    from pipeline.train.tracking_queue import http_env_defaults

    http_env_defaults()
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    name = args.name or f"{Path(args.config).stem}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep = Sweep(config=args.config, overrides=tuple(args.overrides),
                  grid=tuple(parse_grid(g) for g in args.grid), random=tuple(parse_random(r) for r in args.random),
                  samples=args.samples, metric=args.metric, name=name, seed=args.seed)
    if sweep.metric not in (*HIGHER_IS_BETTER, "val_loss", "train_loss"):
        raise UserError(f"unknown --metric {sweep.metric!r}; one of val_top1, val_top5, val_loss, train_loss, "
                        "train_images_per_s")
    return run_sweep(sweep, max_concurrent=args.max_concurrent, verbose=args.verbose)


__all__ = ["Sweep", "parse_grid", "parse_random", "register", "run_sweep", "run_trial", "sweep_figure",
           "trial_rows", "validate"]
