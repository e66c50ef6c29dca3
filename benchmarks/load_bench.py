"""Loader benchmark: the DALI CPU train graph against DALI's own ROI decode of the same shards.

All cases read the same train shards of ImageNet-like JPEGs (real photographs, 400-500 px) with
the ``imagenet`` preset (random-resized-crop 224 + flip + normalise), the same threads and batch,
measured in one run, cases interleaved (A B C … A B C …), one full epoch per repeat after a warm-up
epoch, images/s timed from the third batch on (a loader's per-epoch pipeline build and the first
batches are reported on their own as "epoch start" seconds):

  roi-decode          limit: DALI reader + ``decoders.image_random_crop`` (the crop window only), nothing else
  + resize            the same + ``fn.resize`` to 224×224 as the loader does it (default: linear, antialias)
  + normalize         the same + ``crop_mirror_normalize`` (float CHW, random flip): the loader's image path
  loader graph        the loader's own pipeline (``pipeline.data.dali.dali_pipeline``), run bare: the above plus
                      label parsing and sample keys inside the graph, its shuffle buffer and checkpointing
  dali-cpu            ``make_loader(backend="dali", device="cpu")``: that graph + the hand-off as torch tensors
  resize <variant>    the "+ resize" graph with one ``fn.resize`` option changed (interpolation, antialias,
                      ``min_filter``/``mag_filter``); its accuracy cost is measured as PSNR (dB) of its
                      224×224 output against the loader's own resize of the same decoded crops
  torch               baseline: the torch/webdataset fallback, one DataLoader worker per core
  pillow decode       reference: Pillow full decode (not ROI) of the same JPEG bytes, one process per core

The breakdown (decode, resize, normalize, labels/keys/checkpointing, hand-off) is the difference
between consecutive stages, per image of the whole machine.
Goal: dali-cpu ≥ 0.5 × roi-decode.

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

import numpy as np
from PIL import Image

from benchmarks.common import HostLoad, Ratio, Result, machine_info, now_utc, print_steal_note, ratio
from benchmarks.images import make_imagenet_like
from benchmarks.report import report_if_asked, stage_options
from pipeline.cli import main as cli_main
from pipeline.data import LoaderOptions, build_loader
from pipeline.data.presets import get_preset
from pipeline.data.split import read_index
from pipeline.shard.manifest import read_manifest

METRIC = "images_per_s"
# fn.resize options tried against the loader's default (linear, antialias on). What each changes:
# antialias off samples the source at 224 points only (aliasing when shrinking ~2x from a 450 px crop);
# triangular is a cheaper antialiasing filter; cubic is sharper and costlier; nn is the cheapest and coarsest.
RESIZE_VARIANTS = {
    "linear no-antialias": {"interp_type": "INTERP_LINEAR", "antialias": False},
    "triangular": {"interp_type": "INTERP_TRIANGULAR"},
    "cubic": {"interp_type": "INTERP_CUBIC"},
    "nn": {"interp_type": "INTERP_NN"},
    "min linear mag nn": {"min_filter": "INTERP_LINEAR", "mag_filter": "INTERP_NN"},
}


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


def _resize_args(variant: dict) -> dict:
    from nvidia.dali import types

    return {k: getattr(types, v) if isinstance(v, str) else v for k, v in variant.items()}


def _train_files(shard_dir: Path) -> tuple[list[str], list[str]]:
    """The train split's tar and index paths, in manifest order: every graph case reads these."""
    shards = read_manifest(shard_dir)["splits"]["train"]["shards"]
    return [str(shard_dir / s["tar"]) for s in shards], [str(shard_dir / s["index"]) for s in shards]


def _graph(shard_dir: Path, stage: str, batch: int, threads: int, variant: dict | None = None, seed: int = 0):
    """The loader's CPU train graph cut after ``stage`` ("decode", "resize", "normalize"), as a built pipeline."""
    from nvidia.dali import fn, pipeline_def, types

    preset = get_preset("imagenet")
    tars, indexes = _train_files(shard_dir)

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=seed, prefetch_queue_depth=2)
    def graph():
        encoded, _ = fn.readers.webdataset(
            paths=tars, index_paths=indexes,
            ext=["jpg", "cls"], random_shuffle=True, initial_fill=256, pad_last_batch=True, name="Reader")
        images = fn.decoders.image_random_crop(encoded, device="cpu", output_type=types.RGB,
                                               random_area=list(preset.scale), random_aspect_ratio=list(preset.ratio),
                                               num_attempts=10)
        if stage == "decode":
            return images
        images = fn.resize(images, resize_x=preset.size, resize_y=preset.size, **_resize_args(variant or {}))
        if stage == "resize":
            return images
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=list(preset.mean_255),
                                        std=list(preset.std_255), mirror=fn.random.coin_flip(probability=0.5))

    pipe = graph()
    pipe.build()
    return pipe


