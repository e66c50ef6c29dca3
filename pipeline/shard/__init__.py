"""Shard builder: image collections → WebDataset tar shards + DALI indexes + checksummed ``index.json``.

Data flow, one module per arrow::

    sources.py     imagefolder | mnist-idx | cifar10 → sorted ``Record`` listing
    plan.py        seeded split, shuffle and record → shard assignment (deterministic)
    preprocess.py  per-sample pure functions: decode-check, to RGB, resize, encode
    write.py       one shard task: records → tar + idx + sha256, atomic, resumable
    executors.py   local process pool | Ray tasks running that same task
    manifest.py    index.json read/write
    build.py       orchestration of the above
    verify.py      ``pipeline verify``: checksums, tar structure, idx, counts
"""

from pipeline.shard.config import ShardConfig

__all__ = ["ShardConfig"]
