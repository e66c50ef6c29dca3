"""Training throughput: Ray Train against the same loop under torchrun, one process per case, interleaved.

Every case runs ``pipeline.train.step.TrainStep`` built from one config (the bundled
``fashion_mnist`` job at the benchmark's batch: model, memory format, precision, torch
threads, loader and its threads, warm-up epoch), so a ratio differs in exactly one thing:

* ``plain-loop``       one process, no DDP: the loop below (``setup_torch`` → ``make_loader`` → ``TrainStep``).
* ``synthetic``        the same process and loop on one in-memory batch: the ceiling without data loading.
* ``torchrun-Nw``      the same loop under ``torch.distributed.run`` (DDP over gloo), N processes: the baseline
                       for Ray's overhead at equal world size.
* ``ray-Nw``           ``pipeline.train.launch.fit`` with N Ray workers (the worker loop, which calls the same
                       ``TrainStep``). Goal: ≥ 0.95 × ``torchrun-Nw``.
* ``torchrun-2w-beside-ray``  ``torchrun-2w`` while a Ray Train job that does no work runs beside it: Ray
                       started as ``fit`` starts it, the same scaling, 2 workers that sleep. Against
                       ``torchrun-2w``: what Ray's own processes cost the ranks; ``ray-2w`` against it: what
                       is left, Ray inside the ranks' processes and the worker loop.
* ``plain-loop-glibc-malloc``  the plain loop with glibc's malloc as it comes (``PIPELINE_KEEP_FREED_MEMORY=0``):
                       what ``pipeline.train.hostmem`` is worth.
* ``plain-loop-bf16`` / ``plain-loop-fp32``  the plain loop with ``train.precision`` bf16 (autocast) and fp32:
                       what ``precision: auto`` chooses between (bf16 on CPUs with AMX, ``pipeline.train.step``).
* ``plain-loop-ema``   the plain loop keeping a moving average of the weights (``train.ema_decay``): its cost.

ResNet-50 on a GPU is ``pipeline bench gpu`` (``benchmarks.gpu_bench``).

Each case is a fresh process and each repeat a separate run; cases are interleaved (A B C … A B C …)
so drift in the machine's load hits all of them. A run's figure is images/s summed over ranks,
over the epochs after the first (warm-up: threads, allocator, DALI pipeline), counting only the
training steps (data wait included, evaluation and start-up not).

Where the machine's CPU went: while a case runs, the bench samples the CPU time of the case's
process tree twice a second, split into the training ranks (the Ray Train workers; the loop's own
processes otherwise) and everything else (the Ray driver, raylet, GCS, dashboard, Ray Train's
controller and helper actors, torchrun's agent). Over the timed epochs (from the end of the first
to the end of the last: for Ray, the epochs' checkpoint times, so its window also holds validation
and checkpointing) it reports each as a share of all cores: ``cpu_ranks`` and ``cpu_other``.

    python -m benchmarks.train_bench [--quick] [--workdir DIR] [--cases plain-loop,ray-2w,...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import FASHION_MNIST, HostLoad, Ratio, Result, machine_info, now_utc, print_steal_note, ratio
from benchmarks.report import report_if_asked, stage_options
from pipeline.errors import UserError
from pipeline.train import hostmem

MODEL = "seed_cnn"
BATCH = 256  # per worker


def _shards(workdir: Path, limit: int | None) -> Path:
    from pipeline.cli import main

    out = workdir / f"fm-{limit or 'all'}"
    if not (out / "index.json").exists():
        args = ["shard", str(FASHION_MNIST), str(out), "--no-progress"] + (["--limit", str(limit)] if limit else [])
        if main(args) != 0:
            raise RuntimeError(f"sharding {FASHION_MNIST} failed")
    return out


def bench_config(shards: Path, workdir: Path, workers: int, epochs: int, extra: list[str] = ()):
    """The one config every case trains with; only ``scaling.num_workers`` (and run names) differ, plus a
    case's own ``extra`` overrides (``CASE_SET``)."""
    from pipeline.train.config import load_config

    return load_config("fashion_mnist", [
        f"data.shards={shards}", f"run.name=bench-{workers}w-{os.getpid()}-{int(time.time() * 1000)}",
        f"run.storage_path={workdir / 'ray_results'}", f"train.epochs={epochs}", f"train.batch_size={BATCH}",
        f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1", "scaling.torch_threads=1",
        f"run.checkpoints_to_keep={epochs}", "tracking.enabled=false", "train.log_every_steps=1000000", *extra,
    ])


