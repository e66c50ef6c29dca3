"""``index.json``: the manifest written last, whose presence means a complete build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "index.json"
DEFAULT_PRESETS = {"mnist-idx": "mnist", "cifar10": "cifar", "imagefolder": "imagenet", "imagenet-tar": "imagenet",
                   "imagenet-kaggle": "imagenet"}


def build_manifest(*, source: Path, fmt: str, options: dict[str, Any], classes: list[str],
                   results: list[Any], skipped: list[dict[str, Any]], summary: dict[str, Any],
                   class_names: Any = None) -> dict[str, Any]:
    """The index.json document for finished shard ``results`` (in plan order).

    ``class_names``: human names aligned with ``classes`` (stored when known).

    Shards whose every input was skipped hold nothing and are left out of the shard lists.
    """
    splits: dict[str, Any] = {}
    for split in ("train", "val"):
        shards = [
            {"tar": r.tar, "index": r.index, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256}
            for r in results if r.split == split and r.samples
        ]
        splits[split] = {"samples": sum(s["samples"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
                         "shards": shards}
    names = {"class_names": list(class_names)} if class_names else {}
    return {
        "format_version": FORMAT_VERSION,
        "created_by": f"pipeline {__version__}",
        "source": {"path": str(source), "format": fmt},
        "options": options,
        "classes": list(classes),
        "num_classes": len(classes),
        **names,
        "preset": DEFAULT_PRESETS[fmt],
        "splits": splits,
        "skipped": skipped,
        "summary": summary,
    }


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Load ``shard_dir/index.json``; ``UserError`` when it is missing, unreadable or of another version."""
    path = Path(shard_dir) / MANIFEST
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        hint = " (the build has not finished: rerun `pipeline shard` to resume)" if Path(shard_dir).is_dir() else ""
        raise UserError(f"no {MANIFEST} in {shard_dir}{hint}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UserError(f"{path}: format_version {found!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("classes", "splits", "preset"):
        if key not in manifest:
            raise UserError(f"{path}: missing {key!r}")
    return manifest
