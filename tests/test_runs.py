"""``pipeline runs`` on a real MLflow SQLite store: the params that differ, final metrics, sorting."""

from __future__ import annotations

import mlflow
import pytest

from pipeline.cli import main
from pipeline.train.runs import differing_params, format_table, sort_rows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("cmp", artifact_location=(root / "artifacts").as_uri())
    for name, lr, top1 in (("a", "0.001", 0.71), ("b", "0.003", 0.83), ("c", "0.01", 0.64)):
        run = client.create_run(exp, run_name=name)
        for key, value in (("optim.lr", lr), ("train.epochs", "2"), ("run.name", name)):
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "val_top1", top1 - 0.2, step=1)
        client.log_metric(run.info.run_id, "val_top1", top1, step=2)  # the final value is the one shown
        client.log_metric(run.info.run_id, "val_loss", 1 - top1, step=2)
        client.set_terminated(run.info.run_id, "FINISHED")
    client.create_experiment("other")
    ended = client.create_experiment("ended", artifact_location=(root / "artifacts").as_uri())
    for name, status, reason in (("ok", "FINISHED", None), ("nan", "FAILED", "the weights became non-finite (NaN or "
                                 "inf) by step 2 (epoch 1; first: fc.weight)\nmore"),
                                 ("spot", "KILLED", "SIGTERM to worker rank 1 on 10.0.0.2"), ("gone", "FAILED", None)):
        run = client.create_run(ended, run_name=name)
        client.log_param(run.info.run_id, "optim.lr", {"ok": "0.1", "nan": "1e30"}.get(name, "0.2"))
        if reason:
            client.set_tag(run.info.run_id, "pipeline.end_reason", reason)
        client.set_terminated(run.info.run_id, status)
    return uri