def loader_threads(world: int) -> int:
    """DALI threads per rank: the node's cores shared by its ranks, as the Ray worker loop's layout gives."""
    return max(1, (os.cpu_count() or 1) // world)


def settings(cfg, world: int) -> dict[str, Any]:
    """What a case's training step is made of, from its config: equal across cases of one world size."""
    from pipeline.train.step import resolve_precision

    return {"model": cfg.model.name, "channels_last": cfg.model.channels_last,
            "precision": resolve_precision(cfg.train.precision, "cpu"),
            "batch_per_worker": cfg.train.batch_size, "torch_threads": cfg.scaling.torch_threads,
            "loader_threads": loader_threads(world), "backend": cfg.data.backend, "augment": cfg.train.augment,
            "optimizer": cfg.optim.name, "compile": cfg.model.compile, "ema_decay": cfg.train.ema_decay,
            "world_size": world, "keep_freed_memory": hostmem.wanted()}


# --- the cases' own processes -------------------------------------------------------------------------------


def _loop(cfg, rank: int, world: int, synthetic: bool) -> tuple[list[float], dict[str, Any], list[float]]:
    """Per-epoch images/s of this rank, the settings the step really ran with (read back from it), and the
    unix time at the end of each epoch."""
    import torch

    from pipeline.data import make_loader
    from pipeline.data.presets import get_preset
    from pipeline.metrics import ThroughputMeter
    from pipeline.train.models import build_model
    from pipeline.train.step import TrainStep, WarmupCosine, build_optimizer, loader_device, setup_torch

    device = torch.device("cpu")
    setup_torch(cfg, device)
    loader = make_loader(cfg.data.shards, "train", batch_size=cfg.train.batch_size, rank=rank, world_size=world,
                         backend=cfg.data.backend, device=loader_device(cfg.data.device, device),
                         preset=cfg.data.preset, seed=cfg.train.seed, threads=loader_threads(world))
    channels, size, _ = get_preset(loader.preset).output_shape()
    model = build_model(cfg.model.name, loader.num_classes, channels, size, cfg.model.dropout, cfg.model.width)
    model = model.to(device, memory_format=torch.channels_last if cfg.model.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg.optim)
    steps = len(loader)
    schedule = WarmupCosine(optimizer, cfg.optim, cfg.train.epochs * steps, steps)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    step = TrainStep.from_config(model, optimizer, cfg, device, schedule)
    fixed = next(iter(loader)) if synthetic else None
    rates, ends = [], []
    for epoch in range(cfg.train.epochs):
        loader.set_epoch(epoch)
        model.train()
        meter = ThroughputMeter()
        meter.start()
        for x, y in ((fixed for _ in range(steps)) if synthetic else loader):
            meter.data_ready()
            loss = step(x, y)
            meter.step_done(y.shape[0])
        loss.item()  # host sync before the epoch's clock is read (a no-op on the CPU)
        rates.append(meter.total().images_per_s)
        ends.append(time.time())
    # Read back from the objects that ran, not from the config: what the test compares across cases.
    seen = {"model": cfg.model.name, "channels_last": step.memory_format == torch.channels_last,
            "precision": step.precision, "batch_per_worker": loader.plan.batch_size,
            "torch_threads": torch.get_num_threads(), "loader_threads": loader_threads(world),
            "backend": cfg.data.backend, "augment": step.augment, "optimizer": type(optimizer).__name__.lower(),
            "compile": step.step_model is not step.model, "ema_decay": step.ema.decay if step.ema else None,
            "world_size": world, "keep_freed_memory": hostmem.wanted()}
    return rates, seen, ends


def _run_case(args: argparse.Namespace) -> None:
    """Entry of one case's process: train, then write ``{"rates": [...], "settings": {...}}`` to ``--out``."""
    from pipeline.fileio import write_atomic

    cfg = bench_config(args.shards, args.workdir, args.workers, args.epochs, args.overrides)
    if args.case == IDLE_RAY:
        _idle_ray_job(cfg, args.out)
        return
    if args.case == "ray":
        from pipeline.train.checkpoint import META_FILE, load_meta
        from pipeline.train.launch import fit

        res = fit(cfg, console=False)
        done = sorted(((load_meta(p), (p / META_FILE).stat().st_mtime)
                       for p in Path(res.storage_dir).glob("checkpoint_*") if p.is_dir()), key=lambda m: m[0]["epoch"])
        out = {"rates": [m["metrics"]["train_images_per_s"] for m, _ in done], "settings": settings(cfg, args.workers),
               "epoch_ends": [t for _, t in done]}
    elif args.case == "ddp":
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        rates, seen, ends = _loop(cfg, rank, world, synthetic=False)
        total = torch.tensor(rates, dtype=torch.float64)
        dist.all_reduce(total)  # images/s over all ranks, as the Ray loop reports it
        dist.destroy_process_group()
        if rank != 0:
            return
        out = {"rates": total.tolist(), "settings": seen, "epoch_ends": ends}
    else:
        rates, seen, ends = _loop(cfg, 0, 1, synthetic=args.case == "synthetic")
        out = {"rates": rates, "settings": seen, "epoch_ends": ends}
    write_atomic(args.out, lambda f: f.write(json.dumps(out).encode()))


def _idle_ray_job(cfg, ready: Path) -> None:
    """A Ray Train job as ``fit`` runs one (its local Ray with the dashboard, the config's scaling, gloo) whose
    workers only sleep. Rank 0 creates ``ready`` once the workers run; the job ends when ``<ready>.stop`` appears."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.launch import ensure_ray, scaling_config
    from pipeline.train.ray_output import quiet_ray_output

    ensure_ray(cfg)
    quiet_ray_output()
    TorchTrainer(_sleep_until_stopped, train_loop_config={"ready": str(ready)},
                 torch_config=TorchConfig(backend="gloo"), scaling_config=scaling_config(cfg, ScalingConfig),
                 run_config=RunConfig(name=cfg.run.name, storage_path=str(cfg.run.storage_path))).fit()


def _stop_file(ready: Path) -> Path:
    """The file that ends the idle Ray job whose workers created ``ready``."""
    return ready.with_name(ready.name + ".stop")


def _sleep_until_stopped(config: dict[str, str]) -> None:
    """The idle job's training function: wakes twice a second to look for the stop file."""
    import ray.train

    ready = Path(config["ready"])
    stop = _stop_file(ready)
    if ray.train.get_context().get_world_rank() == 0:
        ready.touch()
    while not stop.exists():
        time.sleep(0.5)


@contextlib.contextmanager
def _beside_idle_ray(workers: int, shards: Path, workdir: Path, env: dict[str, str]):
    """Runs ``_idle_ray_job`` in a process (and session, as every case has) of its own until the block ends;
    yields its pid once its workers run."""
    ready = workdir / f"idle-ray-{time.time_ns()}"
    stop = _stop_file(ready)
    log = ready.with_name(ready.name + ".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(_command(IDLE_RAY, workers, shards, workdir, 1, ready), env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the idle Ray job did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield proc.pid
        stop.touch()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)  # its own session: Ray's processes with it
            proc.wait()
    for path in (ready, stop, log):
        path.unlink(missing_ok=True)


# --- the driver ----------------------------------------------------------------------------------------------


def _command(case: str, workers: int, shards: Path, workdir: Path, epochs: int, out: Path,
             extra: list[str] = ()) -> list[str]:
    tail = ["--case", case, "--workers", str(workers), "--shards", str(shards), "--workdir", str(workdir),
            "--epochs", str(epochs), "--out", str(out), *(f"--set={o}" for o in extra)]
    if case == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
                "--module", "benchmarks.train_bench", *tail]
    return [sys.executable, "-m", "benchmarks.train_bench", *tail]


