"""Launch a training job: ``TorchTrainer(ScalingConfig, RunConfig).fit()`` on a Ray cluster.

Connects to an existing cluster when ``RAY_ADDRESS`` is set (``ray job submit``
sets it), otherwise starts a local one sized to this machine. Relative paths in
the config (shards, storage, the SQLite tracking store) are resolved here, in
the directory the user launched from, because Ray Train workers run in their own
working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import ANSI_COLOUR, UserError, described, first_line
from pipeline.fileio import is_uri, make_writable_dir
from pipeline.ray_address import probe
from pipeline.train.config import MLFLOW_MODEL_SCHEMES, TrainConfig


class JobFailed(RuntimeError):
    """Ray Train gave up on a job: its text is one line for the console (what failed, where it can continue);
    the error Ray raised is its ``__cause__``."""


@dataclasses.dataclass
class TrainResult:
    """What a finished job reports back to the caller."""

    run_name: str
    metrics: dict[str, Any]  # the last epoch's metrics (rank 0's report)
    checkpoint_path: str | None  # the latest checkpoint directory
    storage_dir: str  # run.storage_path / run.name
    mlflow_run_id: str | None
    tracking_uri: str | None
    stopped: str | None = None  # why the job stopped early (SIGTERM/SIGINT), after its stop checkpoint
    tracking_behind: str | None = None  # set when tracking records are still waiting for the server


def resolve_paths(cfg: TrainConfig, cwd: Path | None = None) -> TrainConfig:
    """Absolute ``data.shards``, ``run.storage_path`` and a local ``train.init_from`` (URIs such as ``s3://`` or
    ``runs:/`` are left alone): the workers run in working directories of their own."""
    cwd = cwd or Path.cwd()
    shards = cfg.data.shards if cfg.data.shards.is_absolute() else (cwd / cfg.data.shards).resolve()
    storage = str(cfg.run.storage_path)
    if not is_uri(storage):
        storage = str((cwd / Path(storage).expanduser()).resolve())
    init_from = cfg.train.init_from
    if init_from and not is_uri(init_from) and not init_from.startswith(MLFLOW_MODEL_SCHEMES):
        init_from = str((cwd / Path(init_from).expanduser()).resolve())
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, shards=shards),
        run=dataclasses.replace(cfg.run, storage_path=storage),
        train=dataclasses.replace(cfg.train, init_from=init_from),
    )


def check_ray(cfg: TrainConfig) -> None:
    """What can be known about the Ray ``ensure_ray`` will use before anything is written: that ``RAY_ADDRESS``
    answers as a Ray cluster (seconds, where ray.init retries for minutes), or that a local Ray would have
    the GPUs the job needs (it would wait for them forever)."""
    if os.environ.get("RAY_ADDRESS"):
        probe(os.environ["RAY_ADDRESS"], "RAY_ADDRESS")
    else:
        _check_local_gpus(cfg)


def ensure_ray(cfg: TrainConfig, verbose: bool = False) -> None:
    """Connect to the cluster of ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a Ray of this process's
    own with the cores the config's workers need; nothing when Ray is already up. ``check_ray`` first."""
    import ray

    from pipeline.train.console import ray_init_options

    if ray.is_initialized():
        return
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's "(Worker pid=…)" prefixes: no colour codes in a log
    options = ray_init_options(verbose)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, **options)  # the cluster of `ray job submit` or an explicit RAY_ADDRESS
        return
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    temp_dir = local_ray_temp_dir()
    if temp_dir:
        options["_temp_dir"] = temp_dir
    # address="local": a Ray of our own, never a cluster some `ray start` left on this machine.
    # The dashboard (127.0.0.1) serves the State API that Ray Train's PlacementGroupCleaner polls every second.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=True,
             num_gpus=None if cfg.scaling.use_gpu else 0, **options)


