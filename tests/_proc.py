"""Process-tree helpers for tests that start servers or kill workers: only ever touch our own processes."""

from __future__ import annotations

from pathlib import Path


def descendants(root: int) -> list[int]:
    """Process ids below ``root`` (read from /proc), so a test signals only what it started."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            ppid = int(rest.rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we read
        children.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def descendants_with(root: int, needle: bytes) -> list[int]:
    """Process ids below ``root`` whose command line contains ``needle`` (a Ray worker, a dashboard, …)."""
    found = []
    for pid in descendants(root):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue  # the process ended while we read
    return found