# Cases run while a Ray Train job of this many workers that do nothing runs beside them (``_idle_ray_job``).
BESIDE_IDLE_RAY = {"torchrun-2w-beside-ray": 2}
IDLE_RAY = "idle-ray"  # the --case of that job's process
# Environment a case runs with on top of the bench's own; everything else equal to its kind's cases.
CASE_ENV = {"plain-loop-glibc-malloc": {hostmem.ENV_VAR: "0"}}
# Config overrides a case trains with on top of ``bench_config``'s.
CASE_SET = {"plain-loop-bf16": ["train.precision=bf16"], "plain-loop-fp32": ["train.precision=fp32"],
            "plain-loop-ema": ["train.ema_decay=0.999"]}


def cases(quick: bool, only: list[str] | None = None) -> list[tuple[str, str, str, int]]:
    """(name, role, kind, world size) in the order each round runs them; ``only``: those cases alone."""
    out = [("plain-loop", "baseline", "plain", 1), ("synthetic", "limit", "synthetic", 1),
           ("torchrun-2w", "baseline", "ddp", 2), ("plain-loop-bf16", "case", "plain", 1)]
    if not quick or only:  # Ray's start-up alone costs 15-30 s on a small machine; its path has its own tests
        out += [("plain-loop-fp32", "baseline", "plain", 1), ("ray-1w", "case", "ray", 1),
                ("ray-2w", "case", "ray", 2), ("torchrun-2w-beside-ray", "baseline", "ddp", 2),
                ("plain-loop-glibc-malloc", "baseline", "plain", 1),
                ("plain-loop-ema", "case", "plain", 1)]
    if only:
        unknown = sorted(set(only) - {name for name, *_ in out})
        if unknown:
            raise UserError(f"--cases: no case {', '.join(unknown)}; cases: {', '.join(name for name, *_ in out)}")
        out = [c for c in out if c[0] in only]
    return out


