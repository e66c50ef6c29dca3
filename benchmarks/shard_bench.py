"""Shard-build benchmark: `pipeline shard` against the per-image work it must do, and `tar -cf`.

All cases read the same folder of ImageNet-like JPEGs (10,000 in the full run) and use the same
shard layout (several shards per worker, so every worker has work), measured in one run, cases
interleaved (A B C … A B C …), medians of the repeats:

  build Nw             ``pipeline shard`` (decode check: every JPEG decoded at 1/8 DCT scale) with N workers
  per-image work Nw    limit: the same per-image work in a bare loop over N processes (a fork pool
                       started inside the clock, as the build's): read the file + ``preprocess.process_file``
                       + sha256 + write a
                       ustar member into one file per shard, fsynced — no planning, markers, idx or manifest
  build --check header the header-checked build (no decode) with all workers
  tar -cf              GNU tar packing the same folder: the byte-copy reference (no check, no hash, no fsync)
  start-up Nw          seconds of a build of 2 images with N workers: scan, plan, pool, manifest;
                       reported on its own (and part of every build's wall time above)

Goals: build ≥ 0.8 × per-image work at N = 1 and N = cores; ``--check header`` ≥ 0.5 × tar's
byte rate; 1 → 2 workers ≥ 1.8×.

    python -m benchmarks.shard_bench [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.common import HostLoad, Ratio, Result, machine_info, now_utc, print_steal_note, ratio
from benchmarks.images import make_imagenet_like
from benchmarks.report import report_if_asked, stage_options
from pipeline.shard import preprocess
from pipeline.shard.build import build
from pipeline.shard.config import ShardConfig
from pipeline.shard.write import member_header

MAX_PIXELS = ShardConfig.max_pixels  # the build's default limit


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.JPEG"))


def per_image_work(job: tuple[list[str], str, str]) -> int:
    """What a shard task must do per image, nothing else: read, check, hash, write, fsync once per shard."""
    paths, out, check = job
    sha = hashlib.sha256()
    with open(out, "wb", buffering=1 << 20) as f:
        for i, p in enumerate(paths):
            with open(p, "rb") as src:
                data = src.read()
            enc = preprocess.process_file(data, resize=None, quality=90, max_pixels=MAX_PIXELS, check=check)
            header = member_header(f"{i:09d}.jpg", len(enc.data))
            pad = b"\0" * (-len(enc.data) % 512)
            for chunk in (header, enc.data, pad):
                f.write(chunk)
                sha.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.unlink(out)
    return len(paths)


def run(*, quick: bool = False, workdir: Path | None = None, repeats: int | None = None) -> list[Result]:
    """Measure every case, interleaved; one images/s and one MB/s ``Result`` per case, plus start-up seconds."""
    n = 120 if quick else 10_000
    repeats = repeats or (1 if quick else 3)
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, cores})
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="shard_bench_")) if own_tmp else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        src = make_imagenet_like(workdir / f"imagenet_like_{n}", n)
        tiny = make_imagenet_like(workdir / "imagenet_like_2", 2)
        files = _files(src)
        nbytes = sum(p.stat().st_size for p in files)
        per_shard = math.ceil(len(files) / (4 * max(counts)))  # 4 shards per worker at the most workers
        chunks = [[str(p) for p in files[i:i + per_shard]] for i in range(0, len(files), per_shard)]
        out = workdir / "out"

        def build_run(w: int, check: str = "decode", source: Path = src, shard_size: int = per_shard) -> float:
            shutil.rmtree(out, ignore_errors=True)
            config = ShardConfig(source=source, out_dir=out, workers=w, progress=False, check=check,
                                 samples_per_shard=shard_size)
            t0 = time.perf_counter()
            report = build(config, log=io.StringIO())
            secs = time.perf_counter() - t0
            assert report.manifest["splits"]["train"]["samples"] == len(_files(source))
            return secs

        def limit_run(w: int, check: str = "decode") -> float:
            jobs = [(c, str(workdir / f"limit-{i}.tar"), check) for i, c in enumerate(chunks)]
            t0 = time.perf_counter()
            if w == 1:
                done = sum(map(per_image_work, jobs))
            else:  # a fork pool started inside the clock, as the build's own (no threads run here)
                with ProcessPoolExecutor(max_workers=w, mp_context=multiprocessing.get_context("fork")) as pool:
                    done = sum(pool.map(per_image_work, jobs))
            secs = time.perf_counter() - t0
            assert done == len(files)
            return secs

        def tar_run() -> float:
            target = workdir / "tar_cf.tar"
            t0 = time.perf_counter()
            subprocess.run(["tar", "-cf", str(target), "-C", str(src), "."], check=True)
            secs = time.perf_counter() - t0
            target.unlink()
            return secs

        plan: list[tuple[str, str, object, dict]] = []
        for w in counts:
            plan.append((f"build {w}w", "case", lambda w=w: build_run(w), {"workers": w, "scaling": w,
                                                                            "series": "build (decode check)"}))
            plan.append((f"per-image work {w}w", "limit", lambda w=w: limit_run(w), {"workers": w, "scaling": w,
                                                                                    "series": "per-image work"}))
        best = max(counts)
        plan += [("build --check header", "case", lambda: build_run(best, "header"), {"workers": best}),
                 ("per-image work header", "limit", lambda: limit_run(best, "header"), {"workers": best}),
                 ("tar -cf", "limit", tar_run, {})]
        plan += [(f"start-up {w}w", "startup", lambda w=w: build_run(w, source=tiny, shard_size=1), {"workers": w})
                 for w in counts]
        secs: dict[str, list[float]] = {name: [] for name, *_ in plan}
        host = HostLoad()
        for _ in range(repeats):
            for name, _, fn, _ in plan:
                with host.run(name):
                    secs[name].append(fn())

        results: list[Result] = []
        common = {"images": len(files), "source_mb": round(nbytes / 1e6, 1), "samples_per_shard": per_shard,
                  "shards": len(chunks)}
        for name, role, _, params in plan:
            p = {**common, **params, **host.params(name)}
            if role == "startup":
                results.append(Result("shard", name, "baseline", "startup_s", "s", secs[name], p))
                continue
            results.append(Result("shard", name, role, "images_per_s", "images/s",
                                  [len(files) / s for s in secs[name]], p))
            results.append(Result("shard", name, role, "mb_per_s", "MB/s", [nbytes / 1e6 / s for s in secs[name]], p))
        return results
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def goals(results: list[Result]) -> list[Ratio]:
    """Build vs its per-image work at 1 and all workers (≥ 0.8), header check vs tar (≥ 0.5), scaling (≥ 1.8)."""
    counts = sorted({int(r.params["workers"]) for r in results if r.case.startswith("build ") and "workers" in r.params
                     and r.case != "build --check header"})
    out = [ratio(results, f"build {w}w / per-image work {w}w", f"build {w}w", f"per-image work {w}w",
                 metric="images_per_s", goal=0.8) for w in counts]
    out.append(ratio(results, "build --check header / tar -cf", "build --check header", "tar -cf",
                     metric="mb_per_s", goal=0.5))
    if len(counts) > 1:
        lo, hi = counts[0], counts[-1]
        out.append(ratio(results, f"build {hi}w / {lo}w", f"build {hi}w", f"build {lo}w", metric="images_per_s",
                         goal=1.8 if (lo, hi) == (1, 2) else None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stage_options(parser, quick="tiny data, a few seconds", workdir="keep generated images here (reused)")
    args = parser.parse_args()
    started, t0 = now_utc(), time.perf_counter()
    results = run(quick=args.quick, workdir=args.workdir, repeats=args.repeats)
    report_if_asked("shard", "benchmarks.shard_bench", args, results, goals(results), started=started,
                    seconds=time.perf_counter() - t0)
    info = machine_info()
    print(f"machine: {info['cpus']} CPUs, {info['processor']}; load avg (1 min) per case: "
          f"{results[0].params['load_avg_1m']}")
    for r in results:
        print(f"{r.case:<24} {r.role:<9} {r.metric:<12} {r.median:>9.2f} ±{r.spread:>4.0%}  "
              f"{[round(v, 2) for v in r.values]}")
    for g in goals(results):
        print(g.line())
    print_steal_note(results)


if __name__ == "__main__":
    main()
