"""Run shard tasks: a local process pool or Ray tasks, the same ``write_shard`` either way.

Both yield results as shards finish (any order); the caller orders them by plan. Ray
tasks are spread over the cluster's nodes; ``nodes`` counts the tasks each node ran.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import threading
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Iterator

from pipeline.errors import UserError
from pipeline.shard.config import ShardConfig
from pipeline.shard.plan import ShardPlan
from pipeline.shard.write import ShardResult, write_shard


def run_tasks(plans: list[ShardPlan], config: ShardConfig, nodes: Counter | None = None) -> Iterator[ShardResult]:
    """Execute ``write_shard`` for every plan with ``config.executor``; yields results as they finish.

    ``nodes``, when given, counts finished tasks by the node (IP) that ran them.
    """
    nodes = Counter() if nodes is None else nodes
    if not plans:
        return iter(())
    if config.executor == "ray":
        return _run_ray(plans, config, nodes)
    return _count_local(_run_local(plans, config), nodes)


def _count_local(results: Iterator[ShardResult], nodes: Counter) -> Iterator[ShardResult]:
    for r in results:
        nodes["local"] += 1
        yield r


def _write_on_node(plan: ShardPlan, config: ShardConfig) -> tuple[ShardResult, str]:
    """``write_shard`` in a Ray task, plus the address of the node it ran on."""
    import ray.util

    return write_shard(plan, config), ray.util.get_node_ip_address() or socket.gethostname()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A local pool of ``workers`` processes whose Ctrl-C is quiet.

    fork starts workers in milliseconds but is unsafe once the caller runs threads (a Ray
    driver, MLflow); then forkserver (about a second of start-up, on a 2-core VM) is used.
    """
    ctx = multiprocessing.get_context("fork" if threading.active_count() == 1 else "forkserver")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_exit_on_sigint)


def _exit_on_sigint() -> None:
    """In a pool worker: Ctrl-C (SIGINT to the whole process group) ends it without a traceback.

    The default KeyboardInterrupt made every idle worker print one ("Process ForkProcess-1:
    Traceback …") around the main process's one line. SystemExit ends an idle worker quietly;
    in a task it unwinds the same cleanup as KeyboardInterrupt did (temporary files removed)
    and reaches the main process, which is stopping anyway.
    """
    signal.signal(signal.SIGINT, _raise_exit)


def _raise_exit(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _run_local(plans: list[ShardPlan], config: ShardConfig) -> Iterator[ShardResult]:
    workers = min(config.workers, len(plans))
    if workers == 1:
        for p in plans:  # in-process: no pool start-up, and tracebacks stay simple
            yield write_shard(p, config)
        return
    with process_pool(workers) as pool:
        pending = {pool.submit(write_shard, p, config) for p in plans}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()


def _run_ray(plans: list[ShardPlan], config: ShardConfig, nodes: Counter) -> Iterator[ShardResult]:
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'ray[default]'") from None
    if not ray.is_initialized():
        try:
            # Without --ray-address: an existing cluster from RAY_ADDRESS, else a local one.
            ray.init(address=config.ray_address, log_to_driver=False, configure_logging=False)
        except ConnectionError as exc:
            raise UserError(f"cannot connect to Ray at {config.ray_address}: {exc}") from None
    # SPREAD: Ray's default packs tasks onto the driver's node while it has free CPUs; shard
    # tasks are long and I/O-heavy, so spreading them puts every node's disks and cores to work.
    task = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(_write_on_node)
    pending = [task.remote(p, config) for p in plans]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                result, node = ray.get(ref)
                nodes[node] += 1
                yield result
    finally:
        for ref in pending:
            ray.cancel(ref)
