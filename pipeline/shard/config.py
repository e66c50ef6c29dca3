"""``ShardConfig``: every option of ``pipeline shard``, validated once, frozen."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

Format = Literal["auto", "imagefolder", "mnist-idx", "cifar10", "imagenet-tar", "imagenet-kaggle"]
FORMATS = ("auto", "imagefolder", "mnist-idx", "cifar10", "imagenet-tar", "imagenet-kaggle")
Executor = Literal["local", "ray"]
Check = Literal["decode", "header"]

# ImageNet's mean JPEG is ~110 KB, so 256 MB shards hold ~2,300 images: large enough for
# sequential reads at full disk/network speed, small enough for ~560 shards to spread over
# many ranks. The sample cap keeps tiny-image datasets (MNIST) in several shards too.
DEFAULT_SHARD_SIZE = 256 * 10**6
DEFAULT_SAMPLES_PER_SHARD = 10_000
# PIL's own decompression-bomb warning threshold (~ 9459 x 9459); ImageNet's largest image is ~ 32 Mpx.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    """Options of one shard build. Construct with keywords; invalid values raise ``ValueError``.

    ``quality`` applies to every re-encoded image: resized ones and those converted to RGB.
    ``limit`` caps the samples per split (a seeded random subset), for quick experiments.
    """

    source: Path
    out_dir: Path
    format: Format = "auto"
    val_fraction: float = 0.0
    seed: int = 0
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    shard_size: int = DEFAULT_SHARD_SIZE
    resize_short: int | None = None
    quality: int = DEFAULT_QUALITY
    max_pixels: int = DEFAULT_MAX_PIXELS
    check: Check = "decode"
    limit: int | None = None
    workers: int = dataclasses.field(default_factory=lambda: len(os.sched_getaffinity(0)))
    executor: Executor = "local"
    ray_address: str | None = None
    classes_file: Path | None = None
    val_labels: Path | None = None  # labels of a flat val folder or ImageNet's val tar
    class_names_file: Path | None = None  # wnid → human name lines (LOC_synset_mapping.txt)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"invalid format {self.format!r}; allowed values: {', '.join(FORMATS)}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"invalid executor {self.executor!r}; allowed values: local, ray")
        if self.check not in ("decode", "header"):
            raise ValueError(f"invalid check {self.check!r}; allowed values: decode, header")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1 byte, got {self.shard_size} (sizes are bytes: "
                             "256MB, 1GiB)")
        if self.resize_short is not None and self.resize_short < 1:
            raise ValueError(f"--resize-short must be >= 1, got {self.resize_short}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError("--ray-address needs --executor ray")
        # Resolved once so Ray tasks on other nodes see the same (shared) absolute paths.
        object.__setattr__(self, "source", Path(self.source).expanduser().absolute())
        object.__setattr__(self, "out_dir", Path(self.out_dir).expanduser().absolute())
        for name in ("classes_file", "val_labels", "class_names_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)).expanduser().absolute())

    def output_options(self) -> dict[str, Any]:
        """The options that determine the output bytes (recorded in index.json and the fingerprint).

        Workers, executor and progress only change how fast the same bytes are produced.
        """
        return {
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "samples_per_shard": self.samples_per_shard,
            "shard_size": self.shard_size,
            "resize_short": self.resize_short,
            "quality": self.quality,
            "max_pixels": self.max_pixels,
            "check": self.check,
            "limit": self.limit,
        }
