"""ImageNet as distributed (the ILSVRC2012 tar of tars, the Kaggle layout, flat val folders) through `pipeline shard`."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _shard_helpers import dir_bytes, kill_build_after, read_samples
from benchmarks.imagenet_gen import generate
from pipeline.cli import main
from pipeline.shard.manifest import read_manifest

CLASSES, PER_CLASS, VAL_PER_CLASS = 5, 8, 4
LAYOUTS = ("folder", "tar", "kaggle")
FORMATS = {"folder": "imagefolder", "tar": "imagenet-tar", "kaggle": "imagenet-kaggle"}


def shard(src: Path, out: Path, *args: str) -> int:
    return main(["shard", str(src), str(out), "--no-progress", "--workers", "1", "--samples-per-shard", "7", *args])


def samples(out: Path, split: str) -> list[dict]:
    m = read_manifest(out)
    return [s for sh in m["splits"][split]["shards"] for s in read_samples(out / sh["tar"])]


def val_labels(src: Path) -> dict[str, str]:
    with open(src / "LOC_val_solution.csv", newline="") as f:
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The same generated images in the three layouts, each built with auto-detection."""
    root = tmp_path_factory.mktemp("imagenet")
    out = {}
    for layout in LAYOUTS:
        src = root / "src" / layout
        stats = generate(src, layout=layout, num_classes=CLASSES, per_class=PER_CLASS, val_per_class=VAL_PER_CLASS,
                         seed=3, pool=8)
        assert shard(src, root / "out" / layout) == 0
        out[layout] = (src, root / "out" / layout, stats)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_counts_labels_and_class_names_round_trip(built, layout):
    src, out, stats = built[layout]
    m = read_manifest(out)
    wnids = stats["classes"]
    assert m["source"]["format"] == FORMATS[layout] and m["classes"] == wnids == sorted(wnids)
    if layout != "folder":
        assert m["class_names"] == [f"synthetic class {i}, test synset" for i in range(CLASSES)]
    assert m["splits"]["train"]["samples"] == CLASSES * PER_CLASS
    assert m["splits"]["val"]["samples"] == CLASSES * VAL_PER_CLASS
    assert m["summary"]["class_counts"] == {"train": [PER_CLASS] * CLASSES, "val": [VAL_PER_CLASS] * CLASSES}
    # ImageNet's oddities (a PNG and CMYK JPEGs under .JPEG names, greyscale) are all stored, as RGB.
    assert m["skipped"] == [] and m["summary"]["reencoded"] == len(stats["oddities"])
    for s in samples(out, "train"):
        wnid = json.loads(s["json"])["source"].split("/")[-2]
        assert wnids[int(s["cls"])] == wnid
        assert Image.open(io.BytesIO(s["jpg"])).mode == "RGB"
    assert main(["verify", str(out)]) == 0


def test_tar_of_tars_matches_the_extracted_folder_tree(built):
    """Same keys, labels and image bytes whether read from the archives or from the extracted files."""
    (_, tree, _), (_, archives, _), (_, kaggle, _) = built["folder"], built["tar"], built["kaggle"]
    for split in ("train", "val"):
        want = {s["__key__"]: (s["cls"], s["jpg"]) for s in samples(tree, split)}
        assert {s["__key__"]: (s["cls"], s["jpg"]) for s in samples(archives, split)} == want
        assert {s["__key__"]: (s["cls"], s["jpg"]) for s in samples(kaggle, split)} == want


@pytest.mark.parametrize("layout", ["tar", "kaggle"])
def test_each_val_sample_names_its_source_file(built, layout):
    src, out, stats = built[layout]
    truth = val_labels(src)
    seen = set()
    for s in samples(out, "val"):
        source = json.loads(s["json"])["source"]
        stem = Path(source).stem
        assert source.endswith(f"val/{stem}.JPEG") and stem.startswith("ILSVRC2012_val_")
        assert stats["classes"][int(s["cls"])] == truth[stem]
        seen.add(stem)
    assert seen == set(truth)


def test_kill_9_mid_build_then_resume_gives_identical_bytes(built, tmp_path):
    src = built["tar"][0]
    out = tmp_path / "out"
    # Resizing makes each one-sample shard cost ~10 ms: time enough to kill the build mid-way.
    args = ["--samples-per-shard", "1", "--resize-short", "64"]
    cmd = [sys.executable, "-m", "pipeline", "shard", str(src), str(out), "--no-progress", "--workers", "1", *args]
    kill_build_after(cmd, out, 2)
    assert shard(src, out, *args) == 0
    clean = tmp_path / "clean"
    assert shard(src, clean, *args) == 0
    assert dir_bytes(out) == dir_bytes(clean)


def _kaggle_copy(built, tmp_path) -> Path:
    src = tmp_path / "kaggle"
    shutil.copytree(built["kaggle"][0], src)
    return src