class _CpuSampler:
    """CPU seconds of a process tree, split into training ranks and the rest, sampled in a thread.

    The rest is also kept per kind of process (``ray::PlacementGroupCleaner``, ``raylet``, the
    dashboard's modules...), so a report says which of them the ranks' missing share went to.
    """

    RANK = "ranks"

    def __init__(self, pid: int, kind: str, period_s: float = 0.5) -> None:
        import threading

        self.pid, self.kind, self.period_s = pid, kind, period_s
        self.samples: list[tuple[float, dict[str, float]]] = []  # (unix time, CPU s per kind of process)
        self._last: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU s): keeps exited processes' time
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _kind_of(self, cmdline: list[str]) -> str:
        """``ranks`` for a training rank, else a short name for the kind of process (an idle Ray job has no ranks)."""
        line = " ".join(cmdline)
        if self.kind == "ray":
            rank = "RayTrainWorker" in line
        else:
            rank = self.kind != IDLE_RAY and "benchmarks.train_bench" in line and "torch.distributed.run" not in line
        if rank:
            return self.RANK
        if line.startswith("ray::"):
            return line.split()[0]
        if line.startswith("ray-dashboard-"):
            return "dashboard modules"
        script = next((a for a in cmdline[1:] if a.endswith(".py")), cmdline[0] if cmdline else "?")
        return script.rsplit("/", 1)[-1]

    def _sample(self) -> None:
        import collections

        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    kind = self._kind_of(p.cmdline())  # read each time: a Ray worker starts as ray::IDLE
                self._last[p.pid] = (kind, t.user + t.system)
            except psutil.Error:
                continue
        totals: dict[str, float] = collections.Counter()
        for kind, cpu in self._last.values():
            totals[kind] += cpu
        self.samples.append((time.time(), dict(totals)))

    def _run(self) -> None:
        while not self._done.wait(self.period_s):
            self._sample()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def by_kind(self, start: float, end: float, cores: int) -> dict[str, float]:
        """Each kind of process's CPU between the samples nearest ``start`` and ``end``, as a share of all cores."""
        if len(self.samples) < 2 or end <= start:
            return {}
        a = min(self.samples, key=lambda x: abs(x[0] - start))
        b = min(self.samples, key=lambda x: abs(x[0] - end))
        wall = (b[0] - a[0]) * cores
        if wall <= 0:
            return {}
        return {k: (cpu - a[1].get(k, 0.0)) / wall for k, cpu in b[1].items()}

    def shares(self, start: float, end: float, cores: int) -> dict[str, float]:
        """Ranks' and others' CPU between the samples nearest ``start`` and ``end``, as shares of all cores."""
        return self.split(self.by_kind(start, end, cores))

    @classmethod
    def split(cls, kinds: dict[str, float]) -> dict[str, float]:
        """``by_kind``'s shares summed into the ranks' (``cpu_ranks``) and everything else's (``cpu_other``)."""
        if not kinds:
            return {}
        return {"cpu_ranks": kinds.get(cls.RANK, 0.0), "cpu_other": sum(v for k, v in kinds.items() if k != cls.RANK)}


