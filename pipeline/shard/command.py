"""``pipeline shard`` and ``pipeline verify`` subcommands."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.config import parse_size
from pipeline.errors import UserError
from pipeline.shard.config import (DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, DEFAULT_SAMPLES_PER_SHARD,
                                   DEFAULT_SHARD_SIZE, ShardConfig)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``shard`` and ``verify`` to the ``pipeline`` command."""
    p = subparsers.add_parser(
        "shard", help="pack an image collection into WebDataset shards with DALI indexes",
        description="Pack SOURCE (image folder, MNIST idx files or CIFAR-10 batches) into OUT_DIR as "
                    "WebDataset tar shards, DALI .idx files and index.json. Rerunning resumes.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--format", default="auto",
                   help="auto | imagefolder | mnist-idx | cifar10 | imagenet-tar | imagenet-kaggle (default: auto)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="stratified seeded val split for sources without their own (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the global shuffle (default: 0)")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                   help=f"most samples per shard (default: {DEFAULT_SAMPLES_PER_SHARD})")
    p.add_argument("--shard-size", default=str(DEFAULT_SHARD_SIZE // 10**6) + "MB",
                   help="target shard size from input sizes, e.g. 256MB, 1GiB (default: 256MB)")
    p.add_argument("--resize-short", type=int, default=None,
                   help="downscale so the short side is N (never upscales); re-encodes resized JPEGs")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                   help=f"JPEG quality of re-encoded images (default: {DEFAULT_QUALITY})")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"skip images with more pixels (decompression-bomb guard; default: {DEFAULT_MAX_PIXELS})")
    p.add_argument("--check", default="decode",
                   help="decode: fully decode every image to prove it is readable (default); header: copy "
                        "RGB JPEGs after a header check only, at tar-like speed, for trusted collections")
    p.add_argument("--limit", type=int, default=None, help="at most N samples per split (seeded subset)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: CPU count)")
    p.add_argument("--executor", default="local", help="local | ray (default: local)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address for --executor ray")
    p.add_argument("--classes", default=None, metavar="FILE", help="class names in label order, one per line")
    p.add_argument("--val-labels", default=None, metavar="FILE",
                   help="labels of a flat val folder or ImageNet's val tar: CSV or text lines 'file wnid|index' "
                        "(default: LOC_val_solution.csv beside SOURCE)")
    p.add_argument("--class-names", default=None, metavar="FILE",
                   help="'wnid human name' lines stored in index.json (default: LOC_synset_mapping.txt beside SOURCE)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=run_shard, on_interrupt="finished shards are kept: run the same command again to continue")

    v = subparsers.add_parser("verify", help="check shards against index.json",
                              description="Recompute checksums, parse every tar and idx, compare counts.")
    v.add_argument("out_dir", metavar="OUT_DIR")
    v.add_argument("--decode", action="store_true", help="also decode every image and check it is RGB")
    v.add_argument("--workers", type=int, default=None, help="shards checked in parallel (default: CPU count)")
    v.set_defaults(func=run_verify)


def config_from_args(args: argparse.Namespace) -> ShardConfig:
    """``ShardConfig`` from parsed ``pipeline shard`` arguments (``UserError`` on invalid values)."""
    kwargs = dict(
        source=args.source, out_dir=args.out_dir, format=args.format, val_fraction=args.val_fraction,
        seed=args.seed, samples_per_shard=args.samples_per_shard, shard_size=parse_size(args.shard_size),
        resize_short=args.resize_short, quality=args.quality, max_pixels=args.max_pixels, check=args.check,
        limit=args.limit,
        executor=args.executor, ray_address=args.ray_address, classes_file=args.classes,
        val_labels=args.val_labels, class_names_file=args.class_names,
        progress=not args.no_progress,
    )
    if args.workers is not None:
        kwargs["workers"] = args.workers
    try:
        return ShardConfig(**kwargs)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def run_shard(args: argparse.Namespace) -> int:
    """Entry point of ``pipeline shard``."""
    from pipeline.shard.build import build, format_summary

    report = build(config_from_args(args))
    print(format_summary(report))
    print(f"manifest: {os.path.join(args.out_dir, 'index.json')}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Entry point of ``pipeline verify``: 0 when every check holds, 1 otherwise."""
    from pipeline.shard.verify import format_report, verify

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    problems, counts = verify(args.out_dir, decode=args.decode, workers=args.workers)
    print(format_report(problems, counts), file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0
