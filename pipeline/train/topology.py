"""Where the workers run, and whether every node sees the data.

Two checks with one probe: ``check_nodes`` (on the driver, before Ray Train
starts) runs ``probe`` once on every alive node and fails the job at once,
naming each node that cannot read the shards or write ``run.storage_path``;
``setup_worker`` (every rank, at start and after every restart or resize) runs
the same probe on its own node, then gathers the worker layout (world rank, node
IP, node rank, local rank, device, loader threads) that rank 0 prints and logs.

A node's loader threads are that node's Ray CPUs divided by the ranks on it, so
ranks sharing a node do not oversubscribe it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import ANSI_COLOUR, UserError, described, first_line
from pipeline.fileio import is_uri
from pipeline.shard.manifest import size_problem

PROBE_TIMEOUT_S = 180.0  # a node that cannot start a task in this time is as good as missing


def index_digest(shards: Path) -> str:
    """sha256 of ``index.json``: what the driver planned with, and every node must see the same."""
    return hashlib.sha256((Path(shards) / "index.json").read_bytes()).hexdigest()


def probe(shards: str, index_sha256: str, storage: str) -> str | None:
    """On this node: None if it sees the planned ``index.json``, every shard it lists is readable and of the
    listed size, and ``storage`` is writable; else the problem."""
    index = Path(shards) / "index.json"
    try:
        data = index.read_bytes()
    except OSError as exc:
        return f"cannot read {index}: {exc.strerror or exc}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != index_sha256:
        return f"{index} differs from the one the job was planned with (sha256 {digest[:12]} != {index_sha256[:12]})"
    import json

    for split in json.loads(data).get("splits", {}).values():
        for shard in split.get("shards", []):
            for name in (shard["tar"], shard["index"]):
                if not os.access(Path(shards) / name, os.R_OK):
                    return f"cannot read {Path(shards) / name}, listed in {index}"
            problem = size_problem(shards, shard)  # a copy an interrupted sync left short, or one written over
            if problem:
                return problem
    if is_uri(storage):
        return None  # object storage: Ray Train's own client reports access errors
    try:
        Path(storage).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=storage, prefix=".pipeline-probe-"):
            pass
    except OSError as exc:
        return f"cannot write to run.storage_path {storage}: {exc.strerror or exc}"
    return None


def check_nodes(shards: Path, index_sha256: str, storage: str) -> int:
    """Probe every alive node of the connected Ray cluster; ``UserError`` naming each failing node. Returns the count."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(probe)
    refs = {}
    for node in ray.nodes():
        if node.get("Alive"):
            where = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            refs[node["NodeManagerAddress"]] = task.options(scheduling_strategy=where).remote(
                str(shards), index_sha256, storage)
    problems = []
    for ip, ref in refs.items():
        try:
            problem = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            problem = f"no answer within {PROBE_TIMEOUT_S:.0f} s"
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)  # a RayTaskError's own exception: say it, not Ray's wrapper
            first = (described(cause) if isinstance(cause, Exception)
                     else first_line(exc))
            problem = f"check failed: {ANSI_COLOUR.sub('', first)}"
        if problem:
            problems.append(f"node {ip}: {problem}")
    if problems:
        raise UserError("every node must see the shards and the storage path; " + "; ".join(problems))
    return len(refs)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The worker group as rank 0 sees it after the gather."""

    workers: list[dict[str, Any]]  # one entry per world rank, in rank order
    loader_threads: int  # this rank's

    @property
    def nodes(self) -> int:
        return len({w["node_ip"] for w in self.workers})

    def lines(self) -> list[str]:
        world = len(self.workers)
        return [f"rank {w['world_rank']}/{world}: node {w['node_ip']} (node rank {w['node_rank']}), "
                f"local rank {w['local_rank']}/{w['local_world_size']}, {w['device']}, "
                f"{w['loader_threads']} loader thread(s)" for w in self.workers]

    def log(self, tracker, epoch: int) -> None:
        """``workers.json`` and the tags ``pipeline.nodes`` / ``pipeline.world_size`` (rank 0's tracker)."""
        tracker.log_dict({"world_size": len(self.workers), "nodes": self.nodes, "from_epoch": epoch + 1,
                          "workers": self.workers}, "workers.json")
        tracker.set_tags({"pipeline.nodes": str(self.nodes), "pipeline.world_size": str(len(self.workers)),
                          f"pipeline.world_size_from_epoch_{epoch + 1}": str(len(self.workers))})


def setup_worker(cfg, loop_config: dict[str, Any]):
    """Check this node sees the data, gather the layout (rank 0 prints it), scale lr to the live world when elastic.

    Returns ``(cfg, layout)``. The error names this node: a node without the data
    fails its worker at once instead of hanging in the first collective.
    """
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    node_ip = ray.util.get_node_ip_address()
    expected = loop_config.get("index_sha256") or index_digest(cfg.data.shards)
    problem = probe(str(cfg.data.shards), expected, str(cfg.run.storage_path))
    if problem:
        raise UserError(f"node {node_ip}: {problem}")
    node_id = ray.get_runtime_context().get_node_id()
    node_cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node_id), 1)
    threads = max(1, int(node_cpus) // max(ctx.get_local_world_size(), 1))
    mine = {"world_rank": ctx.get_world_rank(), "node_ip": node_ip, "node_rank": ctx.get_node_rank(),
            "local_rank": ctx.get_local_rank(), "local_world_size": ctx.get_local_world_size(),
            "device": str(ray.train.torch.get_device()), "loader_threads": threads, "node_id": node_id,
            "hostname": os.uname().nodename, "pid": os.getpid(), "train_samples": _train_range(cfg.data.shards, ctx)}
    workers = [mine]
    if dist.is_available() and dist.is_initialized():
        workers = [None] * ctx.get_world_size()
        dist.all_gather_object(workers, mine)
    layout = Layout(workers=sorted(workers, key=lambda w: w["world_rank"]), loader_threads=threads)
    if ctx.get_world_rank() == 0:
        from pipeline.train.console import WorkerConsole

        console = WorkerConsole(loop_config.get("console", "stdout"), True)
        for line in layout.lines():
            console.line(line)
    return scale_lr(cfg, ctx.get_world_size()), layout


def realign_schedule(schedule, saved: dict[str, Any], world_size: int, steps_per_epoch: int) -> None:
    """After an elastic resize, put the lr schedule at this epoch's start counted in the new world's steps.

    Steps per epoch change with the world size, so the saved step count no longer
    matches the schedule's length: left alone, a shrink would run the cosine out early.
    """
    if schedule is None or int(saved.get("world_size", world_size)) == world_size:
        return
    schedule.step_num = int(saved["epoch"]) * steps_per_epoch


def _train_range(shards: Path, ctx) -> list[int]:
    """[start, stop) of the epoch's training samples this rank reads (the loaders' own split arithmetic)."""
    import json

    from pipeline.data.split import rank_range

    total = int(json.loads((Path(shards) / "index.json").read_text())["splits"]["train"]["samples"])
    return list(rank_range(total, ctx.get_world_rank(), ctx.get_world_size()))


def scale_lr(cfg, world_size: int):
    """Elastic jobs keep the per-worker batch, so the global batch follows the world size; lr follows it linearly."""
    if not cfg.scaling.elastic or world_size == cfg.scaling.num_workers:
        return cfg
    lr = cfg.optim.lr * world_size / cfg.scaling.num_workers
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))


__all__ = ["Layout", "check_nodes", "index_digest", "probe", "realign_schedule", "scale_lr", "setup_worker"]
