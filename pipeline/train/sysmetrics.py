"""System metrics of each training node in the job's MLflow run: ``system/<node>/<metric>``.

One sampler per node (the worker with local rank 0) collects what MLflow's
system-metrics monitors collect (CPU and memory, disk, network; GPU utilisation
and memory when ``nvidia-ml-py`` is installed and a GPU is present: the ``gpu``
extra), plus the CPU time a virtual machine's hypervisor gave to other guests
(``cpu_steal_percentage``: slow epochs on a shared host show there, not in the
load average), every ``interval_s`` seconds and logs the averages through its own
tracking queue and spool (``system-<node>.jsonl``), so a tracking outage costs
the node nothing and nothing is lost. The sampler never creates the run: it
waits until rank 0's tracker has it.

Steps count samples and continue across restarts (from the spool), so a
resumed job extends each series instead of starting again at 0.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from pathlib import Path

from pipeline.train.tracking_queue import MlflowSink, Spool, TrackingQueue

log = logging.getLogger("pipeline.tracking")

DEFAULT_INTERVAL_S = 10.0


def node_name() -> str:
    """This node's name in metric keys: the short host name, made safe for MLflow metric names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname().split(".")[0]) or "node"


def _steal_monitor():
    """A monitor of ``cpu_steal_percentage``: share of this node's CPU time stolen since the last sample."""
    import psutil
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor

    class StealMonitor(BaseMetricsMonitor):
        def __init__(self) -> None:
            super().__init__()
            psutil.cpu_times_percent()  # the first sample counts from here

        def collect_metrics(self) -> None:
            self._metrics["cpu_steal_percentage"].append(psutil.cpu_times_percent().steal)

        def aggregate_metrics(self) -> dict[str, float]:
            return {k: round(sum(v) / len(v), 1) for k, v in self._metrics.items()}

    return StealMonitor() if hasattr(psutil.cpu_times(), "steal") else None  # Linux only


def _monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [m for m in (CPUMonitor(), _steal_monitor(), DiskMonitor(), NetworkMonitor()) if m is not None]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except (ImportError, RuntimeError):
        pass  # no nvidia-ml-py, or no GPU on this node
    return monitors


class NodeMonitor:
    """Samples this node every ``interval_s`` seconds into ``spool_dir`` (a daemon thread); ``stop`` ends it."""

    def __init__(self, spool_dir: str | Path, node: str | None = None, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.node = node or node_name()
        self.interval_s = interval_s
        self.spool = Spool(spool_dir, f"system-{self.node}")
        self.step = 1 + max((r["step"] for r in self.spool.records()), default=-1)
        self.queue = TrackingQueue(self.spool, MlflowSink(spool_dir, create=False).send, name=f"system-{self.node}",
                                   warn=False)  # rank 0's tracker says it once
        self.monitors = _monitors()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        prefix = f"system/{self.node}/"
        while not self._stop.wait(self.interval_s):
            try:
                metrics = {}
                for m in self.monitors:
                    m.collect_metrics()
                    metrics.update(m.aggregate_metrics())
                    m.clear_metrics()
            except Exception as exc:  # a sampler failing must never reach training
                log.warning("[pipeline] system metrics of %s stopped: %s", self.node, exc)
                return
            self.queue.put({"t": "metrics", "step": self.step, "m": {prefix + k: float(v) for k, v in metrics.items()}})
            self.step += 1

    def stop(self, timeout_s: float = 10.0) -> int:
        """Stop sampling and flush for at most ``timeout_s``; returns the samples left in the spool."""
        self._stop.set()
        self._thread.join(timeout_s)
        return self.queue.close(timeout_s)


_active: NodeMonitor | None = None  # this process's sampler (one per node: the local rank 0 worker)


def start_node_monitor(spool_dir: str | Path | None, local_rank: int, interval_s: float) -> NodeMonitor | None:
    """A ``NodeMonitor`` on the node's local rank 0 when tracking is on and ``interval_s`` > 0, else None."""
    global _active
    if spool_dir is None or local_rank != 0 or interval_s <= 0:
        return None
    stop_node_monitor(0.0)
    _active = NodeMonitor(spool_dir, interval_s=interval_s)
    return _active


def stop_node_monitor(timeout_s: float = 10.0) -> int:
    """Stop this process's sampler, if any, flushing for at most ``timeout_s``; returns samples left unsent."""
    global _active
    monitor, _active = _active, None
    return monitor.stop(timeout_s) if monitor is not None else 0


__all__ = ["DEFAULT_INTERVAL_S", "NodeMonitor", "node_name", "start_node_monitor", "stop_node_monitor"]
