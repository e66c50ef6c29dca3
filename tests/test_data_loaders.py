"""make_loader end to end: real shards from `pipeline shard`, DALI on the CPU and the torch fallback.

Label-encoding images (every pixel = label_value(label)) go through shards and each
loader; the label read back from the pixels must equal ``cls``. Shards are uneven
(7 samples per shard over 26 train / 14 val samples) so rank balancing is exercised.
"""

from __future__ import annotations

import collections
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.data import LoaderOptions, build_loader, make_loader
from pipeline.data.presets import get_preset
from pipeline.data.split import read_index
from pipeline.errors import UserError
from conftest import label_from_pixels, make_label_folder

# DALI is a hard dependency: a broken install must fail here, never skip to green.
import nvidia.dali  # noqa: F401,E402

BACKENDS = ["dali", "torch"]

CLASSES = [f"class{i:02d}" for i in range(12)]  # 12: two-digit labels; sorted names = label order
PER_CLASS = [3, 4, 2, 5, 3, 4, 2, 3, 4, 3, 2, 5]  # 40 images → 26 train + 14 val


@pytest.fixture(scope="module")
def label_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    src = make_label_folder(root / "src", CLASSES, PER_CLASS)
    out = root / "shards"
    assert main(["shard", str(src), str(out), "--val-fraction", "0.3", "--samples-per-shard", "7",
                 "--workers", "1", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("fmnist") / "shards"
    assert main(["shard", str(fmnist_dir), str(out), "--limit", "40", "--samples-per-shard", "13",
                 "--workers", "1", "--no-progress"]) == 0
    return out


def _split_keys(shard_dir: Path, split: str) -> collections.Counter:
    """Keys of a split read straight from the tar files (independent of the loaders)."""
    keys: collections.Counter = collections.Counter()
    for tar in sorted(shard_dir.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as tf:
            keys.update(m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".cls"))
    return keys


def _epoch(loader) -> tuple[list[torch.Tensor], list[int], list[str]]:
    images, labels, keys = [], [], []
    for im, lab, k in loader:
        images.append(im)
        labels += lab.tolist()
        keys += k
    return images, labels, keys


def _loader(shard_dir: Path, split: str, backend: str, **kw):
    options = LoaderOptions(with_keys=True, num_workers=kw.pop("num_workers", 0))
    return build_loader(shard_dir, split, backend=backend, device="cpu", options=options, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["imagenet", "cifar", "mnist"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_label_from_pixels_equals_cls(label_shards: Path, backend: str, preset: str, split: str) -> None:
    spec = get_preset(preset)
    loader = _loader(label_shards, split, backend, batch_size=8, preset=preset)
    assert (loader.backend, loader.preset, loader.num_classes) == (backend, preset, len(CLASSES))
    assert loader.classes == CLASSES
    seen = 0
    for images, labels, keys in loader:
        assert images.shape == (8, *spec.output_shape()) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        mean = torch.tensor(spec.mean_255).view(1, -1, 1, 1)
        std = torch.tensor(spec.std_255).view(1, -1, 1, 1)
        pixels = images * std + mean
        s = spec.size
        # The center half is image in every preset (cifar's zero padding is at most 8 px from an edge).
        centre = pixels[:, :, s // 4: 3 * s // 4, s // 4: 3 * s // 4].mean(dim=(1, 2, 3))
        for value, label in zip(centre.tolist(), labels.tolist()):
            if label >= 0:
                assert label_from_pixels(value, len(CLASSES)) == label
                seen += 1
    # val: each real sample once (one rank); train: every slot holds a real label.
    assert seen == (loader.num_samples if split == "val" else len(loader) * 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_equal_batches_and_cover_the_split(label_shards: Path, backend: str, world_size: int) -> None:
    batch = 4
    train_keys, val_keys = _split_keys(label_shards, "train"), _split_keys(label_shards, "val")
    seen_train: collections.Counter = collections.Counter()
    seen_val: collections.Counter = collections.Counter()
    lengths, pads = set(), 0
    for rank in range(world_size):
        train = _loader(label_shards, "train", backend, batch_size=batch, rank=rank, world_size=world_size,
                        num_workers=2)
        val = _loader(label_shards, "val", backend, batch_size=batch, rank=rank, world_size=world_size,
                      num_workers=2)
        for loader, seen in ((train, seen_train), (val, seen_val)):
            images, labels, keys = _epoch(loader)
            assert len(images) == len(loader)  # len() is what the rank really yields
            lengths.add(("train" if loader is train else "val", len(loader)))
            if loader is val:
                pads += labels.count(-1)
                keys = [k for k, lab in zip(keys, labels) if lab >= 0]
            seen.update(keys)
    # Same number of batches on every rank (per split): no rank waits in allreduce for another.
    assert len(lengths) == 2
    # Train: every sample at least once; extras are padding, fewer than world_size * batch.
    assert set(seen_train) == set(train_keys)
    assert sum(seen_train.values()) - sum(train_keys.values()) == train.padding < world_size * batch
    # Val: every sample exactly once; all padding carries label -1.
    assert seen_val == val_keys
    assert pads == val.padding == world_size * len(val) * batch - val.num_samples


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_shuffle_differs_per_epoch_and_repeats_per_seed(label_shards: Path, backend: str) -> None:
    def order(seed: int, epoch: int) -> list[str]:
        loader = _loader(label_shards, "train", backend, batch_size=4, seed=seed)
        loader.set_epoch(epoch)
        return _epoch(loader)[2]

    e0, e1 = order(0, 0), order(0, 1)
    assert e0 != e1
    assert set(e0) == set(e1) == set(_split_keys(label_shards, "train"))
    assert order(0, 1) == e1  # a fresh loader reproduces epoch 1 without running epoch 0
    assert order(5, 1) != e1
    val = _loader(label_shards, "val", backend, batch_size=4)
    first = _epoch(val)[2]
    val.set_epoch(3)
    assert _epoch(val)[2] == first  # val is never shuffled


def test_dali_and_torch_read_the_same_samples_per_rank(label_shards: Path) -> None:
    for epoch in (0, 1):
        for rank in range(2):
            keys = {}
            for backend in ("dali", "torch"):
                loader = _loader(label_shards, "train", backend, batch_size=4, rank=rank, world_size=2,
                                 num_workers=2, seed=3)
                loader.set_epoch(epoch)
                keys[backend] = set(_epoch(loader)[2])
            assert keys["dali"] == keys["torch"]


@pytest.mark.parametrize(("preset", "atol"), [("mnist", 1e-6), ("imagenet", 0.05), ("cifar", 0.05)])
def test_dali_and_torch_val_images_match(fmnist_shards: Path, preset: str, atol: float) -> None:
    out = {}
    for backend in ("dali", "torch"):
        images, labels, keys = _epoch(_loader(fmnist_shards, "val", backend, batch_size=8, preset=preset))
        out[backend] = (torch.cat(images), labels, keys)
    assert out["dali"][1:] == out["torch"][1:]
    diff = (out["dali"][0] - out["torch"][0]).abs()
    # mnist: PNG is lossless and no resampling happens; imagenet/cifar resample (28 → 256 / 32 px).
    assert diff.max().item() <= atol
    assert diff.mean().item() <= atol / 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_sample_is_named(label_shards: Path, tmp_path: Path, backend: str) -> None:
    bad = tmp_path / "shards"
    shutil.copytree(label_shards, bad)
    tar = sorted(bad.glob("val-*.tar"))[-1]
    key, members = read_index(tar.with_suffix(".idx"))[0]
    with open(tar, "r+b") as f:  # same length, so the index stays valid: only the JPEG is broken
        f.seek(members["jpg"].offset)
        f.write(b"\xff\xd8" + b"\0" * (members["jpg"].size - 2))
    with pytest.raises(RuntimeError, match=rf"sample {key} of .*{tar.name}"):
        _epoch(_loader(bad, "val", backend, batch_size=4))


def test_make_loader_contract_and_user_errors(label_shards: Path) -> None:
    loader = make_loader(label_shards, "val", batch_size=5, rank=1, world_size=2, device="cpu")
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 224, 224) and labels.dtype == torch.int64
    assert loader.num_samples == 14 and loader.padding == 2 * 2 * 5 - 14 and len(loader) == 2
    cases = [
        (dict(split="test"), "no split 'test'"),
        (dict(backend="tf"), "choose one of auto, dali, torch"),
        (dict(device="tpu"), "choose one of auto, gpu, cpu"),
        (dict(preset="coco"), "choose one of imagenet, cifar, mnist"),
        (dict(rank=2, world_size=2), "rank must be in 0..world_size-1"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(world_size=99), "fewer than world_size=99"),
    ]
    for kw, message in cases:
        args = dict(split="val", batch_size=4) | kw
        with pytest.raises(UserError, match=message):
            make_loader(label_shards, args.pop("split"), **args)
    with pytest.raises(UserError, match="no index.json"):
        make_loader(label_shards.parent, "val", batch_size=4)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            make_loader(label_shards, "val", batch_size=4, device="gpu")


def test_nvjpeg_buffers_per_pipeline_stay_at_nvidias_total_as_threads_grow() -> None:
    # DALI pre-sizes these per decoder thread (one GPU buffer, two pinned host buffers): with 16 or more
    # threads NVIDIA's per-thread values would pin GiBs of host memory on every rank of a node.
    from pipeline.data.dali import nvjpeg_padding

    nvidia_4 = nvjpeg_padding(4)
    assert nvidia_4 == {"device_memory_padding": 211025920, "host_memory_padding": 140544512}
    assert nvjpeg_padding(1) == nvidia_4
    for threads in (8, 12, 16):
        pad = nvjpeg_padding(threads)
        for key in pad:
            assert 4 * nvidia_4[key] - threads <= threads * pad[key] <= 4 * nvidia_4[key]  # the 4-thread total
    assert nvjpeg_padding(256) == {"device_memory_padding": 16 << 20, "host_memory_padding": 8 << 20}  # DALI's


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_train_split_read_for_evaluation_counts_each_sample_once_unaugmented(label_shards: Path,
                                                                                backend: str) -> None:
    # `data.val_split: train` and `pipeline evaluate --split train` read the train split as val is read.
    world_size, batch = 3, 4
    seen: collections.Counter = collections.Counter()
    for rank in range(world_size):
        loader = _loader(label_shards, "train", backend, batch_size=batch, rank=rank, world_size=world_size,
                         preset="imagenet", train=False)
        images, labels, keys = _epoch(loader)
        seen.update(k for k, lab in zip(keys, labels) if lab >= 0)
        again = _epoch(_loader(label_shards, "train", backend, batch_size=batch, rank=rank,
                               world_size=world_size, preset="imagenet", train=False))
        assert again[2] == keys and all(torch.equal(a, b) for a, b in zip(again[0], images))  # no random crop
    assert seen == _split_keys(label_shards, "train")


def _photo_shards(root: Path, tagged: int) -> Path:
    """One real photograph, 24 times over two classes (the same pixels in every sample), the first ``tagged``
    with an EXIF orientation tag (rotate 90°) that the build keeps: it copies valid RGB JPEGs byte for byte."""
    from PIL import Image

    from benchmarks.images import photo_paths

    photo = Image.open(photo_paths()[0]).convert("RGB").resize((160, 120))
    exif = Image.Exif()
    exif[0x0112] = 6
    for i in range(24):
        folder = root / "src" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        photo.save(folder / f"img_{i:02d}.jpg", quality=92, **({"exif": exif} if i < tagged else {}))
    out = root / "shards"
    assert main(["shard", str(root / "src"), str(out), "--val-fraction", "0.5", "--samples-per-shard", "6",
                 "--workers", "1", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _photo_shards(tmp_path_factory.mktemp("photos"), tagged=0)


@pytest.fixture(scope="module")
def tagged_photo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _photo_shards(tmp_path_factory.mktemp("tagged"), tagged=8)


def test_dali_ranks_draw_their_own_crops_and_flips(photo_shards: Path) -> None:
    # Every sample has the same pixels: with one seed for all ranks, rank 0 and rank 1 gave identical batches.
    batches = [_epoch(_loader(photo_shards, "train", "dali", batch_size=6, rank=rank, world_size=2,
                              preset="imagenet", seed=1))[0] for rank in (0, 1)]
    assert not all(torch.equal(a, b) for a, b in zip(*batches))


def test_dali_and_torch_ignore_exif_orientation_alike(tagged_photo_shards: Path) -> None:
    out = {backend: torch.cat(_epoch(_loader(tagged_photo_shards, "val", backend, batch_size=4, preset="imagenet"))[0])
           for backend in ("dali", "torch")}
    for images in out.values():  # the same pixels in every sample: tagged ones come out as the others do
        assert (images - images[0]).abs().max().item() < 1e-3
    diff = (out["dali"] - out["torch"]).abs().mean().item()
    assert diff < 0.1  # resampling differences only; a rotated image would differ by about 1 (normalised units)


def test_torch_loader_resumed_twice_with_other_worker_counts_reads_each_sample_once(label_shards: Path) -> None:
    # The worker count follows the node's cores per rank, so it can change between restarts of one epoch.
    def loader(workers: int):
        return _loader(label_shards, "train", "torch", batch_size=2, num_workers=workers, seed=5)

    def three_batches(reader, state, keys):  # then stop, as a killed job does after its last checkpoint
        if state is not None:
            reader.load_state_dict(state)
        for i, (_, _, k) in enumerate(reader):
            keys += k
            if i == 2:
                return reader.state_dict()

    reference = _epoch(loader(2))[2]
    keys: list[str] = []
    state = three_batches(loader(2), None, keys)
    state = three_batches(loader(3), state, keys)
    third = loader(3)
    third.load_state_dict(state)
    keys += _epoch(third)[2]
    assert keys == reference
