"""The run's resumable state: one object that knows everything a resume needs, and where it lives on disk.

A checkpoint directory holds, besides ``meta.json``:

* ``state.pt`` (rank 0): model, its weight average (``train.ema_decay``), optimizer,
  GradScaler, schedule, epochs completed,
  batches done in the epoch in progress, global step, best score so far;
* ``rank-<r>.pt`` (one per rank, each written by its own rank; Ray Train merges
  the ranks' directories into one): that rank's RNGs (torch, CUDA, NumPy,
  Python, the batch augmentation's generator) and its loader position (DALI's
  pipeline checkpoint, or the torch fallback's epoch and batches consumed).

Everything loads with ``torch.load(weights_only=True)``: RNG states are stored as
tensors, ints and tuples, never as pickled objects.

A resume with a different world size cannot continue the epoch where it was:
each rank's slice of the epoch's samples depends on the world size. The epoch
in progress then restarts from its first batch (model and optimizer keep the
steps already taken), and the loop says so in one line: the samples of that
epoch's first part are seen twice, never silently.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.fileio import is_uri, write_atomic
from pipeline.train.checkpoint import META_FILE, STATE_FILE, save_checkpoint, unwrap

RANK_FILE = "rank-{rank}.pt"


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random stream the training process draws from, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": (version, tuple(internal), py_gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's own GPU only: Ray lets each rank see all of its node's GPUs, and a resume on a node
        # with fewer of them (a smaller world) could not restore a state per GPU.
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["augment"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    cuda = state.get("cuda") if torch.cuda.is_available() else None
    if isinstance(cuda, (list, tuple)):  # written by an earlier version: one state per visible GPU
        index = torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    if generator is not None and "augment" in state:
        generator.set_state(state["augment"])


class RunState:
    """Model, optimizer, scaler, schedule, counters, RNGs and loader position of one rank.

    ``epoch`` counts completed epochs; ``step_in_epoch`` the batches done of epoch
    ``epoch`` (0 at an epoch boundary); ``global_step`` the optimizer steps of the run.
    """

    def __init__(self, model: torch.nn.Module, train_step: Any, loader: Any, *, rank: int, world_size: int,
                 keep_best_by: str) -> None:
        self.model = model
        self.train_step = train_step
        self.loader = loader
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: dict[str, Any] = {"metric": keep_best_by, "value": None, "epoch": 0}
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.seen = 0
        self._resumed_sums: tuple[torch.Tensor, int] | None = None

    # --- what goes into the checkpoint ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The part every rank shares (rank 0 writes it)."""
        ts = self.train_step
        state = {
            "model": unwrap(self.model).state_dict(), "optimizer": ts.optimizer.state_dict(),
            "scaler": ts.scaler.state_dict(), "schedule": ts.schedule.state_dict() if ts.schedule else {},
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best": dict(self.best), "world_size": self.world_size,
        }
        if ts.ema is not None:
            state["ema"] = ts.ema.state_dict()
        return state

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's own part: its RNGs and where its loader is."""
        return {"rng": rng_state(self.train_step.generator), "loader": self.loader.state_dict(),
                "epoch_sums": (self.loss_sum.detach().cpu(), self.seen)}  # host sync: once per checkpoint

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the shared part (the model's weights are loaded before it is moved and wrapped). A run that
        turns ``train.ema_decay`` on at a resume starts its average from the resumed weights."""
        ts = self.train_step
        if ts.ema is not None and state.get("ema"):
            ts.ema.load_state_dict(state["ema"])
        ts.optimizer.load_state_dict(state["optimizer"])
        ts.scaler.load_state_dict(state["scaler"])
        if ts.schedule is not None and state.get("schedule"):
            ts.schedule.load_state_dict(state["schedule"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.best = dict(state.get("best", self.best))

    def load_rank_state(self, saved: dict[str, Any] | None) -> str | None:
        """Restore this rank's RNGs, epoch sums and loader position (``load_rank_file``'s result).

        Returns None when the run continues exactly where it stopped, or a sentence saying why
        the epoch in progress restarts from its first batch instead.
        """
        if saved is not None:
            set_rng_state(saved["rng"], self.train_step.generator)
        if self.step_in_epoch == 0:
            return None
        if saved is None:
            return f"the checkpoint holds no loader position for rank {self.rank}"
        try:
            self.loader.load_state_dict(saved["loader"])
        except ValueError as exc:
            return str(exc)
        self._resumed_sums = saved.get("epoch_sums")
        return None

    def restart_epoch(self) -> None:
        """Forget the position inside the epoch in progress (used when it cannot be continued)."""
        self.step_in_epoch = 0
        self._resumed_sums = None
        self.loader.forget_position()

    # --- the loop's bookkeeping ---------------------------------------------------------------

    def begin_epoch(self, device: torch.device) -> None:
        """Zero this rank's loss sums, or take the saved ones when continuing an epoch mid-way."""
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = 0
        if self._resumed_sums is not None and self.step_in_epoch:
            loss_sum, seen = self._resumed_sums
            self.loss_sum += loss_sum.to(device)
            self.seen = int(seen)
        self._resumed_sums = None

    def add_step(self, loss: torch.Tensor, batch: int) -> None:
        """One optimizer step on ``batch`` samples (no host sync: the loss stays on the device)."""
        self.loss_sum += loss * batch
        self.seen += batch
        self.step_in_epoch += 1
        self.global_step += 1

    def end_epoch(self, metrics: dict[str, Any]) -> bool:
        """The epoch is complete: count it and track the best score; True if it improved (never for an
        epoch without validation)."""
        self.epoch += 1
        self.step_in_epoch = 0
        score = metrics.get(self.best["metric"])
        if score is None:
            return False
        higher_is_better = self.best["metric"] == "val_top1"
        value = self.best["value"]
        improved = value is None or (score > value if higher_is_better else score < value)
        if improved:
            self.best = {"metric": self.best["metric"], "value": score, "epoch": self.epoch}
        return improved

    def save(self, directory: str | Path, meta: dict[str, Any]) -> None:
        """Write this rank's files into ``directory`` (rank 0 also writes the shared state and meta)."""
        directory = Path(directory)
        if self.rank == 0:
            save_checkpoint(directory, self.state_dict(), meta)
        rank_state = self.rank_state_dict()
        write_atomic(directory / RANK_FILE.format(rank=self.rank), lambda f: torch.save(rank_state, f))