def _check_local_gpus(cfg: TrainConfig) -> None:
    """A local Ray has this machine's GPUs and no more: a job that needs more would wait for them forever."""
    if not cfg.scaling.use_gpu:
        return
    import torch

    workers = cfg.scaling.min_workers if cfg.scaling.elastic else cfg.scaling.num_workers
    need = workers * cfg.scaling.gpus_per_worker
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < need:
        raise UserError(f"scaling.use_gpu: the job needs {need:g} GPU(s) ({workers} worker(s) × "
                        f"{cfg.scaling.gpus_per_worker:g}), this machine has {have}: set scaling.use_gpu=false, "
                        "fewer scaling.num_workers, or submit to a cluster with GPUs (RAY_ADDRESS)")


# Unix socket paths hold at most 107 bytes on Linux. Ray puts its sockets under its temp dir, the longest at
# <temp dir>/session_<date>_<time>_<microseconds>_<pid>/sockets/dash_<dashboard module> (Ray 2.60: MetricsHead
# and ReportHead run as processes of their own, each with a socket; a pid has at most 7 digits).
# cluster/ray_temp_dir.sh applies the same rule to `ray start`, with the 39 bytes this leaves for a temp dir
# (35 for TMPDIR or RAY_TMPDIR, to which Ray adds "/ray").
_SOCKET_PATH_MAX = 107
_RAY_SOCKET_TAIL = len("/session_2026-12-01_20-05-21_024940_4194304/sockets/dash_MetricsHead")


def local_ray_temp_dir() -> str | None:
    """The temp dir for a local Ray when Ray's own choice cannot hold its sockets; None when it can.

    Ray keeps its session under ``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray``, else
    ``/tmp/ray``. Batch schedulers often set a long per-job ``TMPDIR``, and Ray
    then fails deep in its start-up with a traceback; such a run uses
    ``/tmp/ray-<uid>`` instead and says so once. A ``RAY_TMPDIR`` that is too
    long is the user's explicit choice: one error line.
    """
    explicit = os.environ.get("RAY_TMPDIR")
    base = explicit or os.environ.get("TMPDIR") or "/tmp"
    longest = len(os.path.join(base, "ray").encode()) + _RAY_SOCKET_TAIL
    if longest <= _SOCKET_PATH_MAX:
        return None
    room = _SOCKET_PATH_MAX - _RAY_SOCKET_TAIL - len("/ray")
    if explicit:
        raise UserError(f"RAY_TMPDIR is {len(explicit.encode())} bytes long, too long for Ray's socket paths "
                        f"(at most {room} bytes): set a shorter RAY_TMPDIR ({explicit})")
    fallback = f"/tmp/ray-{os.getuid()}"
    print(f"[pipeline] TMPDIR is too long for Ray's socket paths (at most {room} bytes); this job's Ray keeps its "
          f"session in {fallback} (RAY_TMPDIR chooses another)", file=sys.stderr, flush=True)
    return fallback