def _top_kinds(shares: dict[str, list[float]], runs: int, floor: float = 0.002) -> dict[str, float]:
    """Median share of all cores per kind of process over the runs (0 where a run had none), largest first."""
    medians = {k: statistics.median(v + [0.0] * (runs - len(v))) for k, v in shares.items()}
    return {k: round(v, 4) for k, v in sorted(medians.items(), key=lambda kv: -kv[1]) if v >= floor}


def _one(name: str, kind: str, workers: int, shards: Path, workdir: Path, epochs: int) -> dict[str, Any]:
    out = workdir / f"case-{name}-{time.time_ns()}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]), **CASE_ENV.get(name, {}))
    # A session of its own: with the kernel's autogroup scheduling, CPU under contention is shared per
    # session, so every case gets one share, whatever else the benchmark's own session runs.
    command = _command(kind, workers, shards, workdir, epochs, out, CASE_SET.get(name, []))
    with contextlib.ExitStack() as beside:
        samplers = []
        if name in BESIDE_IDLE_RAY:
            idle = beside.enter_context(_beside_idle_ray(BESIDE_IDLE_RAY[name], shards, workdir, env))
            samplers.append(_CpuSampler(idle, IDLE_RAY))
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        samplers.append(_CpuSampler(proc.pid, kind))
        try:
            stdout, stderr = proc.communicate(timeout=1800)
        finally:
            for sampler in samplers:
                sampler.stop()
            if proc.poll() is None:
                proc.kill()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"case {name} exited with {proc.returncode}: {(stderr or stdout)[-2000:]}")
    data = json.loads(out.read_text())
    out.unlink()
    ends = data.get("epoch_ends", [])
    kinds: dict[str, float] = {}
    for sampler in samplers if len(ends) > 1 else []:  # the case's processes and those of a Ray job beside it
        for what, share in sampler.by_kind(ends[0], ends[-1], os.cpu_count() or 1).items():
            kinds[what] = kinds.get(what, 0.0) + share
    data["cpu"] = _CpuSampler.split(kinds)
    data["cpu_by_process"] = {k: v for k, v in kinds.items() if k != _CpuSampler.RANK}
    return data