def load_rank_file(directory: str | Path, rank: int) -> dict[str, Any] | None:
    """``rank-<rank>.pt`` of a checkpoint directory, or None (older checkpoints have none)."""
    path = Path(directory) / RANK_FILE.format(rank=rank)
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def best_dir(storage_dir: str | Path) -> str:
    """Where rank 0 keeps a copy of the best epoch checkpoint until the job ends (a path or a URI)."""
    return f"{str(storage_dir).rstrip('/')}/best_checkpoint"


def keep_best(checkpoint_dir: str | Path, storage_dir: str | Path) -> None:
    """Copy rank 0's files of an epoch checkpoint beside the job's checkpoints, replacing the last best.

    A copy on the job's storage instead of an MLflow upload: the job uploads it once, at its end. On a URI
    (``s3://``…) through pyarrow's file system for it, as Ray Train writes the checkpoints themselves.
    """
    target = best_dir(storage_dir)
    if not is_uri(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        for name in (STATE_FILE, META_FILE):
            src = Path(checkpoint_dir) / name
            write_atomic(Path(target) / name, lambda f, src=src: f.write(src.read_bytes()))
        return
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(target)
    fs.create_dir(root, recursive=True)
    for name in (STATE_FILE, META_FILE):  # an object store writes each object whole
        with fs.open_output_stream(f"{root}/{name}") as out:
            out.write((Path(checkpoint_dir) / name).read_bytes())


@contextlib.contextmanager
def local_best(storage_dir: str | Path) -> Iterator[Path | None]:
    """The kept best checkpoint as a local directory (downloaded for the block from a URI), or None."""
    target = best_dir(storage_dir)
    if not is_uri(target):
        yield Path(target) if Path(target).is_dir() else None
        return
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(target)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="best-") as local:
        pyarrow.fs.copy_files(root, local, source_filesystem=fs)
        yield Path(local)


__all__ = ["RANK_FILE", "RunState", "best_dir", "keep_best", "load_rank_file", "local_best", "rng_state",
           "set_rng_state"]