def test_runs_names_the_differing_params_with_final_metrics_best_first(store, capsys):
    assert main(["runs", "--tracking-uri", store, "--experiment", "cmp", "--sort", "val_top1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "experiment cmp: 3 run(s); params that differ: optim.lr"
    header = out[1].split()
    assert header[:4] == ["run", "id", "status", "optim.lr"] and "train.epochs" not in header
    rows = [line.split() for line in out[2:]]
    assert [r[0] for r in rows] == ["b", "a", "c"]
    lr, top1 = header.index("optim.lr"), header.index("val_top1")
    assert [(r[lr], r[top1]) for r in rows] == [("0.003", "0.8300"), ("0.001", "0.7100"), ("0.01", "0.6400")]


def test_runs_says_why_failed_and_killed_runs_ended(store, capsys):
    assert main(["runs", "--tracking-uri", store, "--experiment", "ended"]) == 0
    out = capsys.readouterr().out
    table, why = out.split("\n\nwhy runs ended early:\n")
    assert len(table.splitlines()) == 2 + 4  # header, column names, one row per run
    lines = why.splitlines()
    assert len(lines) == 2, lines  # a run without a recorded reason gets no line, nor does a finished one
    assert lines[0].startswith("  spot (") and lines[0].endswith(") KILLED: SIGTERM to worker rank 1 on 10.0.0.2")
    assert lines[1].endswith("FAILED: the weights became non-finite (NaN or inf) by step 2 (epoch 1; first: "
                             "fc.weight)"), lines  # its first line only
    assert main(["runs", "--tracking-uri", store, "--experiment", "cmp"]) == 0
    assert "why runs ended early" not in capsys.readouterr().out


def test_runs_user_errors_are_one_line(store, capsys, tmp_path):
    assert main(["runs", "--tracking-uri", store]) == 2  # two experiments with runs: which one?
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pipeline runs: error: choose an experiment with --experiment NAME; this store has: cmp, ended, other"]
    assert main(["runs", "--tracking-uri", store, "--experiment", "cmp", "--sort", "train.epochs"]) == 2
    assert "cannot sort by 'train.epochs'" in capsys.readouterr().err
    assert main(["runs", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()  # looking does not create a store


def test_table_helpers():
    class Run:  # the two attributes differing_params reads, as MLflow's Run has them
        def __init__(self, params):
            self.data = type("D", (), {"params": params})()

    runs = [Run({"a": "1", "b": "x", "c": "2", "run.name": "r1"}), Run({"a": "1", "b": "y", "run.name": "r2"}),
            Run({"a": "1"})]
    assert differing_params(runs) == ["b"]  # c: one value where present; run.name is not a setting
    rows = [{"k": 0.5, "n": "p"}, {"k": None, "n": "q"}, {"k": 0.9, "n": "r"}]
    assert [r["n"] for r in sort_rows(rows, "k")] == ["p", "r", "q"]  # not a metric: ascending, missing last
    assert format_table([{"x": 1.23456, "y": None}], ["x", "y"]).splitlines() == ["x       y", "1.2346  -"]


def test_runs_refuses_a_store_uri_it_cannot_read_in_one_line_touching_nothing(tmp_path, capsys, monkeypatch):
    """A text file, an empty file or another program's SQLite database given as the store stays as it is
    (MLflow would turn the last two into its own store); an unknown scheme and a directory (MLflow 3's
    file store, refused) are one line naming the URI too, not MLflow's or SQLAlchemy's traceback."""
    import sqlite3

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "notes.db").write_text("not a database\n")
    (tmp_path / "empty.db").write_bytes(b"")
    con = sqlite3.connect(tmp_path / "other.db")
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    other = (tmp_path / "other.db").read_bytes()
    (tmp_path / "dir").mkdir()
    cases = {
        f"sqlite:///{tmp_path / 'notes.db'}": "is not an SQLite database",
        f"sqlite:///{tmp_path / 'empty.db'}": "is an empty file",
        f"sqlite:///{tmp_path / 'other.db'}": "SQLite database of something else",
        "foo://bar": "MLflow has no store for foo://",
        str(tmp_path / "dir"): "file store",
        (tmp_path / "dir").as_uri(): "file store",
        str(tmp_path / "nodir"): "no MLflow store at",
    }
    for uri, says in cases.items():
        assert main(["runs", "--tracking-uri", uri]) == 2, uri
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pipeline runs: error: ") and says in err[0], (uri, err)
        assert uri in err[0] or str(tmp_path) in err[0], err  # names what it was given
        assert "Traceback" not in captured.err + captured.out
    assert (tmp_path / "notes.db").read_text() == "not a database\n"
    assert (tmp_path / "empty.db").stat().st_size == 0
    assert (tmp_path / "other.db").read_bytes() == other
    assert not list((tmp_path / "dir").iterdir()) and not (tmp_path / "nodir").exists()


@pytest.mark.timeout(60)  # MLflow alone retries for minutes without a word
def test_runs_says_at_once_when_no_server_answers(capsys):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    assert main(["runs", "--tracking-uri", uri]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pipeline runs: error: cannot reach the MLflow server at {uri}: "), err


@pytest.mark.timeout(90)
def test_runs_says_in_seconds_when_the_server_answers_health_then_hangs(tmp_path):
    """A server that passes the /health probe and then never answers an API call (a wedged MLflow server
    behind a healthy proxy): one line once the bounded wait and one retry are spent, not MLflow's
    7 retries with a growing backoff. A process of its own, so that the defaults it sets are its own."""
    import http.server
    import os
    import subprocess
    import sys
    import threading
    import time

    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/health"):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
                return
            release.wait(120)  # hangs until the test ends

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "3"  # the wait per request, shortened here; the retries are the default's
    try:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pipeline", "runs", "--tracking-uri", uri], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=80)
        took = time.monotonic() - start
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"pipeline runs: error: cannot read the MLflow store at {uri}: the server took the request but sent no "
        "answer within 3 s (MLFLOW_HTTP_REQUEST_TIMEOUT)"], proc.stderr
    assert took < 40, took  # one retry: about 2 × 3 s plus start-up; MLflow's own 7 retries back off for minutes