def run(*, quick: bool = False, workdir: Path | None = None, repeats: int | None = None,
        images: int | None = None, only: list[str] | None = None) -> list[Result]:
    """Each repeat runs every case (or those ``only`` names) once, in a fresh process, in the same order
    (interleaved rounds)."""
    own = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="train-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        images = images or (1024 if quick else 16384)
        shards = _shards(workdir, images)
        epochs = 2 if quick else 3
        repeats = repeats or (1 if quick else 3)
        plan = cases(quick, only)
        rates: dict[str, list[float]] = {name: [] for name, *_ in plan}
        seen: dict[str, dict[str, Any]] = {}
        cpu: dict[str, dict[str, list[float]]] = {name: {} for name, *_ in plan}
        others: dict[str, dict[str, list[float]]] = {name: {} for name, *_ in plan}  # per kind of process
        host = HostLoad()
        for _ in range(repeats):
            for name, _, kind, workers in plan:
                with host.run(name):
                    data = _one(name, kind, workers, shards, workdir, epochs)
                warm = data["rates"][1:] or data["rates"]
                rates[name].append(statistics.fmean(warm))
                shares = "".join(f", {k} {v:.0%}" for k, v in data["cpu"].items())
                steal = host.steal.get(name, [float("nan")])[-1]
                print(f"[train bench] {name}: {rates[name][-1]:.1f} images/s (load average {host.load[-1]:.1f}, "
                      f"steal {steal:.0%}{shares})", file=sys.stderr, flush=True)
                seen[name] = data["settings"]
                for key, share in data["cpu"].items():
                    cpu[name].setdefault(key, []).append(round(share, 3))
                for key, share in data["cpu_by_process"].items():
                    others[name].setdefault(key, []).append(share)
        results = []
        for name, role, kind, workers in plan:
            params = {**seen[name], "epochs_measured": epochs - 1, "runs": repeats, "images": images,
                      **host.params(name), **cpu[name]}
            if cpu[name]:
                params["cpu_other_by_process"] = _top_kinds(others[name], repeats)
            if name in BESIDE_IDLE_RAY:
                params["beside_idle_ray_workers"] = BESIDE_IDLE_RAY[name]
            if kind in ("ray", "ddp"):
                series = "ray train" if kind == "ray" else "torchrun"
                params.update(scaling=workers, series=series + (" beside idle Ray" if name in BESIDE_IDLE_RAY else ""))
            results.append(Result("train", name, role, "images_per_s", "images/s", rates[name], params))
        return results
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


# (label, case, against, goal): each reported where both cases ran.
RATIOS = [
    ("real loader / synthetic batches", "plain-loop", "synthetic", None),
    ("ray 1 worker / plain loop", "ray-1w", "plain-loop", 0.95),
    ("ray 2 workers / torchrun 2", "ray-2w", "torchrun-2w", 0.95),
    ("ray 2 workers / 1 worker", "ray-2w", "ray-1w", None),
    ("torchrun 2 beside an idle Ray Train job / torchrun 2", "torchrun-2w-beside-ray", "torchrun-2w", None),
    ("ray 2 workers / torchrun 2 beside an idle Ray Train job", "ray-2w", "torchrun-2w-beside-ray", None),
    ("torchrun 2 / plain loop", "torchrun-2w", "plain-loop", None),
    ("plain loop bf16 autocast / fp32", "plain-loop-bf16", "plain-loop-fp32", None),
    ("plain loop / the same with glibc's default malloc", "plain-loop", "plain-loop-glibc-malloc", None),
    ("plain loop with a weight average / without", "plain-loop-ema", "plain-loop", None),
]


def goals(results: list[Result]) -> list[Ratio]:
    """Ray overhead at equal world size (goal ≥ 0.95), loader vs synthetic, 1 → 2 scaling and the one-setting
    cases against their baselines, where measured."""
    found = {r.case for r in results}
    return [ratio(results, label, case, against, metric="images_per_s", goal=goal)
            for label, case, against, goal in RATIOS if {case, against} <= found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stage_options(parser, quick="1024 images, 2 epochs, no Ray cases: checks it runs",
                  workdir="keep shards and Ray results here")
    parser.add_argument("--images", type=int, default=None, help="training images (default 16384, quick 1024)")
    parser.add_argument("--cases", default=None, metavar="A,B,...",
                        help="run only these cases, interleaved as usual (e.g. plain-loop,plain-loop-ema)")
    parser.add_argument("--case", choices=["plain", "synthetic", "ddp", "ray", IDLE_RAY], help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        _run_case(args)
        return 0
    started, t0 = now_utc(), time.perf_counter()
    only = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    try:
        cases(args.quick, only)
    except UserError as exc:
        print(f"train bench: error: {exc}", file=sys.stderr)
        return 2
    results = run(quick=args.quick, workdir=args.workdir, repeats=args.repeats, images=args.images, only=only)
    report_if_asked("train", "benchmarks.train_bench", args, results, goals(results), started=started,
                    seconds=time.perf_counter() - t0)
    print(json.dumps(machine_info()))
    for r in results:
        print(f"{r.case:<28} median {r.median:10.1f} {r.unit:<9} ±{r.spread:.0%}  n={len(r.values)}  "
              f"{[round(v) for v in r.values]}")
    for g in goals(results):
        print(g.line())
    print_steal_note(results)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