def test_val_labels_gaps_are_recorded_skips(built, tmp_path, capsys):
    src = _kaggle_copy(built, tmp_path)
    lines = (src / "LOC_val_solution.csv").read_text().splitlines()
    dropped = lines[1].split(",")[0]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join([lines[0], *lines[2:], "ILSVRC2012_val_99999999," + lines[2].split(",")[1]]) + "\n")
    out = tmp_path / "out"
    assert shard(src, out, "--val-labels", str(labels)) == 0
    m = read_manifest(out)
    assert m["splits"]["val"]["samples"] == CLASSES * VAL_PER_CLASS - 1
    reasons = {s["source"]: s["reason"] for s in m["skipped"]}
    assert reasons == {
        f"ILSVRC/Data/CLS-LOC/val/{dropped}.JPEG": f"unlabelled: no line for {dropped} in labels.csv",
        "ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_99999999": "missing: labelled in labels.csv but not in the val set",
    }
    assert m["summary"]["skipped"] == {"unlabelled": 1, "missing": 1}
    assert "1 unlabelled, 1 missing" in capsys.readouterr().out


def test_unknown_wnid_is_one_clear_error(built, tmp_path, capsys):
    src = _kaggle_copy(built, tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("ILSVRC2012_val_00000001 n09999999\n")
    assert shard(src, tmp_path / "out", "--val-labels", str(labels)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 1: unknown wnid 'n09999999'" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out" / "index.json").exists()


def test_flat_val_folder_with_index_labels(built, tmp_path):
    """--val-labels for any flat val folder: whitespace text, names without extension, class indices."""
    src = tmp_path / "flat"
    shutil.copytree(built["folder"][0] / "train", src / "train")
    wnids = built["folder"][2]["classes"]
    lines = []
    for wnid_dir in sorted((built["folder"][0] / "val").iterdir()):
        for f in sorted(wnid_dir.iterdir()):
            (src / "val").mkdir(exist_ok=True)
            shutil.copy(f, src / "val" / f.name)
            lines.append(f"{f.stem} {wnids.index(wnid_dir.name)}")
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert shard(src, out, "--val-labels", str(tmp_path / "val.txt")) == 0
    want = {s["__key__"]: (s["cls"], s["jpg"]) for s in samples(built["folder"][1], "val")}
    assert {s["__key__"]: (s["cls"], s["jpg"]) for s in samples(out, "val")} == want


@pytest.mark.parametrize("where", ["ILSVRC/Data/CLS-LOC/train/shards", "ILSVRC/Data/CLS-LOC/val/shards"])
def test_out_dir_inside_a_kaggle_split_folder_is_not_listed(built, tmp_path, capsys, where):
    """OUT_DIR inside train/ is never taken for a class folder, so the rerun resumes as it would anywhere."""
    src = _kaggle_copy(built, tmp_path)
    out = src / where
    assert shard(src, out) == 0
    m = read_manifest(out)
    assert m["classes"] == built["kaggle"][2]["classes"] and not m["skipped"]
    first = dir_bytes(out)
    capsys.readouterr()
    assert shard(src, out) == 0, capsys.readouterr().err
    assert "nothing to do" in capsys.readouterr().out
    assert dir_bytes(out) == first


def test_more_shards_than_the_open_file_limit(tmp_path):
    """Build, verify and read 150 one-sample shards with `ulimit -n 100`: nothing holds a descriptor per shard."""
    src = tmp_path / "src"
    generate(src, layout="tar", num_classes=5, per_class=30, seed=1, pool=4)
    script = f"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from pipeline.cli import main
from pipeline.data import make_loader
out = {str(tmp_path / 'out')!r}
assert main(["shard", {str(src)!r}, out, "--no-progress", "--samples-per-shard", "1", "--check", "header"]) == 0
assert main(["verify", out]) == 0
for backend in ("dali", "torch"):
    loader = make_loader(out, "train", batch_size=50, backend=backend, device="cpu")
    print(backend, sum(len(labels) for _, labels in loader))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dali 150" in proc.stdout and "torch 150" in proc.stdout


def test_reports_name_classes_by_id_and_human_name(built):
    """Per-class reports say ``n01440764 tench``, not the bare synset id, when the shards know the names."""
    from pipeline.data import build_loader
    from pipeline.train.tracking import per_class_table

    _, out, stats = built["tar"]
    loader = build_loader(out, "val", batch_size=4, backend="torch", device="cpu")
    assert loader.classes == stats["classes"]
    assert loader.class_labels == [f"{w} synthetic class {i}" for i, w in enumerate(stats["classes"])]
    table = per_class_table(loader.class_labels, np.eye(CLASSES, dtype=np.int64))
    assert f'0,"{stats["classes"][0]} synthetic class 0",1,1,1.0000' in table.splitlines()
    _, folder_out, _ = built["folder"]  # no names recorded: the ids alone
    assert build_loader(folder_out, "val", batch_size=4, backend="torch").class_labels == stats["classes"]
