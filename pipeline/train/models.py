"""Model factory: ``build_model(name, num_classes, in_channels, image_size)``.

Every model names its final classifier layer ``head`` (torchvision ResNets: ``fc``),
so fine-tuning can swap it for a new class count and freeze the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import UserError

MODEL_NAMES = ("seed_cnn", "cifar_cnn", "fmnist_resnet", "resnet18", "resnet50")


class SeedCNN(nn.Module):
    """The reference CNN for 28×28 inputs: Conv32-3 → ReLU → MaxPool → Conv64-3 → ReLU → MaxPool → FC128 → ReLU → FC."""

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 28, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = ((image_size - 2) // 2 - 2) // 2  # two valid 3×3 convs, two 2× pools
        self.fc = nn.Sequential(nn.Linear(64 * side * side, 128), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.features(x)))


class CifarCNN(nn.Module):
    """The Keras CIFAR-10 example CNN: 2×Conv32, pool, 2×Conv64, pool, Dense512, dropout 0.25/0.5."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.5) -> None:
        super().__init__()

        def conv(cin: int, cout: int, pad: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=pad), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(in_channels, 32, 1), *conv(32, 32, 0), nn.MaxPool2d(2), nn.Dropout(0.25),
            *conv(32, 64, 1), *conv(64, 64, 0), nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Flatten(),
        )
        side = ((image_size - 2) // 2 - 2) // 2
        self.fc = nn.Sequential(nn.Linear(64 * side * side, 512), nn.ReLU(inplace=True), nn.Dropout(dropout or 0.5))
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.features(x)))


class _Residual(nn.Module):
    """Pre-activation-free basic block: conv-BN-ReLU-conv-BN + (projected) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.short = (
            nn.Identity() if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.short(x))


class FMnistResNet(nn.Module):
    """Small BN/residual network for 28×28 inputs, sized for CPUs.

    Stem conv @28×28 → max-pool → residual block @14×14 → strided residual block
    @7×7 → flatten → FC → dropout → head. Most of the work happens at 14×14 and
    below (at width 32 a forward pass costs ~7 M multiply-adds, ~3× the seed CNN).
    The head sees the whole 7×7 map rather than a global average: where on the
    garment a feature sits (collar, sleeve, sole) is what tells the classes apart,
    and a fully connected layer on it learns that in few epochs.
    In eval mode the logits are averaged over the image and its mirror image
    (garments are left-right symmetric), at the price of a second forward pass.
    """

    WIDTH = 32

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 28, dropout: float = 0.0,
                 width: int = WIDTH, hidden: int = 256, flip_eval: bool = True) -> None:
        super().__init__()
        w = width
        self.flip_eval = flip_eval
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            _Residual(w, w, 1),
            _Residual(w, 2 * w, 2),
            nn.Flatten(),
        )
        side = (image_size // 2 + 1) // 2  # max-pool, then the stride-2 block (padding 1)
        self.fc = nn.Sequential(nn.Linear(2 * w * side * side, hidden, bias=False), nn.BatchNorm1d(hidden),
                                nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.fc(self.features(x)))
        if self.flip_eval and not self.training:
            logits = (logits + self.head(self.fc(self.features(x.flip(3))))) / 2
        return logits


def _resnet(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if image_size <= 64:
        # The ImageNet stem (7×7 stride 2 + max-pool) would shrink 28/32-pixel inputs to 7/8
        # pixels before the first block; small images get a 3×3 stride-1 stem instead.
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224,
                dropout: float = 0.0, width: int | None = None) -> nn.Module:
    """A freshly initialised model; ``name`` is one of ``MODEL_NAMES``. ``width``: the channels of
    ``fmnist_resnet``'s first stage (None: 32); the other models have fixed widths."""
    if width is not None and name != "fmnist_resnet":
        raise UserError(f"model.width applies to fmnist_resnet only, not {name}")
    if name == "seed_cnn":
        return SeedCNN(num_classes, in_channels, image_size, dropout)
    if name == "cifar_cnn":
        return CifarCNN(num_classes, in_channels, image_size, dropout)
    if name == "fmnist_resnet":
        return FMnistResNet(num_classes, in_channels, image_size, dropout, width=width or FMnistResNet.WIDTH)
    if name in ("resnet18", "resnet50"):
        return _resnet(name, num_classes, in_channels, image_size)
    raise UserError(f"unknown model {name!r}; allowed models: {', '.join(MODEL_NAMES)}")


def width_of(name: str, state: dict[str, torch.Tensor]) -> int | None:
    """The ``width`` a state dict of model ``name`` was built with (None for the fixed-width models)."""
    return int(state["features.0.weight"].shape[0]) if name == "fmnist_resnet" else None


def head_name(model: nn.Module) -> str:
    """Attribute name of the final classifier layer (``head`` or torchvision's ``fc``)."""
    for name in ("head", "fc"):
        if isinstance(getattr(model, name, None), nn.Linear):
            return name
    raise TypeError(f"{type(model).__name__} has no Linear 'head' or 'fc'")  # internal: every model above has one


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the classifier for a freshly initialised one with ``num_classes`` outputs."""
    name = head_name(model)
    old: nn.Linear = getattr(model, name)
    setattr(model, name, nn.Linear(old.in_features, num_classes))
    return model


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` into ``model`` except a head whose shape differs; returns the keys not loaded.

    Every backbone key must match in name and shape: a checkpoint of another
    architecture is a user error, not a silently half-initialised model.
    """
    head = head_name(model) + "."
    own = model.state_dict()
    keep, skipped = {}, []
    for key, value in state.items():
        if key.startswith(head) and (key not in own or own[key].shape != value.shape):
            skipped.append(key)
            continue
        if key not in own or own[key].shape != value.shape:
            raise UserError(
                f"--init-from weights do not fit model {type(model).__name__}: "
                f"{key!r} {tuple(value.shape)} vs {tuple(own[key].shape) if key in own else 'absent'}"
            )
        keep[key] = value
    missing = [k for k in own if k not in keep and not k.startswith(head)]
    if missing:
        raise UserError(f"--init-from weights lack {len(missing)} backbone tensors of {type(model).__name__}, "
                        f"e.g. {missing[0]!r}")
    model.load_state_dict(keep, strict=False)
    return skipped


__all__ = ["MODEL_NAMES", "build_model", "head_name", "load_backbone", "replace_head", "width_of"]
