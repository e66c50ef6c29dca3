"""``index.json``: the manifest written last, whose presence means a complete build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "index.json"
PLAN_FILE = ".shard-plan.json"  # written first by a build and kept: the folder holds (or will hold) a shard set
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
    """Load ``shard_dir/index.json``; ``UserError`` when it is missing, unreadable, of another version or
    not shaped as ``build_manifest`` writes it (the first problem, by key path)."""
    path = Path(shard_dir) / MANIFEST
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        started = Path(shard_dir, PLAN_FILE).is_file()  # a build began here
        if not started and not Path(shard_dir).exists():
            raise UserError(f"{shard_dir} does not exist") from None
        hint = (" (the build has not finished: rerun `pipeline shard` to resume)" if started
                else " (not a shard directory: `pipeline shard SOURCE DIR` makes one)" if Path(shard_dir).is_dir()
                else "")
        raise UserError(f"no {MANIFEST} in {shard_dir}{hint}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or not _is(manifest.get("format_version"), int) \
            or manifest["format_version"] != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UserError(f"{path}: format_version {found!r} is not supported (expected {FORMAT_VERSION})")
    problem = _structure_problem(manifest)
    if problem:
        raise UserError(f"{path}: {problem}; rerun the `pipeline shard` command that built it to rewrite it")
    return manifest


_SHARD_FIELDS = {"tar": str, "index": str, "samples": int, "bytes": int, "sha256": str}


def size_mismatch(shard_dir: str | Path, shard: dict[str, Any]) -> int | None:
    """The size of ``shard``'s tar when it is not the ``bytes`` index.json lists (cut short or written
    over), else None. One ``stat``: cheap enough for every start; the contents are a sha256's job."""
    size = (Path(shard_dir) / shard["tar"]).stat().st_size
    return None if size == shard["bytes"] else size


def size_problem(shard_dir: str | Path, shard: dict[str, Any]) -> str | None:
    """``size_mismatch`` as the one line that every reader of the shards (each node's probe, each loader) gives."""
    size = size_mismatch(shard_dir, shard)
    if size is None:
        return None
    index = Path(shard_dir) / "index.json"
    return (f"{Path(shard_dir) / shard['tar']} is {size:,} bytes where {index} lists {shard['bytes']:,}: "
            f"an incomplete or changed copy (`pipeline verify {shard_dir}` checks every shard)")


def _structure_problem(manifest: dict[str, Any]) -> str | None:
    """The first way ``manifest`` differs from what ``build_manifest`` writes, or None.

    Every reader (verify, the loaders, training) indexes these keys without checking them, so
    a hand-edited or half-written index.json is caught here, once, instead of as a traceback.
    """
    for key, kind in (("classes", list), ("num_classes", int), ("preset", str), ("splits", dict)):
        if key not in manifest:
            return f"missing {key!r}"
        if not _is(manifest[key], kind):
            return f"{key!r} is {_kind(manifest[key])}, expected {_KIND_NAMES[kind]}"
    classes = manifest["classes"]
    if not classes or not all(isinstance(c, str) for c in classes):
        return "'classes' must be a non-empty list of class names"
    if manifest["num_classes"] != len(classes):
        return f"'num_classes' is {manifest['num_classes']} but 'classes' lists {len(classes)}"
    if "class_names" in manifest and not _is(manifest["class_names"], list):
        return f"'class_names' is {_kind(manifest['class_names'])}, expected a list"
    if not manifest["splits"]:
        return "'splits' lists no split"
    for split, info in manifest["splits"].items():
        where = f"splits.{split}"
        if not _is(info, dict):
            return f"{where!r} is {_kind(info)}, expected an object"
        for key, kind in (("samples", int), ("bytes", int), ("shards", list)):
            if key not in info:
                return f"{where!r} has no {key!r}"
            if not _is(info[key], kind) or (kind is int and info[key] < 0):
                return f"'{where}.{key}' is {_kind(info[key])}, expected {_KIND_NAMES[kind]}"
        for i, shard in enumerate(info["shards"]):
            at = f"{where}.shards[{i}]"
            if not _is(shard, dict):
                return f"{at!r} is {_kind(shard)}, expected an object"
            for key, kind in _SHARD_FIELDS.items():
                if key not in shard:
                    return f"{at!r} has no {key!r}"
                value = shard[key]
                if not _is(value, kind) or (kind is int and value < 0) or (kind is str and not value):
                    return f"'{at}.{key}' is {_kind(value)}, expected {_KIND_NAMES[kind]}"
    return None


_KIND_NAMES = {list: "a list", dict: "an object", str: "a non-empty string", int: "a non-negative integer"}


def _is(value: Any, kind: type) -> bool:
    # JSON true/false load as bool, a subclass of int: never a count.
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