def _loader_graph(shard_dir: Path, batch: int, threads: int, seed: int = 0):
    """The pipeline ``make_loader`` builds for rank 0 of 1 (train split), built but without its iterator."""
    from pipeline.data.dali import dali_pipeline

    tars, indexes = _train_files(shard_dir)
    pipe = dali_pipeline(paths=tars, index_paths=indexes, preset=get_preset("imagenet"), train=True, gpu=False,
                         shard_id=0, num_shards=1, with_keys=True, batch_size=batch, num_threads=threads,
                         device_id=None, seed=seed)
    pipe.build()
    return pipe


WARM_BATCHES = 2  # not timed in any case: a pipeline's build and prefetch queue (2 deep) fill here


def _steady_rate(batches, size_of, sync=lambda: None) -> tuple[float, float]:
    """(images/s after the first ``WARM_BATCHES`` batches, seconds until the first batch); ``sync`` waits
    for a device's queued work before the clock stops."""
    t_start = time.perf_counter()
    first = t0 = None
    images = 0
    for i, b in enumerate(batches):
        if i == 0:
            first = time.perf_counter() - t_start
        if i == WARM_BATCHES - 1:
            t0 = time.perf_counter()
        elif i >= WARM_BATCHES:
            images += size_of(b)
    sync()
    return images / (time.perf_counter() - t0), first


def _graph_rate(pipe, iterations: int, batch: int) -> float:
    return _steady_rate((pipe.run() for _ in range(iterations)), lambda _: batch)[0]


def _psnr_of_variants(shard_dir: Path, batch: int, threads: int) -> dict[str, float]:
    """PSNR (dB) of each resize variant's output against the loader's resize, on the same decoded crops."""
    from nvidia.dali import fn, pipeline_def

    crops = [np.asarray(t) for t in _graph(shard_dir, "decode", batch, threads).run()[0]]

    def resized(variant: dict) -> np.ndarray:
        @pipeline_def(batch_size=len(crops), num_threads=threads, device_id=None)
        def graph():
            images = fn.external_source(source=lambda: crops, layout="HWC", batch=True)
            return fn.resize(images, resize_x=224, resize_y=224, **_resize_args(variant))

        pipe = graph()
        pipe.build()
        return np.stack([np.asarray(t) for t in pipe.run()[0]]).astype(np.float64)

    reference = resized({})
    out = {}
    for name, variant in RESIZE_VARIANTS.items():
        mse = float(np.mean((resized(variant) - reference) ** 2))
        out[name] = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return out


def _decode_chunk(chunk: list[tuple[str, int, int]]) -> int:
    with open(chunk[0][0], "rb") as f:
        for _, offset, size in chunk:
            f.seek(offset)
            with Image.open(io.BytesIO(f.read(size))) as im:
                im.convert("RGB").load()
    return len(chunk)


