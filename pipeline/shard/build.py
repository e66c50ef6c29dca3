"""``pipeline shard``: list → plan → run shard tasks → index.json, resumable and reproducible."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from pipeline.errors import UserError
from pipeline.fileio import make_writable_dir
from pipeline.progress import Progress
from pipeline.shard.config import ShardConfig
from pipeline.shard.executors import connect, run_tasks
from pipeline.shard.manifest import MANIFEST, PLAN_FILE, build_manifest
from pipeline.shard.plan import ShardPlan, fingerprint, make_plan
from pipeline.shard.sources import Listing, list_source
from pipeline.shard.write import ShardResult, read_done, write_json_atomic

_OUR_FILES = re.compile(r"(train|val)-\d{6}\.(tar|idx)|\.(train|val)-\d{6}\.done\.json|index\.json")
_OUR_TMP = re.compile(r"\.((train|val)-\d{6}\.(tar|idx)|\.(train|val)-\d{6}\.done\.json|index\.json)\.tmp-\d+")


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """The manifest written, plus run statistics that are not part of the output bytes."""

    manifest: dict[str, Any]
    seconds: float
    written_shards: int  # shards written by this run (the rest were already done)
    written_samples: int
    written_bytes: int
    input_bytes: int
    tasks_per_node: dict[str, int] = dataclasses.field(default_factory=dict)  # node IP ("local") → shards written


def build(config: ShardConfig, *, log: TextIO | None = None) -> BuildReport:
    """Build (or resume) the shards described by ``config`` and write ``index.json`` last."""
    log = log if log is not None else sys.stderr
    t0 = time.perf_counter()
    listing = list_source(config.source, config.format, config.classes_file, val_labels=config.val_labels,
                          class_names_file=config.class_names_file, exclude=config.out_dir)
    config = dataclasses.replace(config, format=listing.format)
    plans = make_plan(listing, val_fraction=config.val_fraction, seed=config.seed,
                      samples_per_shard=config.samples_per_shard, shard_size=config.shard_size, limit=config.limit)
    options = config.output_options()
    fp = fingerprint(listing, options, plans)

    results: dict[str, ShardResult] = {}
    todo: list[ShardPlan] = []
    for p in plans:
        done = read_done(config.out_dir, p.name)  # None while OUT_DIR does not exist yet
        if done is None:
            todo.append(p)
        else:
            results[p.name] = done
    if todo:
        # Before OUT_DIR is touched: an unreachable cluster fails fast and leaves nothing behind.
        connect(config)
    _prepare_out_dir(config.out_dir, fp, listing, options)  # refuses markers of another build read above
    planned = {p.name: len(p.records) for p in todo}
    if len(todo) < len(plans):
        print(f"resuming: {len(plans) - len(todo)} of {len(plans)} shards already done", file=log)
    written = dict(shards=0, samples=0, bytes=0, input=0)
    nodes: Counter = Counter()
    total = sum(len(p.records) for p in todo)
    with Progress(total, desc="shard", enabled=config.progress, stream=log) as bar:
        for r in run_tasks(todo, config, nodes):
            results[r.name] = r
            written["shards"] += 1
            written["samples"] += r.samples
            written["bytes"] += r.bytes
            written["input"] += r.input_bytes
            bar.update(planned[r.name], r.bytes)

    ordered = [results[p.name] for p in plans]
    skipped = [s.to_dict() for s in listing.skipped] + [s for r in ordered for s in r.skipped]
    if not any(r.samples for r in ordered):
        # Nothing of the build is worth keeping: without its plan and markers, a rerun once the source is
        # mended starts afresh instead of refusing OUT_DIR as another build's.
        for entry in os.listdir(config.out_dir):
            if _OUR_FILES.fullmatch(entry) or entry == PLAN_FILE:
                (config.out_dir / entry).unlink(missing_ok=True)
        raise UserError(f"no readable image in {config.source}: all {len(skipped)} inputs were skipped "
                        f"({_reason_counts(skipped)})")
    manifest = build_manifest(source=config.source, fmt=listing.format, options=options,
                              classes=list(listing.classes), class_names=listing.class_names,
                              results=ordered, skipped=skipped,
                              summary=_summary(listing, ordered, skipped))
    write_json_atomic(config.out_dir / MANIFEST, manifest)
    return BuildReport(manifest, time.perf_counter() - t0, written["shards"], written["samples"],
                       written["bytes"], written["input"], dict(sorted(nodes.items())))


def _prepare_out_dir(out_dir: Path, fp: str, listing: Listing, options: dict[str, Any]) -> None:
    """Create OUT_DIR, refuse to mix builds, and drop temporaries of a killed run."""
    make_writable_dir(out_dir, "OUT_DIR")
    plan_path = out_dir / PLAN_FILE
    wanted = {"fingerprint": fp, "source": str(listing.path), "format": listing.format,
              "classes": list(listing.classes), "options": options}
    if plan_path.exists():
        try:
            existing = json.loads(plan_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            existing = {}
        if not isinstance(existing, dict):  # valid JSON, but not a plan we wrote
            existing = {}
        if existing.get("fingerprint") != fp:
            raise UserError(f"OUT_DIR {out_dir} holds shards built {_difference(existing, wanted)}; "
                            "use another OUT_DIR or delete it to rebuild")
    else:
        ours = sorted(e for e in os.listdir(out_dir) if _OUR_FILES.fullmatch(e))
        if ours:
            raise UserError(f"OUT_DIR {out_dir} already holds shards ({ours[0]}) of an unknown build; "
                            "use an empty OUT_DIR")
    for entry in os.listdir(out_dir):
        if _OUR_TMP.fullmatch(entry):
            (out_dir / entry).unlink(missing_ok=True)
    if not plan_path.exists():
        write_json_atomic(plan_path, wanted)


def _difference(existing: dict[str, Any], wanted: dict[str, Any]) -> str:
    """Human wording of why a previous build does not match this one."""
    if not existing:
        return "by an unreadable plan"
    for key in ("source", "format", "classes"):
        if existing.get(key) != wanted[key]:
            return f"with {key} {existing.get(key)!r} (now {wanted[key]!r})"
    old = existing.get("options")
    old = old if isinstance(old, dict) else {}
    for key, value in wanted["options"].items():
        if old.get(key) != value:
            return f"with {key}={old.get(key)!r} (now {value!r})"
    return "from different source contents (files were added, removed or changed size)"


def _reason_counts(skipped: list[dict[str, Any]]) -> str:
    counts = Counter(s["reason"].split(":")[0] for s in skipped)
    return ", ".join(f"{n} {k}" for k, n in counts.most_common()) or "none"


def _summary(listing: Listing, results: list[ShardResult], skipped: list[dict[str, Any]]) -> dict[str, Any]:
    """Deterministic build summary for index.json (no timings: the manifest must be reproducible)."""
    out: dict[str, Any] = {"samples": {}, "shards": {}, "bytes": {}, "class_counts": {}}
    for split in ("train", "val"):
        rs = [r for r in results if r.split == split]
        out["samples"][split] = sum(r.samples for r in rs)
        out["shards"][split] = sum(1 for r in rs if r.samples)
        out["bytes"][split] = sum(r.bytes for r in rs)
        counts = Counter()
        for r in rs:
            counts.update({int(k): v for k, v in r.class_counts.items()})
        out["class_counts"][split] = [counts.get(i, 0) for i in range(len(listing.classes))]
    out["reencoded"] = sum(r.reencoded for r in results)
    out["passed_through"] = sum(r.samples for r in results) - out["reencoded"]
    out["skipped"] = dict(Counter(s["reason"].split(":")[0] for s in skipped).most_common())
    return out


def format_summary(report: BuildReport) -> str:
    """Human summary: samples, skips by reason, bytes and this run's throughput."""
    m = report.manifest
    s = m["summary"]
    lines = [
        f"wrote {m['splits']['train']['samples']} train + {m['splits']['val']['samples']} val samples "
        f"in {s['shards']['train']} + {s['shards']['val']} shards "
        f"({(s['bytes']['train'] + s['bytes']['val']) / 1e6:.1f} MB; "
        f"{s['passed_through']} passed through, {s['reencoded']} re-encoded)",
        f"skipped {sum(s['skipped'].values())}" + (": " + ", ".join(f"{n} {k}" for k, n in s["skipped"].items())
                                                  if s["skipped"] else ""),
    ]
    if report.written_shards:
        t = max(report.seconds, 1e-9)
        lines.append(f"this run: {report.written_shards} shards, {report.written_samples / t:.0f} images/s, "
                     f"{report.written_bytes / 1e6 / t:.1f} MB/s written ({report.seconds:.1f} s)")
    else:
        lines.append("this run: nothing to do, every shard was already complete")
    if len(report.tasks_per_node) > 1 or set(report.tasks_per_node) - {"local"}:
        lines.append("tasks per node: " + ", ".join(f"{n} {c}" for n, c in report.tasks_per_node.items()))
    return "\n".join(lines)