def _check_splits(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """The training and validation splits as index.json lists them, for the job's smallest world size: one line
    here rather than the same error from every rank after Ray has started."""
    from pipeline.data.split import check_split

    world = cfg.scaling.min_workers if cfg.scaling.elastic else cfg.scaling.num_workers
    check_split(cfg.data.shards, manifest, "train", world)
    try:
        check_split(cfg.data.shards, manifest, cfg.data.val_split, world)
    except UserError as exc:
        if cfg.data.val_split != "val":
            raise
        raise UserError(f"{exc}: the job validates on it every epoch; shard with --val-fraction F (e.g. 0.05) "
                        "to make one, or set data.val_split=train") from None


def _check_resume(cfg: TrainConfig, manifest: dict[str, Any], storage_dir: str) -> None:
    """A job that continues from its checkpoint in ``storage_dir`` must train the model it saved, on inputs of the
    same shape and classes: otherwise every rank fails to load it, after Ray has started, and the earlier run is
    marked FAILED."""
    from pipeline.train.resume import newest_complete_meta

    try:
        newest = newest_complete_meta(storage_dir)
    except (OSError, ValueError):  # storage that cannot be listed: the job's own start says so
        return
    if newest is None:
        return
    _, meta = newest
    channels, size = _input_shape(cfg, manifest)
    now = {"model": cfg.model.name, "width": cfg.model.width, "num_classes": int(manifest["num_classes"]),
           "in_channels": channels, "image_size": size}
    differ = [f"{k} {meta[k]} (now {v})" for k, v in now.items() if k in meta and meta[k] != v]
    if differ:
        raise UserError(f"run.name={cfg.run.name} continues from its checkpoint at step {meta.get('global_step', '?')}"
                        f" in {storage_dir}, which holds a different model: {', '.join(differ)}; set those back to "
                        "continue it, or give another run.name (--init-from that checkpoint starts from its weights)")


def _check_init_from(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """A local ``--init-from`` checkpoint must fit the model and inputs (MLflow URIs: ``_check_mlflow_init_from``)."""
    src = cfg.train.init_from
    if not src or src.startswith(MLFLOW_MODEL_SCHEMES):
        return
    from pipeline.train.checkpoint import load_meta, load_state, result_weights

    meta = load_meta(src)  # UserError when the path holds no checkpoint
    state = load_state(src)  # as every worker will load it: a file that is not a checkpoint is one line here
    try:
        result_weights(state)
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"--init-from {src}: a tensors-only PyTorch file, but no checkpoint of pipeline train "
                        "(it holds no model weights)") from None
    del state
    if meta:
        _check_fits(cfg, manifest, meta.get("model"), (meta.get("in_channels"), meta.get("image_size")))


def _input_shape(cfg: TrainConfig, manifest: dict[str, Any]) -> tuple[int, int]:
    """(channels, size) of the model's inputs: the config's ``data.preset``, else the shards'."""
    from pipeline.data.presets import get_preset

    channels, size, _ = get_preset(cfg.data.preset or manifest["preset"]).output_shape()
    return channels, size


def _check_fits(cfg: TrainConfig, manifest: dict[str, Any], trained: str | None,
                inputs: tuple[Any, Any] | None) -> None:
    """``--init-from`` weights of model ``trained`` for ``inputs`` (channels, size) must suit the config and shards;
    None: not known."""
    src = cfg.train.init_from
    if trained is not None and trained != cfg.model.name:
        raise UserError(f"--init-from {src} holds a {trained} model, the config trains {cfg.model.name}: "
                        f"set model.name={trained}")
    channels, size = _input_shape(cfg, manifest)
    if inputs is not None and inputs != (channels, size):
        raise UserError(f"--init-from {src} was trained on {inputs[0]}×{inputs[1]}² inputs, "
                        f"the shards' preset gives {channels}×{size}²: set data.preset to match")


def _check_mlflow_init_from(cfg: TrainConfig, manifest: dict[str, Any], tracking_uri: str | None) -> None:
    """An MLflow ``--init-from`` must name a PyTorch model in the store the workers load it from, for the
    config's model and the shards' inputs: a typo in a run id is one error line here, not a traceback
    from every worker after Ray has started.

    Reads the model's MLmodel file (its signature holds the input shape) and, where the URI leads to
    it, the logged model's name (``pipeline train`` logs its model under ``model.name``); never the weights.
    """
    src = cfg.train.init_from
    if not src or not src.startswith(MLFLOW_MODEL_SCHEMES):
        return
    import mlflow

    from pipeline.train.models import MODEL_NAMES
    from pipeline.train.tracking import logged_model_name, missing_sqlite_store, resolve_tracking_uri, runs_uri_hint

    uri = tracking_uri or resolve_tracking_uri(None)  # the store the workers read it from
    if missing_sqlite_store(uri):
        raise UserError(f"--init-from {src}: no MLflow store at {uri}; "
                        "set tracking.tracking_uri or MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        with _environ({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):  # a bar for one small file
            info = mlflow.models.get_model_info(src)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI; all mean "no such model"
        raise UserError(f"--init-from {src}: no such model in {uri} ({first_line(exc)})"
                        f"{runs_uri_hint(src, cfg.model.name)}") from None
    if "pytorch" not in info.flavors:
        raise UserError(f"--init-from {src} is not a PyTorch model (flavors: {', '.join(sorted(info.flavors))})")
    trained = logged_model_name(mlflow.MlflowClient(uri), src)
    inputs = info.signature.inputs.inputs if info.signature and info.signature.inputs else []
    shape = tuple(getattr(inputs[0], "shape", ())) if len(inputs) == 1 else ()
    _check_fits(cfg, manifest, trained if trained in MODEL_NAMES else None,
                (shape[1], shape[2]) if len(shape) == 4 else None)


def scaling_config(cfg: TrainConfig, scaling_config_cls):
    """Ray Train's ScalingConfig: a fixed size, or ``(min_workers, num_workers)`` when elastic."""
    s = cfg.scaling
    size = (s.min_workers, s.num_workers) if s.elastic else s.num_workers
    return scaling_config_cls(num_workers=size, use_gpu=s.use_gpu, resources_per_worker=s.resources_per_worker(),
                              placement_strategy=s.placement_strategy,
                              elastic_resize_monitor_interval_s=s.resize_check_s)


# Read from the driver's environment when Ray Train starts its controller, which passes it on.
GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment while the block runs; what was there before afterwards."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _controller_env(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """The driver's environment while ``trainer.fit()`` starts the controller: ``scaling.group_start_timeout_s``."""
    timeout = cfg.scaling.group_start_timeout_s
    return _environ({} if timeout is None else {GROUP_START_TIMEOUT_ENV: str(float(timeout))})


def _create_sqlite_store(uri: str, verbose: bool = False) -> None:
    """Create (or migrate) a local SQLite store once, here, before any worker opens it.

    MLflow creates and migrates the schema on first open; several workers opening a new
    store at once, or a worker killed mid-migration, leave it half-migrated. Its INFO lines
    about doing so ("Creating initial MLflow database tables...") show only with ``--verbose``.
    """
    import mlflow

    store_log = logging.getLogger("mlflow.store.db.utils")
    level = store_log.level
    if not verbose:
        store_log.setLevel(logging.WARNING)
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    finally:
        store_log.setLevel(level)


def fit(cfg: TrainConfig, *, verbose: bool = False, console: bool = True, run_tags: dict[str, str] | None = None,
        callbacks: tuple = (), stop_requests: bool = False) -> TrainResult:
    """Train ``cfg`` on Ray Train; a job with the same ``run.name`` and storage path resumes from its checkpoint.

    ``console``: print rank 0's progress here (a sweep reports its trials itself). ``run_tags``: extra tags
    for the job's MLflow run (a sweep's parent). ``callbacks``: more Ray Train callbacks (Tune's reporter).
    ``stop_requests``: a stop request already in the job's directory is for this job (a sweep's driver
    cleared old ones before its trials started, and writes new ones on a signal), not one to remove.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.console import DriverConsole, train_log_level
    from pipeline.shard.manifest import read_manifest
    from pipeline.train.guard import Diverged, clear_divergence, diverged_message, read_divergence
    from pipeline.train.lineage import capture_code
    from pipeline.train.loop import train_loop_per_worker
    from pipeline.train.preempt import clear_checkpoint_request, clear_stop, read_stop, stop_on_signals
    from pipeline.train.ray_output import quiet_ray_output
    from pipeline.train.resume import newest_complete, newest_global_step, prune_unkept
    from pipeline.train.topology import check_nodes, index_digest
    from pipeline.train.tracking import (check_tracking_uri, default_artifact_location, find_job_run, job_run_id,
                                         resolve_tracking_uri, tracking_behind)

    cfg = resolve_paths(cfg)
    # A missing or partial shard set, or weights that cannot fit, is a user error before any worker starts.
    manifest = read_manifest(cfg.data.shards)
    storage_dir = f"{str(cfg.run.storage_path).rstrip('/')}/{cfg.run.name}"
    _check_splits(cfg, manifest)
    _check_resume(cfg, manifest, storage_dir)
    _check_init_from(cfg, manifest)
    if not ray.is_initialized():
        check_ray(cfg)
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri) if cfg.tracking.enabled else None
    artifact_location = (default_artifact_location(tracking_uri, cfg.tracking.artifact_location)
                         if tracking_uri else None)
    if tracking_uri:
        check_tracking_uri(tracking_uri)
    _check_mlflow_init_from(cfg, manifest, tracking_uri)  # first: a store that is not there holds no model
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        _create_sqlite_store(tracking_uri, verbose)
    local_storage = not is_uri(storage_dir)  # stop requests and the tracking spool are files there
    loop_config = {
        "cfg": cfg.to_dict(),
        "tracking_uri": tracking_uri,
        "artifact_location": artifact_location,
        "run_key": storage_dir,  # identifies the job's MLflow run across restarts
        "code": capture_code(),  # the commit of this checkout: `ray job submit` uploads a copy without .git
        "index_sha256": index_digest(cfg.data.shards),  # every worker's node must see this very index.json
        "run_tags": dict(run_tags or {}),
    }
    if local_storage:
        make_writable_dir(storage_dir, "run.storage_path")  # here, before Ray starts
    if local_storage and not stop_requests:
        clear_stop(storage_dir)  # a request left by the previous submission is not for this one
    if local_storage:
        clear_checkpoint_request(storage_dir)  # one a resize left behind (pipeline.train.resize)
    ensure_ray(cfg, verbose)
    if not verbose:
        quiet_ray_output()
    check_nodes(cfg.data.shards, loop_config["index_sha256"], str(cfg.run.storage_path))
    # An elastic group that grows back checkpoints first (requests are files on shared storage).
    resize_callbacks = []
    if cfg.scaling.elastic and local_storage:
        try:
            from pipeline.train.resize import CheckpointBeforeResize
        except ImportError:  # a Ray whose Train internals moved: it grows back from the latest checkpoint
            pass
        else:
            resize_callbacks.append(CheckpointBeforeResize(storage_dir, cfg.run.name))

    def trainer() -> TorchTrainer:
        made = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
            scaling_config=scaling_config(cfg, ScalingConfig),
            run_config=RunConfig(
                name=cfg.run.name,
                storage_path=str(cfg.run.storage_path),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
                failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                logging_config=LoggingConfig(log_level=train_log_level(verbose)),
                callbacks=[*callbacks, *resize_callbacks],
            ),
        )
        if signals.handled:  # Ray Train V2's fit() puts a SIGINT handler over ours: an abort, no checkpoint
            made._register_sigint_handler = lambda controller: None  # Ctrl-C stops as SIGTERM does
        return made

    with DriverConsole(enabled=console) as out, \
            stop_on_signals(storage_dir, cfg.run.preempt_timeout_s, enabled=local_storage) as signals, \
            _controller_env(cfg):
        loop_config["console"] = out.sink  # rank 0 sends its lines here; None: silent
        for callback in resize_callbacks:
            callback.console = out.sink  # and so does the controller's resize callback
        start_step = newest_global_step(storage_dir)
        clear_divergence(storage_dir)  # an earlier attempt's record is not about this one
        while True:
            try:
                result = trainer().fit()
                break
            except Exception as exc:
                reached = newest_global_step(storage_dir)
                if not _start_again(exc, cfg, reached > start_step, storage_dir if local_storage else None):
                    recorded = bool(tracking_uri) and _record_failure(storage_dir, exc)
                    raise JobFailed(_failed_line(cfg, exc, reached, recorded)) from exc
                out.say(f"[pipeline] {cfg.run.name}: Ray Train gave up after {_failures(cfg)}; the job "
                        f"checkpointed step {reached} since its last start (step {max(start_step, 0)}), so it starts "
                        f"again from there ({_failure_text(exc)[:200]})")
                start_step = reached
    # Checkpoints Ray Train never registered (a node lost mid-upload) are not in its count to keep.
    prune_unkept(storage_dir, [c.path for c, _ in result.best_checkpoints or []])
    diverged = read_divergence(storage_dir)  # the workers ended the job on NaN/inf weights
    if diverged is not None:
        newest = newest_complete(storage_dir) if local_storage else None  # a path --init-from reads
        raise Diverged(diverged_message(str(cfg.run.name), diverged, newest_global_step(storage_dir), newest))
    # A stop asked for as the job was ending anyway is no stop: the last report says which it was.
    stopped = read_stop(storage_dir) if local_storage and result.metrics.get("stopped") else None
    # The run id from the job's tracking spool: no call to a tracking server that may be down.
    run_id = job_run_id(storage_dir) if tracking_uri else None
    if tracking_uri and run_id is None and not local_storage:  # the spool is on rank 0's node
        run = find_job_run(tracking_uri, cfg.tracking.experiment, storage_dir)
        run_id = run.info.run_id if run else None
    return TrainResult(
        run_name=str(cfg.run.name),
        metrics=dict(result.metrics or {}),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        storage_dir=storage_dir,
        mlflow_run_id=run_id,
        tracking_uri=tracking_uri,
        stopped=stopped,
        tracking_behind=tracking_behind(storage_dir) if tracking_uri and local_storage else None,
    )


def _start_again(exc: Exception, cfg: TrainConfig, progressed: bool, local_storage_dir: str | None) -> bool:
    """Whether ``fit`` starts the job again after Ray Train gave up on it.

    Ray Train counts ``run.max_failures`` over the whole job: a job that runs for days would end at
    its third worker fault even if weeks of checkpoints lay between them. So the count starts again
    whenever the job checkpointed since its last start, and ends it only when ``max_failures + 1``
    failures come without a new checkpoint in between (a fault that recurs before the next one). Only
    worker failures count so; a failure of Ray Train's controller, or after the driver was asked to stop,
    ends it. A stop a worker asked for does not: Ray tears a failed group down with SIGTERM to the ranks
    still waiting for the failed one, which their handler takes for a preemption, and the new attempt is a
    new group, which drops such a request anyway (``preempt.drop_worker_stop``). A preemption that ended in
    a failure rather than a stop checkpoint is retried, as Ray Train retries preemptions.
    """
    try:
        from ray.train import WorkerGroupError
    except ImportError:  # a Ray Train without it: its own count applies
        return False

    from pipeline.train.preempt import drop_worker_stop, read_stop

    if not progressed or not isinstance(exc, WorkerGroupError) or cfg.run.max_failures < 0:
        return False
    if local_storage_dir is None:
        return True
    drop_worker_stop(local_storage_dir)
    return read_stop(local_storage_dir) is None  # the driver's own stop (a signal to it) ends the job


def _failures(cfg: TrainConfig) -> str:
    n = cfg.run.max_failures + 1
    return f"{n} failure{'s' if n > 1 else ''} (run.max_failures={cfg.run.max_failures})"


_PROCESS_DIED = re.compile(r"worker process has died\. Worker exit type: (\w+)")


def _rank_error(error: Exception) -> str:
    """A rank's error in a line; for a rank whose process died (Ray's health check found it gone), how it died.

    Ray says only "A worker health check failed." and, further down, an exit type; the fatal signal
    and the function it struck in are in the dump the process printed, which ``ray_output`` noted.
    """
    text = str(error)
    died = _PROCESS_DIED.search(text)
    pid, ip = re.search(r"\bpid=(\d+)", text), re.search(r"\bnode_ip='([^']+)'", text)
    if not (died and pid and ip):
        return ANSI_COLOUR.sub("", described(error))
    from pipeline.train.ray_output import crash_of

    how = crash_of(ip.group(1), pid.group(1)) or \
        f"Ray's exit type {died.group(1)}: a crash such as SIGSEGV, or the OOM killer; its last lines say which"
    return f"its process (pid {pid.group(1)} on {ip.group(1)}) died: {how}"


# A rank's collective that lost its peer: what the surviving ranks raise when another rank's process or node died.
_PEER_LOST = re.compile(r"gloo/transport|Connection (reset|closed) by peer|Broken pipe|NCCL communicator was aborted|"
                        r"remote process exited|DistNetworkError")


def _first_failure(failures: dict) -> tuple[Any, Exception]:
    """The failed rank whose error is the cause: a rank whose process died before one whose collective only lost
    that peer (which Ray Train also lists, often under a lower rank), then the lowest rank."""
    def order(item: tuple[Any, Exception]) -> tuple[int, int, str]:
        rank, error = item
        text = str(error)
        kind = 0 if _PROCESS_DIED.search(text) else 2 if _PEER_LOST.search(text) else 1
        return kind, int(rank) if str(rank).isdigit() else 0, str(rank)

    return min(failures.items(), key=order)


def _failure_text(exc: Exception) -> str:
    """The failed rank's own error that caused the rest (``_first_failure``), or the controller's (Ray's wrappers
    only say which of them failed)."""
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        rank, error = _first_failure(failures)
        return f"rank {rank}: {_rank_error(error)}"
    controller = getattr(exc, "controller_failure", None)
    if controller is not None:
        return f"Ray Train's controller: {ANSI_COLOUR.sub('', described(controller))}"
    return described(exc)


_NO_SPACE = re.compile(r"No space left on device|Disk quota exceeded|\[Errno (28|122)\]")


def _failed_line(cfg: TrainConfig, exc: Exception, newest_step: int, tracked: bool) -> str:
    """What the driver says when Ray Train gave up: the error of the failed rank that caused it
    (``_first_failure``), what is kept, what to do."""
    failures = getattr(exc, "worker_failures", None) or {}
    what = _failure_text(exc)[:300]
    cause = f"Ray Train gave up after {_failures(cfg)} ({what})" if failures else what
    hint = ""
    if any(_NO_SPACE.search(str(e)) for e in (exc, *failures.values())):
        hint = (f"; a disk is full: free space under run.storage_path ({cfg.run.storage_path}) or the workers' "
                f"TMPDIR, or lower run.checkpoints_to_keep")
    elif " in dali::" in what:  # DALI's decoders may crash on corrupt image data rather than raise
        hint = f"; a corrupt image can crash DALI: `pipeline verify --decode {cfg.data.shards}` names it"
    kept = (f"the newest complete checkpoint is step {newest_step}: run the same command again to continue from it"
            if newest_step >= 0 else "no checkpoint was written")
    return (f"job {cfg.run.name} failed: {cause}{hint}; {kept}"
            f"{'; its MLflow run is FAILED' if tracked else ''} (--verbose shows the workers' tracebacks)")


def _record_failure(storage_dir: str, exc: Exception) -> bool:
    """The job failed for good: end its MLflow run FAILED, even if rank 0 was killed before it could; False when
    the job never started tracking (no MLflow run to end).

    The record goes through the job's tracking spool, after whatever rank 0 left unsent; if the
    server is unreachable it stays there for the next start or ``pipeline tracking sync``.
    """
    import time

    from pipeline.train.tracking import spool_dir_for
    from pipeline.train.tracking_queue import Spool, read_job, sync

    spool = spool_dir_for(storage_dir)
    if not read_job(spool):
        return False  # tracking never started
    reason = _failure_text(exc)[:500]  # the failed rank's own error, not Ray's wrapper
    try:
        Spool(spool).append([{"t": "end", "status": "FAILED", "reason": reason, "ts": int(time.time() * 1000)}])
        sync(spool)
    except Exception:  # noqa: BLE001 - an unreachable server must not hide the job's own error
        pass
    return True


def summary(res: TrainResult) -> str:
    """Lines printed at the end of ``pipeline train``: test accuracy and where to look next."""
    from pipeline.train.tracking import ui_hint

    m = res.metrics
    lines = []
    if "val_top1" in m:
        top5 = m.get("val_top5", float("nan"))
        lines.append(f"test accuracy (val split): top-1 {m['val_top1']:.4f}, top-5 {top5:.4f} "
                     f"after epoch {m.get('epoch', '?')}")
    if res.checkpoint_path:
        lines.append(f"checkpoint: {res.checkpoint_path}")
    if res.mlflow_run_id:
        lines.append(f"MLflow run {res.mlflow_run_id} ({res.run_name}); view it with: {ui_hint(res.tracking_uri)}")
    lines.append(f"resume or extend this job: --set run.name={res.run_name} --set train.epochs=N")
    if res.tracking_behind:
        lines.append(res.tracking_behind)  # last, where it is seen
    return "\n".join(lines)


__all__ = ["JobFailed", "TrainResult", "fit", "resolve_paths", "summary"]
