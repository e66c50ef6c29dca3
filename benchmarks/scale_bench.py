"""Cost growth to ImageNet size: build, resume, verify and load an ImageNet-shaped collection at growing N.

    pipeline bench scale                               # sizes 5k, 20k, 50k (what fits a 2-core VM)
    python -m benchmarks.scale_bench --sizes 10000 50000 200000 --out benchmarks/results

Per size N (``benchmarks.imagenet_gen`` folder layout, 1,000 classes, N/1,000 images each) and
per shard setting (the default 256 MB, and 2 MB: thousands of shards), each step in a fresh
process so that its peak RSS is its own:

  build          `pipeline shard` time, images/s, driver and worker peak RSS, index.json size
  no-op resume   the same command again, every shard already done
  verify         `pipeline verify` with 1 worker and with every core, interleaved (parallel speed-up)
  loader         DALI on the CPU, rank 0 of 1: time to the first batch, and to the first batch
                 of the next epoch (the per-epoch pipeline rebuild)

Plus a planning-only run at ImageNet's size (1,281,167 train + 50,000 val records, 1,000
classes, no files): listing, plan, fingerprint and manifest, and the loader's split at world
sizes 8, 64 and 512, with time and peak RSS. Each cost is fitted against N on log-log axes
(the slope: 1 is linear). Builds use ``--check header`` (pass-through after a header check,
the tar-like mode) so that the figures show the pipeline's own costs, not libjpeg's; the
decode check adds a constant per-image cost, linear by construction.

Repeats: one per build (minutes each at 50k), three for the cheaper steps; medians and spread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import HostLoad, Ratio, Result, load_range, machine_info, steal_note

SIZES = (5_000, 20_000, 50_000)
QUICK_SIZES = (200, 400)
SETTINGS = {"256MB": {"shard_size": 256 * 10**6}, "2MB": {"shard_size": 2 * 10**6}}
IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES = 1_281_167, 50_000, 1000
MEAN_BYTES = 110_000
# The ImageNet epoch that the per-epoch rebuild is compared with: 8 ranks reading 2,500 images/s
# each (a ResNet-50 step rate on current GPUs), i.e. 1,281,167 / 20,000 = 64 s. An assumption.
ASSUMED_IMAGES_PER_S = 8 * 2_500


# ----------------------------------------------------------------------------- child processes


def _rss() -> dict[str, float]:
    """Peak RSS of this process (VmHWM: ru_maxrss would carry the spawning parent's peak over exec)
    and of its largest finished child (the pool's workers, forked, so sharing the driver's pages)."""
    with open("/proc/self/status", encoding="ascii") as f:
        own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    return {"driver_rss_mb": own, "worker_rss_mb": kids}


def _child_build(a: dict[str, Any]) -> dict[str, Any]:
    import io

    from pipeline.shard.build import build
    from pipeline.shard.config import ShardConfig

    t0 = time.perf_counter()
    report = build(ShardConfig(source=a["src"], out_dir=a["out"], check="header", progress=False,
                               workers=a["workers"], shard_size=a["shard_size"]), log=io.StringIO())
    secs = time.perf_counter() - t0
    shards = sum(len(s["shards"]) for s in report.manifest["splits"].values())
    return {"seconds": secs, "written": report.written_shards, "shards": shards,
            "index_bytes": os.path.getsize(Path(a["out"]) / "index.json"), **_rss()}


def _child_verify(a: dict[str, Any]) -> dict[str, Any]:
    from pipeline.shard.verify import verify

    t0 = time.perf_counter()
    problems, _ = verify(a["out"], workers=a["workers"])
    assert not problems, problems[:3]
    return {"seconds": time.perf_counter() - t0, **_rss()}


def _child_loader(a: dict[str, Any]) -> dict[str, Any]:
    import nvidia.dali.plugin.pytorch  # noqa: F401 - imports are a once-per-process cost, not the loader's
    import torch  # noqa: F401

    from pipeline.data import make_loader

    t0 = time.perf_counter()
    loader = make_loader(a["out"], "train", batch_size=32, backend="dali", device="cpu")
    next(iter(loader))
    first = time.perf_counter() - t0
    loader.set_epoch(1)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    rebuild = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
        next(it)
    # The first batch of an epoch costs the pipeline build plus the prefetched batches' decoding;
    # the steady batch time says how much of it is decoding.
    return {"first_batch_s": first, "rebuild_s": rebuild, "batch_s": (time.perf_counter() - t0) / 3, **_rss()}


def _child_plan(a: dict[str, Any]) -> dict[str, Any]:
    """Plan, fingerprint, manifest and loader split for ImageNet-sized synthetic records (no image files)."""
    from pipeline.data.split import plan_split
    from pipeline.shard.config import ShardConfig
    from pipeline.shard.manifest import build_manifest, read_manifest
    from pipeline.shard.plan import fingerprint, make_plan
    from pipeline.shard.sources import Listing, Record, make_key
    from pipeline.shard.write import ShardResult

    n_train, n_val, n_cls = a["train"], a["val"], a["classes"]
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    sizes = rng.lognormal(np.log(MEAN_BYTES) - 0.18, 0.6, n_train + n_val).astype(np.int64).tolist()
    wnids = [f"n{1440764 + 1000 * i:08d}" for i in range(n_cls)]
    records = []
    for i in range(n_train):
        c = i * n_cls // n_train
        src = f"train/{wnids[c]}/{wnids[c]}_{i}.JPEG"
        records.append(Record(make_key(i), c, src, sizes[i], "train", src))
    for j in range(n_val):
        src = f"val/ILSVRC2012_val_{j + 1:08d}.JPEG"
        records.append(Record(make_key(n_train + j), j % n_cls, src, sizes[n_train + j], "val", j))
    listing = Listing("imagenet-kaggle", Path("/imagenet"), tuple(wnids), tuple(records), (), False, True)
    del records
    out["list_s"] = time.perf_counter() - t0
    config = ShardConfig(source="/imagenet", out_dir=a["dir"], shard_size=a["shard_size"], progress=False)
    t0 = time.perf_counter()
    plans = make_plan(listing, val_fraction=0.0, seed=0, samples_per_shard=config.samples_per_shard,
                      shard_size=config.shard_size)
    out["plan_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fingerprint(listing, config.output_options(), plans)
    out["fingerprint_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = [ShardResult(p.name, p.split, len(p.records), p.estimated_bytes, "0" * 64, [], p.estimated_bytes, 0,
                           {str(lab): n for lab, n in zip(*np.unique([r.label for r in p.records], return_counts=True))})
               for p in plans]
    manifest = build_manifest(source=Path("/imagenet"), fmt=listing.format, options=config.output_options(),
                              classes=list(wnids), results=results, skipped=[], summary={})
    shard_dir = Path(a["dir"])
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / "index.json").write_text(json.dumps(manifest, indent=1))
    out["manifest_s"] = time.perf_counter() - t0
    out["shards"] = len(plans)
    out["index_bytes"] = (shard_dir / "index.json").stat().st_size
    out.update({f"planned_{k}": v for k, v in _rss().items()})
    for r in results:  # stand-ins: the split checks the files exist and the tars' sizes, it never opens them
        (shard_dir / r.index).touch()
        with open(shard_dir / r.tar, "wb") as f:
            f.truncate(r.bytes)  # sparse: the listed size, no blocks on disk
    del plans, results, listing, manifest
    for world in a["worlds"]:
        t0 = time.perf_counter()
        plan_split(shard_dir, read_manifest(shard_dir), "train", rank=world - 1, world_size=world, batch_size=256)
        out[f"split_w{world}_s"] = time.perf_counter() - t0
    out.update(_rss())
    return out


_CHILDREN = {"build": _child_build, "verify": _child_verify, "loader": _child_loader, "plan": _child_plan}


def _run_child(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale_bench", "--child", kind, json.dumps(args)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"scale bench step {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the suite


def run(*, quick: bool = False, workdir: Path | None = None, sizes: tuple[int, ...] | None = None,
        keep: bool = False) -> list[Result]:
    """Measure every step at every size; returns ``Result``s (stage "scale") with ``params["n"]``."""
    from benchmarks.imagenet_gen import generate

    sizes = tuple(sizes or (QUICK_SIZES if quick else SIZES))
    classes = 10 if quick else 1000
    reps = 1 if quick else 3
    cores = len(os.sched_getaffinity(0))
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="scale_bench_")) if own_tmp else Path(workdir)
    results: list[Result] = []
    host = HostLoad()  # what else the machine did during each step: load average and CPU steal

    def step(case: str, n: int, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        with host.run(f"{case} N={n}"):
            return _run_child(kind, args)

    def add(case: str, metric: str, unit: str, values: list[float], step_case: str | None = None,
            **params: Any) -> None:  # step_case: the step that measured it, when not ``case``
        params.update(host.case_params(f"{step_case or case} N={params['n']}"))
        results.append(Result("scale", case, "case", metric, unit, [float(v) for v in values], params))

    try:
        for n in sizes:
            src = workdir / f"imagenet_{n}"
            t0 = time.perf_counter()
            stats = generate(src, layout="folder", num_classes=classes, per_class=max(1, n // classes), pool=96)
            gen_s = time.perf_counter() - t0
            n_real = stats["files"]
            print(f"[scale] N={n_real}: generated in {gen_s:.0f} s, mean {stats['mean_bytes'] / 1e3:.0f} KB",
                  file=sys.stderr)
            for name, setting in SETTINGS.items():
                out = workdir / f"out_{n}_{name}"
                shutil.rmtree(out, ignore_errors=True)
                args = {"src": str(src), "out": str(out), "workers": cores, **setting}
                b = step(f"build {name}", n_real, "build", args)
                p = {"n": n_real, "shards": b["shards"], "setting": name}
                add(f"build {name}", "seconds", "s", [b["seconds"]], **p)
                add(f"build {name}", "images_per_s", "images/s", [n_real / b["seconds"]], **p)
                add(f"build {name}", "driver_rss", "MB", [b["driver_rss_mb"]], **p)
                add(f"build {name}", "worker_rss", "MB", [b["worker_rss_mb"]], **p)
                add(f"build {name}", "index_json", "KB", [b["index_bytes"] / 1e3], **p)
                noop = [step(f"no-op resume {name}", n_real, "build", args) for _ in range(reps)]
                assert all(r["written"] == 0 for r in noop)
                add(f"no-op resume {name}", "seconds", "s", [r["seconds"] for r in noop], **p)
                v1, vn = [], []
                for _ in range(reps):  # interleaved: 1 worker, all cores, 1 worker, ...
                    v1.append(step(f"verify {name} 1w", n_real, "verify", {"out": str(out), "workers": 1})["seconds"])
                    vn.append(step(f"verify {name} {cores}w", n_real, "verify",
                                   {"out": str(out), "workers": cores})["seconds"])
                add(f"verify {name} 1w", "seconds", "s", v1, **p)
                add(f"verify {name} {cores}w", "seconds", "s", vn, **p, workers=cores)
                if not quick or n == sizes[-1]:  # --quick: the loader (seconds of imports) once per setting
                    loads = [step(f"loader {name}", n_real, "loader", {"out": str(out)}) for _ in range(reps)]
                    for case, key in (("loader start", "first_batch_s"), ("epoch rebuild", "rebuild_s"),
                                      ("steady batch", "batch_s")):
                        add(f"{case} {name}", "seconds", "s", [r[key] for r in loads], step_case=f"loader {name}", **p)
                print(f"[scale] N={n_real} {name}: {b['shards']} shards, build {b['seconds']:.1f} s", file=sys.stderr)
                if not keep:
                    shutil.rmtree(out, ignore_errors=True)
        results.extend(_planning(workdir, quick, host))
        if not own_tmp:  # `pipeline bench scale`: the table and the log-log plot beside the data
            (workdir / "scale.md").write_text(markdown(results, machine_info()), encoding="utf-8")
            plot(results, workdir / "scale-loglog.png")
            print(f"[scale] table and log-log plot: {workdir / 'scale.md'}, {workdir / 'scale-loglog.png'}",
                  file=sys.stderr)
        return results
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def _planning(workdir: Path, quick: bool, host: HostLoad | None = None) -> list[Result]:
    train, val = (5_000, 500) if quick else (IMAGENET_TRAIN, IMAGENET_VAL)
    worlds = [8, 64, 512]
    out = []
    host = host or HostLoad()
    for name, setting in SETTINGS.items():
        d = workdir / f"plan_{name}"
        shutil.rmtree(d, ignore_errors=True)
        with host.run(f"imagenet plan {name}"):
            r = _run_child("plan", {"train": train, "val": val, "classes": IMAGENET_CLASSES, "dir": str(d),
                                    "worlds": worlds, **setting})
        shutil.rmtree(d, ignore_errors=True)
        p = {"n": train + val, "shards": r["shards"], "setting": name, "planning_only": True,
             **host.case_params(f"imagenet plan {name}")}
        for key in ("list_s", "plan_s", "fingerprint_s", "manifest_s", *(f"split_w{w}_s" for w in worlds)):
            out.append(Result("scale", f"imagenet plan {name}", "case", key, "s", [r[key]], p))
        out.append(Result("scale", f"imagenet plan {name}", "case", "driver_rss", "MB", [r["planned_driver_rss_mb"]], p))
        out.append(Result("scale", f"imagenet plan {name}", "case", "index_json", "KB", [r["index_bytes"] / 1e3], p))
    return out


def slopes(results: list[Result]) -> dict[tuple[str, str], float]:
    """Log-log slope of each (case, metric) against N over the measured sizes (1.0 = linear)."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in results:
        if not r.params.get("planning_only") and r.metric != "images_per_s" and r.median > 0:
            series.setdefault((r.case, r.metric), []).append((r.params["n"], r.median))
    return {k: float(np.polyfit(np.log(xs), np.log(ys), 1)[0]) for k, pts in series.items()
            if len(pts) > 1 for xs, ys in [zip(*sorted(pts))]}


def estimates(results: list[Result]) -> dict[str, float]:
    """ImageNet-size figures derived from the largest measured N.

    The per-epoch rebuild overhead is the first batch of an epoch minus a steady batch; its
    per-shard cost is the difference between the two shard settings (same images, same
    decoding) over the difference in shard count, extrapolated to ImageNet's shard counts
    from the planning run, and compared with an epoch of ``ASSUMED_IMAGES_PER_S``.
    """
    by = {(r.case, r.metric, r.params.get("n")): r for r in results}
    sized = [r for r in results if not r.params.get("planning_only")]
    if not sized:
        return {}
    n_max = max(r.params["n"] for r in sized)
    out: dict[str, float] = {}
    plan_shards = {r.params["setting"]: r.params["shards"] for r in results if r.params.get("planning_only")}
    overhead, shards = {}, {}
    for name in SETTINGS:
        rebuild, batch = by.get((f"epoch rebuild {name}", "seconds", n_max)), by.get((f"steady batch {name}", "seconds", n_max))
        build, noop = by.get((f"build {name}", "seconds", n_max)), by.get((f"no-op resume {name}", "seconds", n_max))
        if build and noop:
            out[f"no-op resume / build, {name}, N={n_max:,}"] = noop.median / build.median
        if rebuild and batch:
            overhead[name] = max(0.0, rebuild.median - batch.median)
            shards[name] = rebuild.params["shards"]
    if len(overhead) == 2 and plan_shards:
        (a, b) = sorted(overhead, key=lambda k: shards[k])
        per_shard = max(0.0, (overhead[b] - overhead[a]) / max(1, shards[b] - shards[a]))
        out["rebuild overhead per shard (ms)"] = per_shard * 1e3
        epoch_s = IMAGENET_TRAIN / ASSUMED_IMAGES_PER_S
        for name in (a, b):
            est = overhead[a] + per_shard * (plan_shards.get(name, shards[name]) - shards[a])
            out[f"rebuild at ImageNet, {name} ({plan_shards.get(name, 0):,} shards) (s)"] = est
            out[f"rebuild / epoch at ImageNet, {name}"] = est / epoch_s
    return out


def goals(results: list[Result]) -> list[Ratio]:
    """Verify's parallel speed-up (goal ≥ 1.8 on 2 cores) and no-op resume / build (reported; goal ≤ 0.1)."""
    out = []
    n_max = max(r.params["n"] for r in results if not r.params.get("planning_only"))
    by = {(r.case, r.metric, r.params.get("n")): r for r in results}
    for name in SETTINGS:
        parallel = [r for r in results if r.case.startswith(f"verify {name} ") and "workers" in r.params
                    and r.params["n"] == n_max]
        one = by.get((f"verify {name} 1w", "seconds", n_max))
        if parallel and one:
            out.append(Ratio(f"verify {name}: 1 worker / {parallel[0].params['workers']} workers (time)",
                             one.case, parallel[0].case, one.median / parallel[0].median, goal=1.8, metric="seconds"))
    return out


# ----------------------------------------------------------------------------- report


def markdown(results: list[Result], info: dict[str, Any]) -> str:
    """The cost-growth table (one row per size and setting), slopes, ImageNet planning and estimates."""
    lines = [f"Machine: {info['cpus']} CPUs ({info['processor']}), Python {info['python']}. {host_line(results)}", "",
             "| N | shards | build s | img/s | driver RSS MB | worker RSS MB | index.json KB | no-op resume s "
             "| verify 1w s | verify all s | loader start s | epoch rebuild s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r.case, r.metric, r.params.get("n")): r for r in results}
    ns = sorted({r.params["n"] for r in results if not r.params.get("planning_only")})
    cores = next((r.params["workers"] for r in results if "workers" in r.params), 1)

    def cell(case: str, metric: str, n: int, fmt: str = "{:.2f}") -> str:
        r = by.get((case, metric, n))
        if r is None:
            return ""
        return fmt.format(r.median) + (f" ±{r.spread:.0%}" if len(r.values) > 1 else "")

    for name in SETTINGS:
        for n in ns:
            b = by.get((f"build {name}", "seconds", n))
            if b is None:
                continue
            lines.append(f"| {n:,} | {b.params['shards']:,} ({name}) | {cell(f'build {name}', 'seconds', n, '{:.1f}')} "
                         f"| {cell(f'build {name}', 'images_per_s', n, '{:.0f}')} "
                         f"| {cell(f'build {name}', 'driver_rss', n, '{:.0f}')} "
                         f"| {cell(f'build {name}', 'worker_rss', n, '{:.0f}')} "
                         f"| {cell(f'build {name}', 'index_json', n, '{:.0f}')} "
                         f"| {cell(f'no-op resume {name}', 'seconds', n)} | {cell(f'verify {name} 1w', 'seconds', n)} "
                         f"| {cell(f'verify {name} {cores}w', 'seconds', n)} | {cell(f'loader start {name}', 'seconds', n)} "
                         f"| {cell(f'epoch rebuild {name}', 'seconds', n)} |")
    lines += ["", "Log-log slopes against N (1.0 = linear; goal ≤ 1.1):", "", "| cost | slope |", "|---|---|"]
    lines += [f"| {case} {metric} | {s:.2f} |" for (case, metric), s in sorted(slopes(results).items())]
    plan = [r for r in results if r.params.get("planning_only")]
    if plan:
        lines += ["", f"Planning only, {plan[0].params['n']:,} records, 1,000 classes, no files:", "",
                  "| setting | shards | metric | value |", "|---|---|---|---|"]
        lines += [f"| {r.params['setting']} | {r.params['shards']:,} | {r.metric} | {r.median:.2f} {r.unit} |"
                  for r in plan]
    est = estimates(results)
    if est:
        lines += ["", f"Estimates at ImageNet size (epoch = 1,281,167 / {ASSUMED_IMAGES_PER_S:,} images/s, assumed):",
                  ""] + [f"- {k}: {v:.3g}" for k, v in est.items()]
    for g in goals(results):
        lines.append(f"- {g.name}: {g.value:.2f} (goal ≥ {g.goal}: {'met' if g.met else 'NOT met'})")
    return "\n".join(lines) + "\n"


def host_line(results: list[Result]) -> str:
    """What else the machine did during the steps: the range of the 1-minute load average at their starts, the
    most CPU time any step lost to other guests (steal), and ``steal_note``'s warning when one lost too much."""
    line = load_range([x for r in results for x in r.params.get("load_avg_1m", [])],
                      [x for r in results for x in r.params.get("cpu_steal", [])], "step")
    if not line:
        return ""
    line += "."
    note = steal_note([r.to_dict() for r in results])
    return f"{line} Note: {note}." if note else line


def plot(results: list[Result], path: Path) -> Path | None:
    """Log-log plot of every time/memory cost against N, with its fitted slope in the legend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    fits = slopes(results)
    for ax, units in zip(axes, (("s",), ("MB", "KB"))):
        for (case, metric), s in sorted(fits.items()):
            pts = sorted((r.params["n"], r.median) for r in results
                         if (r.case, r.metric) == (case, metric) and not r.params.get("planning_only"))
            unit = next(r.unit for r in results if (r.case, r.metric) == (case, metric))
            if unit in units:
                xs, ys = zip(*pts)
                ax.loglog(xs, ys, "o-", label=f"{case} {metric if metric != 'seconds' else ''} ({unit}): {s:.2f}")
        ax.set_xlabel("images (N)")
        ax.set_title("time" if units == ("s",) else "memory and index size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, title="slope", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARGS"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, about a minute; figures meaningless")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help=f"N values (default: {SIZES})")
    parser.add_argument("--workdir", type=Path, default=None, help="generated collections, kept for reuse")
    parser.add_argument("--out", type=Path, default=None, help="write scale-<host>.json/.md/.png here")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return 0
    results = run(quick=args.quick, workdir=args.workdir, sizes=tuple(args.sizes) if args.sizes else None)
    info = machine_info()
    text = markdown(results, info)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "scale-" + info["host"].split(".")[0] + ("-quick" if args.quick else "")
        (args.out / f"{stem}.json").write_text(json.dumps({"machine": info, "results": [r.to_dict() for r in results],
                                                         "slopes": {f"{c} {m}": s for (c, m), s in slopes(results).items()},
                                                         "estimates": estimates(results)}, indent=1))
        (args.out / f"{stem}.md").write_text(text)
        plot(results, args.out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
