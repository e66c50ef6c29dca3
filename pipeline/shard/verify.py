"""``pipeline verify``: recompute checksums, re-parse every tar and idx, recount against index.json."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.shard.executors import process_pool
from pipeline.shard.manifest import read_manifest, size_mismatch
from pipeline.shard.write import idx_text

IMAGE_EXTS = ("jpg", "png")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(out_dir: str | Path, *, decode: bool = False, workers: int | None = None) -> tuple[list[str], dict[str, int]]:
    """Check every shard listed in ``out_dir/index.json``, ``workers`` processes at a time (default: the cores).

    Returns ``(problems, counts)``: one line per problem naming the file, and the samples
    found per split, in manifest order whatever the worker count. With ``decode``, every
    image is also decoded and must be RGB.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    num_classes = int(manifest["num_classes"])
    problems: list[str] = []
    counts: dict[str, int] = {}
    jobs = [(split, shard) for split, info in manifest["splits"].items() for shard in info["shards"]]
    workers = min(workers or len(os.sched_getaffinity(0)), len(jobs)) or 1
    args = [(out_dir, shard, num_classes, decode) for _, shard in jobs]
    if workers == 1:
        outcomes = [_verify_job(a) for a in args]
    else:
        with process_pool(workers) as pool:
            # Shards are large (seconds each at the default size): a small chunk keeps the cores even.
            outcomes = list(pool.map(_verify_job, args, chunksize=max(1, len(args) // (workers * 16))))
    found_in: dict[str, int] = {split: 0 for split in manifest["splits"]}
    for (split, shard), (n, shard_problems) in zip(jobs, outcomes):
        problems.extend(f"{shard['tar']}: {p}" for p in shard_problems)
        found_in[split] += n
    for split, info in manifest["splits"].items():
        found = found_in[split]
        counts[split] = found
        if found != info["samples"]:
            problems.append(f"{split}: {found} samples in shards, index.json says {info['samples']}")
    return problems, counts


def _verify_job(args: tuple[Path, dict[str, Any], int, bool]) -> tuple[int, list[str]]:
    out_dir, shard, num_classes, decode = args
    return verify_shard(out_dir, shard, num_classes, decode=decode)


def verify_shard(out_dir: Path, shard: dict[str, Any], num_classes: int, *, decode: bool = False) -> tuple[int, list[str]]:
    """Problems of one shard (empty when sound) and the number of samples its tar holds."""
    tar_path, idx_path = out_dir / shard["tar"], out_dir / shard["index"]
    if not tar_path.is_file():
        return 0, ["missing"]
    problems = []
    size = size_mismatch(out_dir, shard)
    if size is not None:
        problems.append(f"size {size} bytes, index.json says {shard['bytes']} (truncated or replaced)")
    if sha256_file(tar_path) != shard["sha256"]:
        problems.append("sha256 does not match index.json (corrupted)")
    samples: list[list[tuple[str, int, int, str]]] = []
    keys: list[str] = []
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    problems.append(f"member {m.name!r} is not a regular file")
                    continue
                key, _, ext = m.name.partition(".")
                if not keys or keys[-1] != key:
                    keys.append(key)
                    samples.append([])
                samples[-1].append((ext, m.offset_data, m.size, m.name))
                if ext == "cls" or (decode and ext in IMAGE_EXTS):
                    data = tar.extractfile(m).read()  # in memory only, never extracted to disk
                    problems.extend(_check_member(key, ext, data, num_classes))
    except (tarfile.TarError, OSError, EOFError) as exc:
        return len(samples), problems + [f"unreadable tar: {exc}"]
    if len(set(keys)) != len(keys):
        problems.append("a key appears in more than one place (members of a sample must be adjacent)")
    for key, members in zip(keys, samples):
        exts = [e for e, *_ in members]
        if sum(e in IMAGE_EXTS for e in exts) != 1 or "cls" not in exts or "json" not in exts:
            problems.append(f"sample {key} has members {exts}; expected one of {IMAGE_EXTS}, cls and json")
    if len(samples) != shard["samples"]:
        problems.append(f"{len(samples)} samples in the tar, index.json says {shard['samples']}")
    try:
        idx = idx_path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"index {shard['index']} unreadable: {exc}")
    else:
        if idx != idx_text(samples):
            problems.append(f"index {shard['index']} does not match the tar's members and offsets")
    return len(samples), problems


def _check_member(key: str, ext: str, data: bytes, num_classes: int) -> list[str]:
    if ext == "cls":
        try:
            label = int(data.decode("ascii"))
        except ValueError:
            return [f"sample {key}: cls {data[:20]!r} is not a decimal label"]
        return [] if 0 <= label < num_classes else [f"sample {key}: label {label} outside 0..{num_classes - 1}"]
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
    except (OSError, SyntaxError, ValueError) as exc:
        return [f"sample {key}: image does not decode: {exc}"]
    return [] if mode == "RGB" else [f"sample {key}: image mode {mode}, expected RGB"]


# A rerun of the build rewrites a shard whose tar is gone or has another size than its done marker records.
REPAIR = ("to rebuild a damaged shard: delete its .tar and run the same `pipeline shard` command again "
          "(the source must still be there); it rewrites only the shards that are missing")


def format_report(problems: list[str], counts: dict[str, int]) -> str:
    """One line per problem and how to mend the shards, or a one-line all-clear."""
    if problems:
        return "\n".join([*problems, REPAIR])
    return "ok: " + ", ".join(f"{n} {s} samples" for s, n in counts.items()) + " verified"


__all__ = ["format_report", "sha256_file", "verify", "verify_shard"]
