"""Bad input to `pipeline shard` / `pipeline verify`: exit 2, one stderr line, no traceback, nothing left looking complete."""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _shard_helpers import dir_bytes, kill_build_after, note_and_sleep
from conftest import make_label_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_label_folder(tmp_path_factory.mktemp("good"), ["a", "b"], 2)


def _cases(tmp: Path, good: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "no_images" / "a").mkdir(parents=True)
    (tmp / "no_images" / "a" / "notes.txt").write_text("x")
    (tmp / "all_bad" / "a").mkdir(parents=True)
    (tmp / "all_bad" / "a" / "x.jpg").write_bytes(b"junk")
    (tmp / "flat").mkdir()
    (tmp / "a_file").write_text("x")
    (tmp / "classes.txt").write_text("a\n")
    return {
        "missing source": (["shard", str(tmp / "nope"), str(tmp / "o1")], "source not found"),
        "source is a file": (["shard", str(tmp / "a_file"), str(tmp / "o2")], "must be a directory"),
        "unknown format": (["shard", str(good), str(tmp / "o3"), "--format", "tfrecord"], "allowed values: auto"),
        "undetectable": (["shard", str(tmp / "flat"), str(tmp / "o4")], "cannot tell the format"),
        "no images": (["shard", str(tmp / "no_images"), str(tmp / "o5")], "no images found"),
        "all inputs bad": (["shard", str(tmp / "all_bad"), str(tmp / "o6")], "no readable image"),
        "OUT_DIR under a file": (["shard", str(good), str(tmp / "a_file" / "out")], "cannot create OUT_DIR"),
        "bad val fraction": (["shard", str(good), str(tmp / "o7"), "--val-fraction", "1.5"], "--val-fraction"),
        "bad size": (["shard", str(good), str(tmp / "o8"), "--shard-size", "lots"], "invalid size"),
        "bad quality": (["shard", str(good), str(tmp / "o9"), "--quality", "0"], "--quality"),
        "address without ray": (["shard", str(good), str(tmp / "o10"), "--ray-address", "x:1"], "--executor ray"),
        "mnist with val fraction": (["shard", "/usr/share/datasets/fashion-mnist", str(tmp / "o11"),
                                     "--val-fraction", "0.1"], "conflicts with the val split"),
        "folder not in classes": (["shard", str(good), str(tmp / "o12"), "--classes", str(tmp / "classes.txt")],
                                  "'b' in"),
        "verify without manifest": (["verify", str(tmp / "nope")], f"{tmp / 'nope'} does not exist"),
    }


def test_bad_input_gives_one_line_and_exit_2(tmp_path, good):
    from pipeline.cli import main

    for name, (argv, expected) in _cases(tmp_path, good).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv + (["--no-progress"] if argv[0] == "shard" else []))
        lines = err.getvalue().strip().splitlines()
        assert code == 2, name
        assert len(lines) == 1 and lines[0].startswith(f"pipeline {argv[0]}: error: "), (name, lines)
        assert expected in lines[0], (name, lines[0])
    # Nothing that looks like a finished build was left behind by any failed run.
    assert not list(tmp_path.rglob("index.json"))


def test_bad_input_in_a_real_process(tmp_path):
    """Exit status and stderr exactly as a user's shell sees them."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "shard", str(tmp_path / "nope"), str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr == f"pipeline shard: error: source not found: {tmp_path / 'nope'}\n"
    assert not (tmp_path / "o").exists()


def test_out_dir_with_foreign_shards_is_refused(tmp_path, good, capsys):
    from pipeline.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's")
    assert main(["shard", str(good), str(out), "--no-progress"]) == 2
    assert "unknown build" in capsys.readouterr().err
    assert (out / "train-000000.tar").read_bytes() == b"someone else's"


def test_progress_prints_plain_lines_when_not_a_tty():
    from pipeline.progress import Progress

    stream = io.StringIO()  # not a TTY: no bar, periodic lines with rates and ETA
    with Progress(10, desc="shard", stream=stream, interval=0.0) as bar:
        bar.update(4, 2_000_000)
    line = stream.getvalue().strip()
    assert line.startswith("shard: 4/10 img (40%)") and "img/s" in line and "MB/s" in line and "ETA" in line


def test_sigkill_of_a_two_worker_build_then_resume_is_byte_identical(fmnist_dir, tmp_path):
    """The process-pool build killed as a whole (its process group, as a scheduler or the OOM killer would)
    mid-way, then rerun: it resumes from the finished shards and ends byte-identical to an unbroken build."""
    args = [str(fmnist_dir), "--limit", "1500", "--samples-per-shard", "50", "--workers", "2", "--no-progress"]
    ref = tmp_path / "ref"
    from pipeline.cli import main

    assert main(["shard", args[0], str(ref), *args[1:]]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline", "shard", args[0], str(out), *args[1:]]
    done = kill_build_after(cmd, out, 3, cwd=ROOT)  # its own group: the kill reaches the pool workers
    assert 3 <= done < 60
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done} of 60 shards already done" in resumed.stderr
    assert dir_bytes(out) == dir_bytes(ref)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("leaving,threaded", [(KeyboardInterrupt, False), (ValueError, False),
                                              (KeyboardInterrupt, True)])
def test_leaving_the_pool_on_an_exception_stops_running_tasks_and_starts_no_queued_one(tmp_path, leaving, threaded):
    """Ctrl-C to the main process alone (or a failure there): the running tasks are interrupted with
    their cleanup, the queued ones never start, and the pool's processes are gone when it is left.
    With a thread running (a Ray driver, MLflow) the pool's workers come from a fork server instead."""
    import threading
    import time

    from pipeline.shard.executors import process_pool

    notes = [tmp_path / f"task{i}" for i in range(6)]
    release = threading.Event()
    if threaded:
        threading.Thread(target=release.wait, daemon=True).start()
    with pytest.raises(leaving), contextlib.ExitStack() as stack:
        stack.callback(release.set)
        pool = stack.enter_context(process_pool(2))
        assert not threaded or pool._mp_context.get_start_method() == "forkserver"
        futures = [pool.submit(note_and_sleep, str(n), 120) for n in notes]
        deadline = time.monotonic() + 60
        while sum(n.exists() for n in notes) < 2:
            assert time.monotonic() < deadline, "the pool started no task"
            time.sleep(0.01)
        procs = list(pool._processes.values())
        raise leaving()
    assert [n.read_text() if n.exists() else None for n in notes] == ["interrupted"] * 2 + [None] * 4
    assert all(f.done() for f in futures) and not any(p.is_alive() for p in procs)


