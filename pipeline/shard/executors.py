"""Run shard tasks: a local process pool or Ray tasks, the same ``write_shard`` either way.

Both yield results as shards finish (any order); the caller orders them by plan. Ray
tasks are spread over the cluster's nodes; ``nodes`` counts the tasks each node ran.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import socket
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

from pipeline.errors import UserError
from pipeline.ray_address import probe
from pipeline.ray_logging import quiet_token_notice
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
    """A local pool of ``workers`` processes that a Ctrl-C stops cleanly (see ``_QuietPool``).

    fork starts workers in milliseconds but is unsafe once the caller runs threads (a Ray
    driver, MLflow); then forkserver (about a second of start-up, on a 2-core VM) is used.
    """
    ctx = multiprocessing.get_context("fork" if threading.active_count() == 1 else "forkserver")
    return _QuietPool(workers, ctx)


class _QuietPool(ProcessPoolExecutor):
    """A process pool whose workers end their task at Ctrl-C, start no other, and never die of it.

    Ctrl-C sends SIGINT to the whole process group. Left to Python's default, every worker
    raised KeyboardInterrupt wherever it stood: idle ones printed a traceback each, and one
    caught inside the pool's own queue code ended that worker. The pool's manager thread then
    failed on the futures already cancelled (CPython 3.11's ``terminate_broken`` raises
    ``InvalidStateError``) and left the other worker waiting for work forever, and the build
    hung at exit. Now SIGINT in a worker interrupts only a task (its cleanup runs: temporary
    files removed); an idle worker notes it and starts no further task. A SIGINT to the main
    process alone, or any exception that leaves the pool, stops the workers' tasks the same way.
    """

    def __init__(self, workers: int, ctx) -> None:
        self._stop = ctx.Event()
        super().__init__(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(self._stop,))

    def submit(self, fn, /, *args, **kwargs):
        # A worker forked here must not take SIGINT before its handler is in place: held until then.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super().submit(_task, fn, *args, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def __exit__(self, exc_type, exc_val, exc_tb):
        if exc_type is not None:  # Ctrl-C, a failed task, results abandoned: nobody waits for the rest
            self._stop.set()  # queued tasks do not start
            for proc in list((self._processes or {}).values()):
                if proc.exitcode is None:  # not yet reaped: its pid is still this child's
                    os.kill(proc.pid, signal.SIGINT)  # running tasks stop
            self.shutdown(wait=True, cancel_futures=True)
            return False
        return super().__exit__(exc_type, exc_val, exc_tb)


_worker_stop = None  # in a worker: the pool's stop event
_in_task = False  # in a worker: a task is running (SIGINT interrupts it)
_interrupted = False  # in a worker: SIGINT has come


def _init_worker(stop) -> None:
    global _worker_stop
    _worker_stop = stop
    signal.signal(signal.SIGINT, _on_sigint)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _on_sigint(signum: int, frame) -> None:
    global _interrupted
    if _interrupted:  # once: a second SIGINT must not cut the first one's cleanup short
        return
    _interrupted = True
    if _in_task:
        raise KeyboardInterrupt


def _task(fn, *args, **kwargs):
    """Run ``fn`` unless this worker or the pool was interrupted; a SIGINT while it runs interrupts it."""
    global _in_task
    _in_task = True
    try:
        if _interrupted or _worker_stop.is_set():  # checked after the flag: no SIGINT falls in between
            raise KeyboardInterrupt
        return fn(*args, **kwargs)
    finally:
        _in_task = False


def _run_local(plans: list[ShardPlan], config: ShardConfig) -> Iterator[ShardResult]:
    workers = min(config.workers, len(plans))
    if workers == 1:
        for p in plans:  # in-process: no pool start-up, and tracebacks stay simple
            yield write_shard(p, config)
        return
    with process_pool(workers) as pool:
        # Results through a queue, not concurrent.futures.wait(): wait() takes every future's lock in a
        # Python loop, and a Ctrl-C landing inside it left some held, so the pool's shutdown hung on them.
        finished: queue.SimpleQueue = queue.SimpleQueue()
        futures = [pool.submit(write_shard, p, config) for p in plans]
        for fut in futures:
            fut.add_done_callback(finished.put)
        for _ in futures:
            yield finished.get().result()  # on any exception the pool cancels the rest (_QuietPool.__exit__)


def connect(config: ShardConfig) -> None:
    """Join (or start) the Ray cluster ``config`` asks for; nothing for the local executor.

    The build calls this before it writes anything, so a wrong ``--ray-address`` costs seconds,
    not minutes, and leaves OUT_DIR as it was. Idempotent.
    """
    if config.executor != "ray":
        return
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'ray[default]'") from None
    if ray.is_initialized():
        return
    # Without --ray-address: an existing cluster from RAY_ADDRESS, else a local one.
    address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        probe(address, "--ray-address" if config.ray_address else "RAY_ADDRESS")
    quiet_token_notice()
    try:
        ray.init(address=config.ray_address, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise UserError(f"cannot connect to Ray at {address}: {exc}") from None


def _run_ray(plans: list[ShardPlan], config: ShardConfig, nodes: Counter) -> Iterator[ShardResult]:
    connect(config)  # a no-op when the build already connected
    import ray

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
