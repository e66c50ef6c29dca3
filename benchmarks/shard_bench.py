"""Shard-build benchmark: `pipeline shard` next to `tar -cf` (byte-rate limit) and a Pillow loop (re-encode baseline).

Cases, all on the same ImageNet-like folder, measured in one run with repeats:
  pass-through        build without resizing (valid RGB JPEGs copied after a decode check)
  pass-through --check header   the same, trusting RGB JPEG headers (no decode): the tar-like mode
  resize-short 256    build with --resize-short 256 --quality 90
  tar -cf             GNU tar packing the same folder: the byte rate a shard writer can hope for
  pillow loop         one process: open → resize short side 256 → save JPEG q90
  pass-through Nw     scaling: the pass-through build with fewer local workers

Rates count source bytes (the image files) per second, so every case is measured on the same bytes.
Goal (issue): pass-through ≥ 0.9 × tar's byte rate.

    python -m benchmarks.shard_bench [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from benchmarks.common import Ratio, Result, machine_info, ratio, repeat, timed
from benchmarks.images import make_imagenet_like
from pipeline.shard.build import build
from pipeline.shard.config import ShardConfig


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.JPEG"))


def run(*, quick: bool = False, workdir: Path | None = None, workers: list[int] | None = None) -> list[Result]:
    """Measure every case; returns one images/s and one MB/s ``Result`` per case."""
    n, repeats = (60, 1) if quick else (1000, 3)
    cores = len(os.sched_getaffinity(0))
    workers = workers or sorted({1, min(2, cores)})
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="shard_bench_")) if own_tmp else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        src = make_imagenet_like(workdir / f"imagenet_like_{n}", n)
        files = _files(src)
        nbytes = sum(p.stat().st_size for p in files)
        out = workdir / "out"
        results: list[Result] = []

        def add(case: str, role: str, secs: list[float], **params) -> None:
            params = {"images": len(files), "source_mb": round(nbytes / 1e6, 1), **params}
            results.append(Result("shard", case, role, "images_per_s", "images/s", [len(files) / s for s in secs], params))
            results.append(Result("shard", case, role, "mb_per_s", "MB/s", [nbytes / 1e6 / s for s in secs], params))

        def shard_run(w: int, resize: int | None, check: str = "decode") -> float:
            shutil.rmtree(out, ignore_errors=True)
            config = ShardConfig(source=src, out_dir=out, workers=w, resize_short=resize, progress=False, check=check,
                                 samples_per_shard=max(1, len(files) // (4 * w)))  # several shards per worker
            secs, report = timed(lambda: build(config, log=io.StringIO()))
            assert report.manifest["splits"]["train"]["samples"] == len(files)
            return secs

        def tar_run() -> float:
            target = workdir / "tar_cf.tar"
            secs, _ = timed(lambda: subprocess.run(["tar", "-cf", str(target), "-C", str(src), "."], check=True))
            target.unlink()
            return secs

        def pillow_run() -> float:
            dst = workdir / "pillow"
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir()

            def loop() -> None:
                for i, p in enumerate(files):
                    with Image.open(p) as img:
                        w, h = img.size
                        s = 256 / min(w, h)
                        img.convert("RGB").resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC).save(
                            dst / f"{i}.jpg", quality=90)

            return timed(loop)[0]

        best = max(workers)
        add("tar -cf", "limit", repeat(tar_run, repeats))
        add("pass-through", "case", repeat(lambda: shard_run(best, None), repeats), workers=best,
            scaling=best, series="pass-through")
        add("pass-through --check header", "case", repeat(lambda: shard_run(best, None, "header"), repeats),
            workers=best)
        add("resize-short 256", "case", repeat(lambda: shard_run(best, 256), repeats), workers=best)
        add("pillow loop", "baseline", repeat(pillow_run, repeats), workers=1)
        for w in workers:
            if w != best:  # the best worker count is the "pass-through" case itself
                add(f"pass-through {w}w", "case", repeat(lambda: shard_run(w, None), repeats), workers=w,
                    scaling=w, series="pass-through")
        return results
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def goals(results: list[Result]) -> list[Ratio]:
    """Pass-through vs tar's byte rate (goal ≥ 0.9), resize vs the Pillow loop, and worker scaling."""
    out = [
        ratio(results, "pass-through / tar -cf", "pass-through", "tar -cf", metric="mb_per_s", goal=0.9),
        ratio(results, "pass-through --check header / tar -cf", "pass-through --check header", "tar -cf",
              metric="mb_per_s", goal=0.9),
        ratio(results, "resize-short 256 / pillow loop", "resize-short 256", "pillow loop", metric="images_per_s"),
    ]
    scaling = {int(r.params["scaling"]): r.case for r in results if "scaling" in r.params}
    if len(scaling) > 1:
        lo, hi = min(scaling), max(scaling)
        out.append(ratio(results, f"pass-through {hi} / {lo} workers", scaling[hi], scaling[lo], metric="images_per_s"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, a few seconds")
    parser.add_argument("--workdir", type=Path, default=None, help="keep generated images here (reused)")
    args = parser.parse_args()
    results = run(quick=args.quick, workdir=args.workdir)
    info = machine_info()
    print(f"machine: {info['cpus']} CPUs, {info['processor']}")
    print(f"{'case':<20} {'role':<9} {'images/s':>16} {'MB/s':>16}")
    by = {(r.case, r.metric): r for r in results}
    for case in dict.fromkeys(r.case for r in results):
        ips, mbs = by[(case, "images_per_s")], by[(case, "mb_per_s")]
        print(f"{case:<20} {ips.role:<9} {ips.median:>9.0f} ±{ips.spread:>4.0%} {mbs.median:>9.1f} ±{mbs.spread:>4.0%}")
    for g in goals(results):
        goal = "" if g.goal is None else f"  (goal ≥ {g.goal}: {'met' if g.met else 'NOT met'})"
        print(f"{g.name}: {g.value:.2f}{goal}")


if __name__ == "__main__":
    main()
