"""Loader benchmark: DALI-CPU next to the torch fallback (baseline) and a bare Pillow decode (limit).

Cases, all on the same shards of ImageNet-like JPEGs (real photographs, 400-500 px),
train split, imagenet preset (random-resized-crop 224 + flip + normalize), same cores,
measured in one run, one full epoch per repeat after a warm-up epoch:

  dali-cpu        make_loader(backend="dali", device="cpu"), one thread per core
  torch           make_loader(backend="torch", device="cpu"), one DataLoader worker per core
  pillow decode   limit: Pillow full decode of the same JPEG bytes, one process per core, nothing else
  dali-cpu 1t / torch 1w   scaling: the same with one thread / one worker
  dali-gpu        only where CUDA is available: device="gpu" (nvJPEG), synchronized before the clock stops

Goals (issue): dali-cpu ≥ 2 × torch and ≥ 0.8 × pillow decode.

    python -m benchmarks.load_bench [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from benchmarks.common import Ratio, Result, machine_info, ratio, repeat
from benchmarks.images import make_imagenet_like
from pipeline.cli import main as cli_main
from pipeline.data import LoaderOptions, build_loader
from pipeline.data.split import read_index
from pipeline.shard.manifest import read_manifest

METRIC = "images_per_s"


def _shards(workdir: Path, n: int, cores: int) -> Path:
    src = make_imagenet_like(workdir / f"imagenet_like_{n}", n)
    out = workdir / f"shards_{n}"
    try:
        if read_manifest(out)["splits"]["train"]["samples"] == n:
            return out
    except Exception:  # noqa: BLE001 - any unreadable or stale build is rebuilt
        pass
    # Several shards of uneven size, as a real collection has.
    code = cli_main(["shard", str(src), str(out), "--samples-per-shard", str(max(n // 5 + 3, 1)),
                     "--workers", str(cores), "--no-progress"])
    if code != 0:
        raise RuntimeError(f"pipeline shard failed with exit code {code}")
    return out


def _epoch_rate(loader, sync) -> float:
    """Images per second over one full epoch (every batch materialized on its device)."""
    t0 = time.perf_counter()
    images = 0
    for batch in loader:
        images += batch[0].shape[0]
    sync()  # GPU: kernels queued by the loader must finish before the clock stops
    return images / (time.perf_counter() - t0)


def _decode_chunk(chunk: list[tuple[str, int, int]]) -> int:
    with open(chunk[0][0], "rb") as f:
        for _, offset, size in chunk:
            f.seek(offset)
            with Image.open(io.BytesIO(f.read(size))) as im:
                im.convert("RGB").load()
    return len(chunk)


def _bare_decode(shard_dir: Path, cores: int, repeats: int) -> list[float]:
    """Pillow full decode of every train JPEG, a process per core (pool started before the clock)."""
    manifest = read_manifest(shard_dir)
    chunks = []
    for s in manifest["splits"]["train"]["shards"]:
        members = [(str(shard_dir / s["tar"]), m["jpg"].offset, m["jpg"].size)
                   for _, m in read_index(shard_dir / s["index"])]
        step = max(1, len(members) // (4 * cores))
        chunks += [members[i:i + step] for i in range(0, len(members), step)]
    total = sum(len(c) for c in chunks)
    with ProcessPoolExecutor(max_workers=cores) as pool:
        list(pool.map(abs, range(cores)))  # start the workers outside the timing

        def once() -> float:
            t0 = time.perf_counter()
            done = sum(pool.map(_decode_chunk, chunks))
            assert done == total
            return total / (time.perf_counter() - t0)

        return repeat(once, repeats)


def run(*, quick: bool = False, workdir: Path | None = None) -> list[Result]:
    """Measure every case; one images/s ``Result`` per case."""
    import torch

    n, batch, repeats = (48, 16, 1) if quick else (800, 32, 3)
    cores = len(os.sched_getaffinity(0))
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="load_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    shard_dir = _shards(workdir, n, cores)
    results: list[Result] = []
    params = {"images": n, "batch_size": batch, "preset": "imagenet", "split": "train", "cores": cores}

    def loader_case(case: str, role: str, backend: str, device: str, scaling: int | None = None, **opts) -> None:
        loader = build_loader(shard_dir, "train", batch_size=batch, backend=backend, device=device,
                              options=LoaderOptions(**opts))
        sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
        epoch = iter(range(1, 1000))

        def once() -> float:
            loader.set_epoch(next(epoch))  # a new epoch each time, as in training (DALI rebuilds its graph)
            return _epoch_rate(loader, sync)

        results.append(Result("load", case, role, METRIC, "images/s", repeat(once, repeats),
                              {**params, "backend": backend, "device": device, **opts,
                               **({} if scaling is None else {"scaling": scaling, "series": f"{backend}-{device}"})}))

    loader_case("dali-cpu", "case", "dali", "cpu", scaling=cores, num_threads=cores)
    loader_case("torch", "baseline", "torch", "cpu", scaling=cores, num_workers=cores)
    results.append(Result("load", "pillow decode", "limit", METRIC, "images/s",
                          _bare_decode(shard_dir, cores, repeats), {**params, "processes": cores}))
    if cores > 1:
        loader_case("dali-cpu 1t", "case", "dali", "cpu", scaling=1, num_threads=1)
        loader_case("torch 1w", "baseline", "torch", "cpu", scaling=1, num_workers=1)
    if torch.cuda.is_available():
        loader_case("dali-gpu", "case", "dali", "gpu", num_threads=cores)
    return results


def goals(results: list[Result]) -> list[Ratio]:
    """The issue's two CPU goals, plus thread/worker scaling and the GPU speed-up where measured."""
    out = [
        ratio(results, "DALI-CPU / torch fallback", "dali-cpu", "torch", metric=METRIC, goal=2.0),
        ratio(results, "DALI-CPU / bare Pillow decode", "dali-cpu", "pillow decode", metric=METRIC, goal=0.8),
    ]
    cases = {r.case for r in results}
    if "dali-cpu 1t" in cases:
        out.append(ratio(results, "DALI-CPU all cores / 1 thread", "dali-cpu", "dali-cpu 1t", metric=METRIC))
        out.append(ratio(results, "torch all cores / 1 worker", "torch", "torch 1w", metric=METRIC))
    if "dali-gpu" in cases:
        out.append(ratio(results, "DALI-GPU / DALI-CPU", "dali-gpu", "dali-cpu", metric=METRIC))
    return out


def _print(results: list[Result], ratios: list[Ratio]) -> None:
    info = machine_info()
    print(f"# load benchmark on {info['processor']} ({info['cpus']} CPUs), torch {info.get('torch')}, "
          f"DALI {info.get('dali', 'absent')}")
    print(f"{'case':<16} {'role':<9} {'images/s':>10} {'spread':>8}  params")
    for r in results:
        extra = {k: v for k, v in r.params.items() if k in ("num_threads", "num_workers", "processes", "device")}
        print(f"{r.case:<16} {r.role:<9} {r.median:>10.1f} {r.spread:>7.1%}  {extra}")
    for g in ratios:
        verdict = "" if g.goal is None else f"  goal ≥ {g.goal:g}: {'met' if g.met else 'NOT met'}"
        print(f"{g.name:<32} {g.value:6.2f}{verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data, one repeat: checks the script runs")
    parser.add_argument("--workdir", type=Path, default=None, help="where images and shards are kept (reused)")
    args = parser.parse_args()
    res = run(quick=args.quick, workdir=args.workdir)
    _print(res, goals(res))
