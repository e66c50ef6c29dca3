"""End to end: generated folders, CIFAR-10 batches and real Fashion-MNIST through `pipeline shard` and `verify`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _shard_helpers import BAD_INPUTS, CLASSES, CIFAR_NAMES, MAX_PIXELS, dir_bytes, make_cifar10, make_messy_folder, read_samples
from conftest import label_from_pixels, make_label_folder
from pipeline.cli import main
from pipeline.shard.manifest import read_manifest
from pipeline.shard.sources import FASHION_MNIST_CLASSES


def shard(src: Path, out: Path, *args: str) -> int:
    return main(["shard", str(src), str(out), "--no-progress", *args])


def all_samples(out: Path, split: str) -> list[dict]:
    m = read_manifest(out)
    return [s for sh in m["splits"][split]["shards"] for s in read_samples(out / sh["tar"])]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    src, storable = make_messy_folder(root / "src")
    out = root / "out"
    # 5 samples per shard: several shards, and a pool of 2 workers writing them.
    assert shard(src, out, "--max-pixels", str(MAX_PIXELS), "--val-fraction", "0.25",
                 "--samples-per-shard", "5", "--workers", "2") == 0
    return src, out, storable


def test_counts_labels_and_class_map_round_trip(messy):
    src, out, storable = messy
    m = read_manifest(out)
    assert m["classes"] == CLASSES and m["num_classes"] == 3 and m["preset"] == "imagenet"
    assert m["source"] == {"path": str(src), "format": "imagefolder"}
    train, val = all_samples(out, "train"), all_samples(out, "val")
    assert len(train) + len(val) == storable
    assert m["splits"]["train"]["samples"] == len(train) and m["splits"]["val"]["samples"] == len(val)
    keys = [s["__key__"] for s in train + val]
    assert len(set(keys)) == len(keys) and all(len(k) == 9 and k.isdigit() for k in keys)
    for s in train + val:
        assert s["__order__"] == ["jpg", "cls", "json"]
        img = Image.open(io.BytesIO(s["jpg"]))
        img.load()
        assert img.mode == "RGB"  # every stored image, converted ones included
        label = int(s["cls"])
        meta = json.loads(s["json"])
        assert (meta["width"], meta["height"]) == img.size
        # Pixels encode the class of the folder the file came from.
        assert label_from_pixels(np.asarray(img, dtype=float).mean(), len(CLASSES)) == label
        assert CLASSES[label] == meta["source"].split("/")[0]


def test_val_split_is_stratified(messy):
    _, out, _ = messy
    counts = read_manifest(out)["summary"]["class_counts"]
    # 25 % of each class's listed files (bad ones included) go to val, at least one per class here.
    assert all(v >= 1 for v in counts["val"]) and sum(counts["val"]) < sum(counts["train"])


def test_shards_respect_samples_per_shard(messy):
    _, out, _ = messy
    m = read_manifest(out)
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert all(1 <= s["samples"] <= 5 for s in shards)
        assert [s["tar"] for s in shards] == [f"{split}-{i:06d}.tar" for i in range(len(shards))]


def test_bad_inputs_recorded_with_reasons(messy):
    _, out, _ = messy
    m = read_manifest(out)
    reasons = {s["source"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == set(BAD_INPUTS)
    for source, kind in BAD_INPUTS.items():
        assert reasons[source].split(":")[0] == kind, source
    assert sum(m["summary"]["skipped"].values()) == len(BAD_INPUTS)


def test_conversions_reencoded_rest_passed_through(messy):
    src, out, _ = messy
    originals = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    kept = reencoded = 0
    for s in all_samples(out, "train") + all_samples(out, "val"):
        source = json.loads(s["json"])["source"]
        if source.endswith(("cmyk.jpg", "grey.jpeg", ".png", "png_named.JPEG")):
            assert s["jpg"] != originals[source]
            reencoded += 1
        else:
            assert s["jpg"] == originals[source]  # valid RGB JPEGs (progressive too): byte for byte
            kept += 1
    assert read_manifest(out)["summary"]["reencoded"] == reencoded == 6  # cmyk, grey, 16-bit, palette, alpha, PNG named .JPEG
    assert read_manifest(out)["summary"]["passed_through"] == kept


def test_output_is_byte_identical_across_runs_and_worker_counts(messy, tmp_path):
    src, out, _ = messy
    again = tmp_path / "again"
    assert shard(src, again, "--max-pixels", str(MAX_PIXELS), "--val-fraction", "0.25",
                 "--samples-per-shard", "5", "--workers", "1") == 0
    assert dir_bytes(again) == dir_bytes(out)


def test_rerun_is_a_no_op_and_changed_options_are_refused(messy, capsys):
    src, out, _ = messy
    before = dir_bytes(out)
    assert shard(src, out, "--max-pixels", str(MAX_PIXELS), "--val-fraction", "0.25", "--samples-per-shard", "5") == 0
    assert "already complete" in capsys.readouterr().out
    assert dir_bytes(out) == before
    assert shard(src, out, "--max-pixels", str(MAX_PIXELS), "--val-fraction", "0.25", "--samples-per-shard", "5",
                 "--seed", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed=0 (now 1)" in err[0]
    assert dir_bytes(out) == before


def test_verify_passes_then_catches_flipped_byte_and_truncation(messy, tmp_path, capsys):
    _, out, _ = messy
    assert main(["verify", str(out), "--decode"]) == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    for name, data in dir_bytes(out).items():
        (broken / name).write_bytes(data)
    for marker in out.glob(".*.json"):  # the build's plan and done markers: the copy is a whole build
        (broken / marker.name).write_bytes(marker.read_bytes())
    tar0, tar1 = broken / "train-000000.tar", broken / "train-000001.tar"
    data = bytearray(tar0.read_bytes())
    data[600] ^= 0x01  # inside the first image's bytes
    tar0.write_bytes(bytes(data))
    tar1.write_bytes(tar1.read_bytes()[:1500])
    capsys.readouterr()
    assert main(["verify", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "train-000000.tar: sha256 does not match" in err
    assert "train-000001.tar: size 1500 bytes" in err
    assert "train-000002.tar" not in err
    assert err.strip().splitlines()[-1].startswith("to rebuild a damaged shard: delete its .tar and run the same")
    # As it says: the build rewrites the deleted shards, byte for byte, and verify passes.
    tar0.unlink()
    tar1.unlink()
    src = messy[0]
    assert shard(src, broken, "--max-pixels", str(MAX_PIXELS), "--val-fraction", "0.25", "--samples-per-shard", "5",
                 "--workers", "2") == 0
    assert dir_bytes(broken) == dir_bytes(out)
    assert main(["verify", str(broken)]) == 0


def test_classes_file_fixes_mapping(tmp_path):
    src = make_label_folder(tmp_path / "src", ["b", "a"], 2)
    (tmp_path / "classes.txt").write_text("# fixed order\nb\nz\na\n")
    assert shard(src, tmp_path / "out", "--classes", str(tmp_path / "classes.txt")) == 0
    m = read_manifest(tmp_path / "out")
    assert m["classes"] == ["b", "z", "a"]
    labels = {json.loads(s["json"])["source"].split("/")[0]: int(s["cls"]) for s in all_samples(tmp_path / "out", "train")}
    assert labels == {"b": 0, "a": 2}


def test_source_train_val_layout(tmp_path):
    make_label_folder(tmp_path / "src" / "train", ["x", "y"], 3)
    make_label_folder(tmp_path / "src" / "val", ["x", "y"], 1)
    assert shard(tmp_path / "src", tmp_path / "out") == 0
    m = read_manifest(tmp_path / "out")
    assert (m["splits"]["train"]["samples"], m["splits"]["val"]["samples"]) == (6, 2)
    assert m["classes"] == ["x", "y"]
    assert all(json.loads(s["json"])["source"].startswith("val/") for s in all_samples(tmp_path / "out", "val"))


def test_flat_val_without_val_labels_is_refused(tmp_path, capsys):
    """train/<class>/ beside a flat val/ (images directly in it) used to become the classes "train" and
    "val", every image in train. Without --val-labels it is one line saying what is missing."""
    make_label_folder(tmp_path / "src" / "train", ["x", "y"], 2)
    make_label_folder(tmp_path / "flat", ["x"], 2)
    (tmp_path / "flat" / "x").rename(tmp_path / "src" / "val")  # val/img_0000.jpg, no class folders
    assert shard(tmp_path / "src", tmp_path / "out") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--val-labels FILE" in lines[0] and f"{tmp_path / 'src' / 'val'}" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_symlink_loop_in_an_image_folder_lists_each_image_once(tmp_path):
    """A link back up (bird/loop -> ..) is followed no further; linked-in data is still followed."""
    src = make_label_folder(tmp_path / "src", ["bird", "cat"], 3)
    (src / "bird" / "loop").symlink_to("..")
    make_label_folder(tmp_path / "elsewhere", ["more"], 2)
    (src / "cat" / "linked").symlink_to(tmp_path / "elsewhere" / "more", target_is_directory=True)
    (src / "cat" / "linked again").symlink_to(tmp_path / "elsewhere" / "more", target_is_directory=True)
    assert shard(src, tmp_path / "out") == 0
    m = read_manifest(tmp_path / "out")
    sources = sorted(json.loads(s["json"])["source"] for s in all_samples(tmp_path / "out", "train"))
    assert sources == [f"bird/img_{i:04d}.jpg" for i in range(3)] + [f"cat/img_{i:04d}.jpg" for i in range(3)] \
        + [f"cat/linked/img_{i:04d}.jpg" for i in range(2)]
    assert {s["source"]: s["reason"].split(":")[0] for s in m["skipped"]} == {
        "bird/loop": "folder already listed", "cat/linked again": "folder already listed"}


def test_out_dir_inside_the_image_folder_resumes_on_rerun(tmp_path, capsys):
    """`pipeline shard if2 if2/out`: the rerun (the documented resume) lists what the first run listed,
    rather than finding a new class "out" and refusing."""
    src = make_label_folder(tmp_path / "src", ["a", "b"], 3)
    out = src / "out"
    assert shard(src, out) == 0
    first = dir_bytes(out)
    assert read_manifest(out)["classes"] == ["a", "b"]
    capsys.readouterr()
    assert shard(src, out) == 0, capsys.readouterr().err
    assert "nothing to do" in capsys.readouterr().out
    assert dir_bytes(out) == first


def test_cifar10_batches(tmp_path):
    src = make_cifar10(tmp_path / "c", per_batch=4)
    assert shard(tmp_path / "c", tmp_path / "out") == 0  # detected in the parent folder
    m = read_manifest(tmp_path / "out")
    assert m["source"]["format"] == "cifar10" and m["preset"] == "cifar" and m["classes"] == CIFAR_NAMES
    assert (m["splits"]["train"]["samples"], m["splits"]["val"]["samples"]) == (20, 4)
    for s in all_samples(tmp_path / "out", "val"):
        img = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert img.shape == (32, 32, 3)
        assert label_from_pixels(img.mean(), 10) == int(s["cls"])
        assert json.loads(s["json"])["source"].startswith("test[")
    assert src.name == "cifar-10-batches-py"


def test_cifar_pickle_cannot_run_code(tmp_path, capsys):
    src = make_cifar10(tmp_path / "c", per_batch=2)
    import pickle
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(src / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    assert shard(src, tmp_path / "out") == 2
    assert "refusing to load posix.system" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_fashion_mnist_subset(fmnist_dir, tmp_path):
    out = tmp_path / "fm"
    assert shard(fmnist_dir, out, "--limit", "300", "--samples-per-shard", "128", "--workers", "2") == 0
    m = read_manifest(out)
    assert m["source"]["format"] == "mnist-idx" and m["preset"] == "mnist"
    assert m["classes"] == list(FASHION_MNIST_CLASSES)
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [128, 128, 44]
    assert m["splits"]["val"]["samples"] == 300
    # The stored image is exactly the idx image, grey replicated to RGB, with its idx label.
    import gzip

    with gzip.open(fmnist_dir / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(fmnist_dir / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    train = all_samples(out, "train")
    assert len({s["__key__"] for s in train}) == 300
    for s in train[:50]:
        i = int(json.loads(s["json"])["source"][len("train["):-1])
        assert int(s["__key__"]) == i and int(s["cls"]) == labels[i]
        px = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert px.shape == (28, 28, 3) and all(np.array_equal(px[..., c], images[i]) for c in range(3))
    assert main(["verify", str(out)]) == 0


@pytest.mark.parametrize("name", ["000000001.jpg", "123456789.json", "a" * 100, "n01440764_10026.cls"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 123_456, 8**11 - 1])
def test_member_header_is_tarfiles_ustar_header(name, size):
    """The direct writer (ASCII names up to 100 bytes, sizes below 8**11) against tarfile's own header."""
    from pipeline.shard.write import member_header

    assert name.isascii() and len(name) <= 100 and size < 8**11  # the fast path, not its tarfile fallback
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    assert member_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_member_header_outside_the_fast_path():
    """A non-ASCII name goes through tarfile and reads back; what ustar cannot hold is refused, not truncated."""
    from pipeline.shard.write import member_header

    info = tarfile.TarInfo.frombuf(member_header("é.cls", 3), "utf-8", "strict")
    assert (info.name, info.size, info.mode, info.mtime) == ("é.cls", 3, 0o444, 0)
    for name, size in [("a" * 101, 3), ("x.jpg", 8**11)]:
        with pytest.raises(ValueError):
            member_header(name, size)