def test_ctrl_c_of_a_two_worker_build_says_so_once_and_the_rerun_continues(fmnist_dir, tmp_path):
    """Ctrl-C (SIGINT to the build's process group, pool workers included): one line, exit 130, no
    traceback from any process; the rerun continues from the finished shards."""
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "pipeline", "shard", str(fmnist_dir), str(out), "--limit", "1500",
           "--samples-per-shard", "50", "--workers", "2", "--no-progress"]
    err = tmp_path / "stderr.txt"
    with err.open("w") as f:
        done = kill_build_after(cmd, out, 3, cwd=ROOT, sig=signal.SIGINT, stderr=f)
    assert err.read_text().splitlines() == [
        "pipeline shard: interrupted; finished shards are kept: run the same command again to continue"]
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done} of 60 shards already done" in resumed.stderr


def _one_error_line(argv: list[str], capsys) -> str:
    """Run ``pipeline ARGV`` in-process; assert exit 2 and exactly one ``pipeline CMD: error:`` line; return it."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"pipeline {argv[0]}: error: "), (code, lines)
    return lines[0]


def test_negative_seed_is_one_line(tmp_path, good, capsys):
    line = _one_error_line(["shard", str(good), str(tmp_path / "out"), "--seed", "-1", "--no-progress"], capsys)
    assert "--seed must be >= 0, got -1" in line
    assert not (tmp_path / "out").exists()


def test_classes_file_that_is_not_utf8_is_one_line(tmp_path, good, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_bytes("a\nb\u00e9\n".encode("latin-1"))
    line = _one_error_line(["shard", str(good), str(tmp_path / "out"), "--classes", str(classes), "--no-progress"],
                           capsys)
    assert f"cannot read --classes file {classes}" in line and "UTF-8" in line


def test_plan_file_that_is_not_an_object_is_one_line(tmp_path, good, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".shard-plan.json").write_text("[1, 2]\n")  # valid JSON, not a plan
    line = _one_error_line(["shard", str(good), str(out), "--no-progress"], capsys)
    assert "unreadable plan" in line and str(out) in line
    assert (out / ".shard-plan.json").read_text() == "[1, 2]\n"  # left for the user to look at


@pytest.fixture(scope="module")
def built(good, tmp_path_factory) -> Path:
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("built") / "out"
    assert main(["shard", str(good), str(out), "--val-fraction", "0.5", "--no-progress"]) == 0
    return out


def _drop(d: dict, key: str) -> None:
    del d[key]


@pytest.mark.parametrize("name,edit,expected", [
    ("no num_classes", lambda m: _drop(m, "num_classes"), "missing 'num_classes'"),
    ("shards null", lambda m: m["splits"]["train"].update(shards=None), "'splits.train.shards' is null"),
    ("shard without sha256", lambda m: _drop(m["splits"]["val"]["shards"][0], "sha256"),
     "'splits.val.shards[0]' has no 'sha256'"),
    ("no split", lambda m: m.update(splits={}), "'splits' lists no split"),
    ("classes not a list", lambda m: m.update(classes="a b"), "'classes' is a string, expected a list"),
    ("count not a number", lambda m: m["splits"]["train"].update(samples="2"), "'splits.train.samples' is a string"),
    ("wrong num_classes", lambda m: m.update(num_classes=7), "'num_classes' is 7 but 'classes' lists 2"),
])
def test_malformed_index_json_is_one_line_naming_the_problem(built, tmp_path, capsys, name, edit, expected):
    """verify (2 workers: the shard checks run in other processes) and every read_manifest caller get
    one line naming index.json and the first problem, instead of a KeyError, TypeError or "ok"."""
    import json
    import shutil

    from pipeline.errors import UserError
    from pipeline.shard.manifest import read_manifest

    out = tmp_path / "out"
    shutil.copytree(built, out)
    assert read_manifest(out)  # as written by `pipeline shard`: valid
    m = json.loads((out / "index.json").read_text())
    edit(m)
    (out / "index.json").write_text(json.dumps(m))
    line = _one_error_line(["verify", str(out), "--workers", "2"], capsys)
    assert f"{out / 'index.json'}: {expected}" in line, (name, line)
    with pytest.raises(UserError, match="index.json"):
        read_manifest(out)


@contextlib.contextmanager
def _not_ray(kind: str):
    """A loopback address where no Ray runs: ``refused`` (a bound socket that never listens) or ``http``
    (a real HTTP server, as on a Ray dashboard port typed for the GCS one)."""
    import http.server
    import socket
    import threading

    if kind == "refused":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            yield f"127.0.0.1:{sock.getsockname()[1]}", "Connection refused"
        return
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", "something else answers on port"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", ["refused", "http"])
@pytest.mark.parametrize("command", ["shard", "train"])
def test_a_ray_address_without_ray_fails_fast_and_leaves_nothing(tmp_path, good, kind, command):
    """`pipeline shard --ray-address` / `RAY_ADDRESS=… pipeline train` where no Ray answers: one line within
    seconds (ray.init alone retries for minutes, warning every few seconds), and nothing is created: no
    OUT_DIR (so no stale plan refuses a later build), no run directory, no MLflow store."""
    import os
    import time

    env = {**os.environ, "HOME": str(tmp_path)}
    with _not_ray(kind) as (address, says):
        if command == "shard":
            args, given = ["shard", str(good), str(tmp_path / "out"), "--executor", "ray", "--ray-address",
                           address, "--no-progress"], "--ray-address"
        else:
            from pipeline.cli import main

            assert main(["shard", str(good), str(tmp_path / "shards"), "--val-fraction", "0.5", "--no-progress"]) == 0
            args, given = ["train", "--set", f"data.shards={tmp_path / 'shards'}", "--set",
                           f"run.storage_path={tmp_path / 'out'}"], "RAY_ADDRESS"
            env["RAY_ADDRESS"] = address
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"pipeline {command}: error: cannot reach a Ray cluster at {address}: {says}"), \
        proc.stderr
    assert f"check {given} (the head's GCS port" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlruns.db").exists()


def test_a_missing_index_says_whether_a_build_began_there(tmp_path, capsys):
    from pipeline.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["verify", str(empty)]) == 2
    assert "not a shard directory: `pipeline shard SOURCE DIR` makes one" in capsys.readouterr().err
    (empty / ".shard-plan.json").write_text("{}")  # what a build writes first
    assert main(["verify", str(empty)]) == 2
    assert "the build has not finished: rerun `pipeline shard` to resume" in capsys.readouterr().err


def test_an_earlier_out_dir_inside_source_is_no_class_and_source_itself_is_refused(tmp_path, capsys):
    import json

    from pipeline.cli import main

    src = make_label_folder(tmp_path / "src", ["cat", "dog"], 4)
    assert main(["shard", str(src), str(src / "shards"), "--no-progress"]) == 0  # inside SOURCE: left out
    capsys.readouterr()
    # Another OUT_DIR, as the refusal of a rerun with other options advises: the first one is not a class.
    assert main(["shard", str(src), str(src / "shards-5"), "--samples-per-shard", "5", "--no-progress"]) == 0
    manifest = json.loads((src / "shards-5" / "index.json").read_text())
    assert manifest["classes"] == ["cat", "dog"], manifest["classes"]
    assert {"split": None, "source": "shards", "reason": "a shard set of an earlier `pipeline shard` (its OUT_DIR), "
            "not a class folder"} in manifest["skipped"]
    capsys.readouterr()
    assert main(["shard", str(src), str(src), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OUT_DIR is SOURCE" in err[0], err
    assert not (src / "index.json").exists() and not (src / ".shard-plan.json").exists()


def test_a_build_with_no_readable_image_leaves_nothing_that_refuses_the_mended_source(tmp_path, capsys):
    from pipeline.cli import main

    src = tmp_path / "junk"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        (src / name / "1.jpg").write_bytes(b"not an image")
    assert main(["shard", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no readable image" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no plan, no markers
    for name in ("a", "b"):
        (src / name / "1.jpg").unlink()
    make_label_folder(src, ["a", "b"], 2)  # the source mended: real images in the same folders
    assert main(["shard", str(src), str(tmp_path / "out"), "--no-progress"]) == 0, capsys.readouterr().err