def _pillow_chunks(shard_dir: Path, cores: int) -> list[list[tuple[str, int, int]]]:
    chunks = []
    for s in read_manifest(shard_dir)["splits"]["train"]["shards"]:
        members = [(str(shard_dir / s["tar"]), m["jpg"].offset, m["jpg"].size)
                   for _, m in read_index(shard_dir / s["index"])]
        step = max(1, len(members) // (4 * cores))
        chunks += [members[i:i + step] for i in range(0, len(members), step)]
    return chunks


def run(*, quick: bool = False, workdir: Path | None = None, repeats: int | None = None) -> list[Result]:
    """Measure every case, interleaved rounds; one images/s ``Result`` per case, plus resize PSNRs."""
    import torch

    from pipeline.train.hostmem import keep_freed_memory

    keep_freed_memory()  # as in every CPU training process (``setup_torch``), where the loader runs
    n, batch = (48, 16) if quick else (800, 32)
    repeats = repeats or (1 if quick else 3)
    cores = len(os.sched_getaffinity(0))
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="load_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    shard_dir = _shards(workdir, n, cores)
    iterations = n // batch
    params = {"images": n, "batch_size": batch, "preset": "imagenet", "split": "train", "threads": cores}

    starts: dict[str, list[float]] = {}  # per loader: seconds from the epoch's iter() to its first batch

    def loader_case(backend: str, device: str = "cpu", **opts):
        loader = build_loader(shard_dir, "train", batch_size=batch, backend=backend, device=device,
                              options=LoaderOptions(**opts))
        epochs = iter(range(1, 10_000))

        def once() -> float:
            loader.set_epoch(next(epochs))  # a new epoch each time, as in training (DALI builds a new pipeline)
            rate, first = _steady_rate(loader, lambda b: b[0].shape[0],
                                       torch.cuda.synchronize if device == "gpu" else lambda: None)
            starts.setdefault(backend, []).append(first)
            return rate

        once()  # warm-up epoch
        starts.pop(backend)
        return once

    def graph_case(stage: str, variant: dict | None = None):
        pipe = (_loader_graph(shard_dir, batch, cores) if stage == "loader-graph"
                else _graph(shard_dir, stage, batch, cores, variant))
        _graph_rate(pipe, iterations, batch)  # warm-up
        return lambda: _graph_rate(pipe, iterations, batch)

    pool = ProcessPoolExecutor(max_workers=cores)
    chunks = _pillow_chunks(shard_dir, cores)
    total = sum(len(c) for c in chunks)
    list(pool.map(_decode_chunk, chunks[:cores]))  # workers started and warm outside the timing

    def pillow() -> float:
        t0 = time.perf_counter()
        assert sum(pool.map(_decode_chunk, chunks)) == total
        return total / (time.perf_counter() - t0)

    plan = [("roi-decode", "limit", graph_case("decode"), {"stage": "decode"}),
            ("+ resize", "case", graph_case("resize"), {"stage": "resize"}),
            ("+ normalize", "case", graph_case("normalize"), {"stage": "normalize"}),
            ("loader graph", "case", graph_case("loader-graph"), {"stage": "loader-graph"}),
            ("dali-cpu", "case", loader_case("dali", num_threads=cores), {"stage": "loader"}),
            ("torch", "baseline", loader_case("torch", num_workers=cores), {"backend": "torch"}),
            ("pillow decode", "baseline", pillow, {"processes": cores})]
    if not quick:
        plan += [(f"resize {name}", "case", graph_case("resize", v), {"resize": v})
                 for name, v in RESIZE_VARIANTS.items()]
    rates: dict[str, list[float]] = {name: [] for name, *_ in plan}
    host = HostLoad()
    for _ in range(repeats):
        for name, _, once, _ in plan:
            with host.run(name):
                rates[name].append(once())
    pool.shutdown()
    psnr = _psnr_of_variants(shard_dir, batch, cores)
    results = []
    for name, role, _, extra in plan:
        p = {**params, **extra, **host.params(name)}
        if name.startswith("resize "):
            db = psnr[name[len("resize "):]]
            p["psnr_db_vs_loader_resize"] = round(db, 2) if db != float("inf") else "identical output"
        results.append(Result("load", name, role, METRIC, "images/s", rates[name], p))
    for backend, secs in starts.items():
        results.append(Result("load", f"{'dali-cpu' if backend == 'dali' else backend} epoch start", "baseline",
                              "epoch_start_s", "s", secs, {**params, "what": "iter() to first batch, not timed above"}))
    # Where the graph's time goes, per round (rounds ran back to back, so their differences pair up).
    stages = [("decode", None, "roi-decode"), ("resize", "roi-decode", "+ resize"),
              ("normalize", "+ resize", "+ normalize"), ("labels, keys, checkpointing", "+ normalize", "loader graph"),
              ("hand-off to torch", "loader graph", "dali-cpu")]
    for stage, a, b in stages:
        ms = [1000 * (1 / rb - (1 / ra if a else 0)) for ra, rb in zip(rates[a] if a else rates[b], rates[b])]
        results.append(Result("load", f"breakdown: {stage}", "case", "ms_per_image", "ms/image", ms,
                              {**params, "from": a or "nothing", "to": b}))
    if torch.cuda.is_available():
        gpu = loader_case("dali", "gpu", num_threads=cores)
        results.append(Result("load", "dali-gpu", "case", METRIC, "images/s", [gpu() for _ in range(repeats)], params))
    return results


def goals(results: list[Result]) -> list[Ratio]:
    """The train graph against its ROI-decode limit (goal ≥ 0.5), and the references."""
    out = [ratio(results, "DALI-CPU / DALI ROI decode", "dali-cpu", "roi-decode", metric=METRIC, goal=0.5),
           ratio(results, "DALI-CPU / torch fallback", "dali-cpu", "torch", metric=METRIC),
           ratio(results, "DALI ROI decode / Pillow full decode", "roi-decode", "pillow decode", metric=METRIC)]
    for r in results:
        if r.case.startswith("resize "):
            out.append(ratio(results, f"{r.case} / loader resize", r.case, "+ resize", metric=METRIC))
    if any(r.case == "dali-gpu" for r in results):
        out.append(ratio(results, "DALI-GPU / DALI-CPU", "dali-gpu", "dali-cpu", metric=METRIC))
    return out


def _print(results: list[Result], ratios: list[Ratio]) -> None:
    info = machine_info()
    print(f"# load benchmark on {info['processor']} ({info['cpus']} CPUs), torch {info.get('torch')}, "
          f"DALI {info.get('dali', 'absent')}; load avg per case {results[0].params['load_avg_1m']}")
    for r in results:
        psnr = r.params.get("psnr_db_vs_loader_resize")
        print(f"{r.case:<28} {r.role:<9} {r.median:>8.2f} {r.unit} ±{r.spread:>4.0%}"
              + ("" if psnr is None else f"  PSNR {psnr} dB vs loader resize"))
    for g in ratios:
        print(g.line())
    print_steal_note(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stage_options(parser, quick="tiny data, one repeat: checks the script runs",
                  workdir="where images and shards are kept (reused)")
    args = parser.parse_args()
    started, t0 = now_utc(), time.perf_counter()
    res = run(quick=args.quick, workdir=args.workdir, repeats=args.repeats)
    report_if_asked("load", "benchmarks.load_bench", args, res, goals(res), started=started,
                    seconds=time.perf_counter() - t0)
    _print(res, goals(res))
