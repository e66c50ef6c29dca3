"""GPU benchmarks on the ImageNet path: JPEG shards of ImageNet-like photo crops, nvJPEG, ResNet-50.

Cases, measured in one run on one node (needs a CUDA device; without one the stage prints one
line saying so and returns no figures — its JPEG shards are still built, on the CPU):

* ``dali-mixed decode`` / ``dali-cpu decode``  the train loader (``imagenet`` preset: decode, random
  resized crop 224, flip, normalise) with DALI's ``mixed`` (nvJPEG) and CPU decoders, same threads.
* ``gpu-resnet50-{bf16,fp16}-synthetic``  ``TrainStep`` from the bundled ``imagenet_resnet50`` config
  (channels_last, autocast) on one batch resident on the GPU: the step's ceiling.
* ``gpu-resnet50-{bf16,fp16}-dali``  the same step fed by ``make_loader(device="gpu")``.
  Goal: ≥ 0.95 × synthetic. Anchor: NVIDIA's ResNet-50 AMP reference, 2,470 img/s on one A100-80GB.
* ``gpu-ray-1gpu``  ``pipeline train`` (Ray Train, 1 GPU worker) on the same shards, images/s after
  the first epoch.

    python -m benchmarks.gpu_bench [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import Ratio, Result, ratio
from benchmarks.images import make_imagenet_like

SKIP_LINE = "bench gpu: skipped: no CUDA device visible to torch (torch.cuda.is_available() is False)"


def jpeg_shards(workdir: Path, n: int) -> Path:
    """``pipeline shard`` of ``n`` ImageNet-like JPEG crops (400-500 px): ``jpg`` members, the nvJPEG path."""
    from pipeline.cli import main
    from pipeline.shard.manifest import read_manifest

    src = make_imagenet_like(workdir / f"imagenet_like_{n}", n)
    out = workdir / f"jpeg_shards_{n}"
    try:
        if read_manifest(out)["splits"]["train"]["samples"] + read_manifest(out)["splits"]["val"]["samples"] == n:
            return out
    except Exception:  # noqa: BLE001 - absent or stale: rebuilt below
        pass
    code = main(["shard", str(src), str(out), "--val-fraction", "0.1", "--samples-per-shard", str(max(8, n // 8)),
                 "--workers", str(len(os.sched_getaffinity(0))), "--no-progress"])
    if code != 0:
        raise RuntimeError(f"pipeline shard exited with {code}")
    return out


WARMUP_STEPS = 5  # untimed steps before the clock starts (cuDNN autotune, allocator, prefetch queue)


def _images_for(batches: int, batch: int, train_fraction: float = 0.9) -> int:
    """Images to shard so the train split holds ``batches`` full batches, rounded up to a thousand."""
    return -(-int(batches * batch / train_fraction + 1) // 1000) * 1000


def _resnet_config(shards: Path, workdir: Path, precision: str, batch: int, extra: list[str] = ()):
    from pipeline.train.config import load_config

    return load_config("imagenet_resnet50", [
        f"data.shards={shards}", f"train.precision={precision}", f"train.batch_size={batch}",
        "scaling.num_workers=1", f"scaling.cpus_per_worker={len(os.sched_getaffinity(0))}",
        f"run.storage_path={workdir / 'ray_results'}", f"run.name=gpu-bench-{time.time_ns()}",
        "tracking.enabled=false", "optim.warmup_epochs=0", *extra])


def _loader_rate(shards: Path, device: str, batch: int, steps: int) -> float:
    import torch

    from pipeline.data import make_loader

    loader = make_loader(shards, "train", batch_size=batch, backend="dali", device=device, preset="imagenet",
                         threads=len(os.sched_getaffinity(0)))
    images, t0 = 0, None
    for i, (x, _) in enumerate(_cycle(loader, steps + 2)):
        if i == 2:  # two warm-up batches: the pipeline's prefetch queue is full from here
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        elif i > 2:
            images += x.shape[0]
    torch.cuda.synchronize()
    return images / (time.perf_counter() - t0)


def _cycle(loader, n: int):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch
            n -= 1
            if n == 0:
                return
        epoch += 1


def _step_rate(shards: Path, workdir: Path, precision: str, batch: int, steps: int, fed: bool) -> float:
    import torch

    from pipeline.data import make_loader
    from pipeline.train.models import build_model
    from pipeline.train.step import TrainStep, build_optimizer, setup_torch

    cfg = _resnet_config(shards, workdir, precision, batch)
    device = torch.device("cuda")
    setup_torch(cfg, device)
    loader = make_loader(shards, "train", batch_size=batch, backend="dali", device="gpu", preset="imagenet",
                         threads=len(os.sched_getaffinity(0)))
    model = build_model("resnet50", loader.num_classes, 3, 224)
    optimizer = build_optimizer(model, cfg.optim)
    step = TrainStep.from_config(model, optimizer, cfg, device)
    batches = _cycle(loader, steps + WARMUP_STEPS)
    if not fed:
        x, y = step.to_device(*next(batches))
        batches = ((x, y) for _ in range(steps + WARMUP_STEPS))
    for _ in range(WARMUP_STEPS):
        step(*next(batches))
    torch.cuda.synchronize()  # warm-up done (cuDNN autotune, allocator); the clock starts on an idle GPU
    t0 = time.perf_counter()
    for x, y in batches:
        loss = step(x, y)
    loss.item()  # host sync: every queued kernel has run
    return steps * batch / (time.perf_counter() - t0)


def _ray_rate(shards: Path, workdir: Path, batch: int) -> float:
    from pipeline.train.checkpoint import load_meta
    from pipeline.train.launch import fit

    cfg = _resnet_config(shards, workdir, "bf16", batch, ["train.epochs=2", "run.checkpoints_to_keep=2",
                                                          "scaling.gpus_per_worker=1", "scaling.use_gpu=true"])
    res = fit(cfg, console=False)
    metas = sorted((load_meta(p) for p in Path(res.storage_dir).glob("checkpoint_*") if p.is_dir()),
                   key=lambda m: m["epoch"])
    return metas[-1]["metrics"]["train_images_per_s"]


def run(*, quick: bool = False, workdir: Path | None = None) -> list[Result]:
    """Build the JPEG shards (always), then measure every case where CUDA is present."""
    import torch

    workdir = Path(workdir or tempfile.mkdtemp(prefix="gpu-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    batch, steps, repeats = (32, 5, 1) if quick else (256, 50, 3)
    # Enough train images (90 %) that every timed window, warm-up included, lies within one epoch: a DALI
    # pipeline is built per epoch, and building one inside the clock would be timed as loading.
    n = 64 if quick else _images_for(steps + WARMUP_STEPS, batch)
    shards = jpeg_shards(workdir, n)
    if not torch.cuda.is_available():
        print(SKIP_LINE, flush=True)
        return []
    params = {"images": n, "batch": batch, "steps": steps, "gpu": torch.cuda.get_device_name(0)}
    results = []
    rates: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved rounds
        for device in ("gpu", "cpu"):
            rates.setdefault(f"dali-{'mixed' if device == 'gpu' else 'cpu'} decode", []).append(
                _loader_rate(shards, device, batch, steps))
        for precision in ("bf16", "fp16"):
            for fed in (False, True):
                name = f"gpu-resnet50-{precision}-{'dali' if fed else 'synthetic'}"
                rates.setdefault(name, []).append(_step_rate(shards, workdir, precision, batch, steps, fed))
    for name, values in rates.items():
        role = "limit" if name.endswith("synthetic") else "baseline" if name == "dali-cpu decode" else "case"
        results.append(Result("gpu", name, role, "images_per_s", "images/s", values, params))
    torch.cuda.empty_cache()  # the Ray worker's process shares this GPU: leave it this process's cached blocks
    results.append(Result("gpu", "gpu-ray-1gpu", "case", "images_per_s", "images/s",
                          [_ray_rate(shards, workdir, batch)], {**params, "precision": "bf16", "epochs_measured": 1}))
    return results


def goals(results: list[Result]) -> list[Ratio]:
    """nvJPEG over DALI CPU, and loader-fed ResNet-50 over synthetic batches (goal ≥ 0.95)."""
    if not results:
        return []
    out = [ratio(results, "DALI mixed / DALI CPU decode", "dali-mixed decode", "dali-cpu decode",
                 metric="images_per_s")]
    for p in ("bf16", "fp16"):
        out.append(ratio(results, f"ResNet-50 {p}: DALI-fed / synthetic", f"gpu-resnet50-{p}-dali",
                         f"gpu-resnet50-{p}-synthetic", metric="images_per_s", goal=0.95))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 images, a few steps: checks the stage runs")
    parser.add_argument("--workdir", type=Path, default=None, help="keep images and shards here (reused)")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, workdir=args.workdir)
    for r in results:
        print(f"{r.case:<32} median {r.median:9.1f} images/s ±{r.spread:.0%} n={len(r.values)} "
              f"mean {statistics.fmean(r.values):.1f}")
    for g in goals(results):
        print(g.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
