"""Loader presets: output sizes, augmentation and normalization, one place for both backends.

Both the DALI graph (``pipeline.data.dali``) and the torchvision fallback
(``pipeline.data.torch``) read their numbers from here, so the two backends
cannot drift apart. Mean and std are in the 0..1 range; DALI works on 0..255
pixels and scales them with ``mean_255`` / ``std_255``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pipeline.errors import UserError

TrainAugment = Literal["random_resized_crop", "pad_crop", "none"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preset:
    """How one kind of dataset is turned into training and evaluation tensors."""

    name: str
    channels: int  # 1 = greyscale, 3 = RGB
    size: int  # square output side, train and val
    val_resize: int  # val: shorter side resized to this, then center crop ``size``; == size means exact resize
    train_augment: TrainAugment
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 0  # pad_crop: border added before the random crop
    scale: tuple[float, float] = (0.08, 1.0)  # random_resized_crop: area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random_resized_crop: aspect ratio
    flip: bool = True  # random horizontal flip in training

    def __post_init__(self) -> None:
        assert self.channels in (1, 3), self.channels
        assert len(self.mean) == len(self.std) == self.channels, (self.mean, self.std)
        assert self.val_resize >= self.size > 0, (self.val_resize, self.size)

    @property
    def mean_255(self) -> tuple[float, ...]:
        return tuple(m * 255 for m in self.mean)

    @property
    def std_255(self) -> tuple[float, ...]:
        return tuple(s * 255 for s in self.std)

    def output_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image, train and val alike."""
        return (self.channels, self.size, self.size)


PRESETS: dict[str, Preset] = {
    # The torchvision ImageNet recipe: RandomResizedCrop 224 + flip; val resize 256, center crop 224.
    "imagenet": Preset(name="imagenet", channels=3, size=224, val_resize=256,
                       train_augment="random_resized_crop", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # CIFAR recipe: 4-pixel zero padding, random 32x32 crop, flip.
    "cifar": Preset(name="cifar", channels=3, size=32, val_resize=32, train_augment="pad_crop", pad=4,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    # 28x28 greyscale, normalize only (flips would change what a digit or garment looks like).
    # Fashion-MNIST statistics: it is the mnist-idx collection this project ships tests and demos with.
    "mnist": Preset(name="mnist", channels=1, size=28, val_resize=28, train_augment="none", flip=False,
                    mean=(0.2860,), std=(0.3530,)),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``UserError`` listing the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown loader preset {name!r}: choose one of {', '.join(PRESETS)}") from None
