"""What a run read and which code ran it: MLflow dataset inputs from index.json, and MLflow's source tags.

Datasets: each split (train, val) becomes one MLflow dataset input, named
``<shard dir name>/<split>``, with a digest over the sha256 of every shard of
the split and the build options (any rebuilt shard changes it; the same shards
give the same digest on every run), the shard directory as source, sample and
class counts as profile, and the sample schema. Context ``training`` /
``validation``, as MLflow's runs list shows them.

Code: captured by the driver (``capture_code``), where the checkout is, before
``ray job submit`` uploads a copy without ``.git``; the workers only turn it
into tags (``code_tags``). Where the driver itself runs from an uploaded copy
(``ray job submit --working-dir``), the commit comes from ``$PIPELINE_GIT_COMMIT``,
set at submission: ``-- env PIPELINE_GIT_COMMIT=$(git rev-parse HEAD) python -m pipeline.train …``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.fileio import is_uri

SPLIT_CONTEXT = {"train": "training", "val": "validation"}
SCHEMA = {"mlflow_colspec": [
    {"name": "image", "type": "binary", "required": True},
    {"name": "label", "type": "long", "required": True},
]}


def split_digest(manifest: dict[str, Any], split: str) -> str:
    """12 hex digits over the split's shard checksums, in order, and the build options."""
    h = hashlib.sha256()
    h.update(json.dumps(manifest.get("options", {}), sort_keys=True).encode())
    h.update(json.dumps(manifest.get("classes", [])).encode())
    for shard in manifest["splits"][split]["shards"]:
        h.update(f"{shard['tar']}:{shard['sha256']}\n".encode())
    return h.hexdigest()[:12]


def dataset_inputs(shards: str | Path, manifest: dict[str, Any], splits: dict[str, str]) -> list[dict[str, Any]]:
    """MLflow ``Dataset`` fields plus context for each of ``splits`` ({split: context}), as plain dicts."""
    shards = str(shards)
    counts = manifest.get("summary", {}).get("class_counts", {})
    out = []
    for split, context in splits.items():
        if split not in manifest["splits"]:
            continue
        info = manifest["splits"][split]
        profile = {"num_samples": info["samples"], "num_shards": len(info["shards"]), "bytes": info["bytes"],
                   "num_classes": manifest.get("num_classes", len(manifest.get("classes", [])))}
        if split in counts:
            profile["class_counts"] = dict(zip(manifest.get("classes", []), counts[split]))
        source = {"uri": shards} if is_uri(shards) else {"path": shards}
        out.append({"context": context, "dataset": {
            "name": f"{Path(shards.rstrip('/')).name}/{split}",
            "digest": split_digest(manifest, split),
            "source_type": "uri" if is_uri(shards) else "local",
            "source": json.dumps(source),
            "schema": json.dumps(SCHEMA),
            "profile": json.dumps(profile),
        }})
    return out


def capture_code(argv: list[str] | None = None, where: Path | None = None) -> dict[str, str]:
    """The driver's view of the code: git commit (when in a checkout), package version, command line, user."""
    argv = list(sys.argv if argv is None else argv)
    where = where or Path(__file__).resolve().parents[2]
    code = {"version": __version__, "command": _command_line(argv), "source_name": "pipeline train"}
    try:
        code["user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    commit = _git(where, "rev-parse", "HEAD")
    if not commit and os.environ.get("PIPELINE_GIT_COMMIT"):
        code["commit"] = os.environ["PIPELINE_GIT_COMMIT"]
    elif commit:
        code["commit"] = commit
        code["dirty"] = "true" if _git(where, "status", "--porcelain", "--untracked-files=no") else "false"
        branch = _git(where, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            code["branch"] = branch
    return code


def _command_line(argv: list[str]) -> str:
    """The command as typed: ``pipeline train …`` or ``python -m pipeline.train …`` rather than a script path."""
    if not argv:
        return ""
    first = Path(argv[0])
    if first.name == "__main__.py" and first.parent.name == "train":
        head = ["python", "-m", "pipeline.train"]
    else:
        head = [first.name]
    return shlex.join([*head, *argv[1:]])


def _git(where: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_tags(code: dict[str, str]) -> dict[str, str]:
    """MLflow's standard source tags (the runs list's Source column) and ours, from ``capture_code``."""
    tags = {"mlflow.source.name": code.get("source_name", "pipeline train"), "mlflow.source.type": "JOB",
            "pipeline.version": code.get("version", __version__), "pipeline.command": code.get("command", "")[:5000]}
    if code.get("user"):
        tags["mlflow.user"] = code["user"]
    if code.get("commit"):
        tags["mlflow.source.git.commit"] = code["commit"]
        tags["pipeline.git_dirty"] = code.get("dirty", "false")
    if code.get("branch"):
        tags["mlflow.source.git.branch"] = code["branch"]
    return tags


__all__ = ["SPLIT_CONTEXT", "capture_code", "code_tags", "dataset_inputs", "split_digest"]
