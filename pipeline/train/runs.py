"""``pipeline runs``: the runs of an MLflow experiment as a table, for a terminal on a head node.

Shows what the MLflow UI's compare view shows: the params that differ between
the listed runs and each run's final metrics, sorted by a metric or param. A
param differs when the runs that have it hold two or more values: a sweep's
parent (sweep params only) or a trial that failed before logging its config does
not make every other param look different.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from pipeline.errors import UserError, first_line
from pipeline.train.tracking_queue import END_REASON_TAG

METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "train_images_per_s")
HIGHER_IS_BETTER = ("val_top1", "val_top5", "train_images_per_s")
# Params that differ between any two jobs and say nothing about the setting compared.
IGNORED_PARAMS = ("run.name",)
VALUE_WIDTH = 28


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Fixed-width text table; floats to 4 places, None as ``-``, long values shortened from the left."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"  # ratios and losses vs rates
    text = str(value)
    return text if len(text) <= VALUE_WIDTH else "…" + text[-(VALUE_WIDTH - 1):]


def differing_params(runs: list) -> list[str]:
    """Names of the params that take two or more values among the runs that have them, sorted."""
    names = set().union(*(r.data.params for r in runs)) if runs else set()
    out = []
    for name in names:
        if name in IGNORED_PARAMS:
            continue
        if len({r.data.params[name] for r in runs if name in r.data.params}) > 1:
            out.append(name)
    return sorted(out)


def run_rows(runs: list, params: list[str]) -> list[dict[str, Any]]:
    """One row per run: name, short id, status, the given params, final metrics."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.info.run_name, "id": r.info.run_id[:8], "status": r.info.status}
        parent = r.data.tags.get("mlflow.parentRunId")
        row["parent"] = parent[:8] if parent else None
        row.update({p: r.data.params.get(p) for p in params})
        row.update({m: r.data.metrics.get(m) for m in METRICS})
        rows.append(row)
    return rows


def sort_rows(rows: list[dict[str, Any]], key: str | None) -> list[dict[str, Any]]:
    """By ``key`` (best first for metrics, ascending for params); rows without it last."""
    if key is None:
        return rows
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]

    def value(r):
        v = r[key]
        try:
            return (0, float(v), "")
        except (TypeError, ValueError):
            return (1, 0.0, str(v))

    present.sort(key=value, reverse=key in HIGHER_IS_BETTER)
    return present + missing


def runs_table(tracking_uri: str, experiment: str | None, sort: str | None = None, limit: int = 50) -> str:
    """The table ``pipeline runs`` prints."""
    import mlflow

    try:  # a URI MLflow cannot use fails here, each kind with its own exception type
        client = mlflow.MlflowClient(tracking_uri)
        exp = _pick_experiment(client, experiment)
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy, requests: all mean "not a store to read"
        raise UserError(f"cannot read the MLflow store at {tracking_uri}: {_first_sentence(exc)}") from None
    if not runs:
        return f"experiment {exp.name}: no runs"
    params = differing_params(runs)
    known = set(METRICS) | set(params) | {"run", "status"}
    if sort is not None and sort not in known:
        raise UserError(f"cannot sort by {sort!r}: use a metric ({', '.join(METRICS)}) or a differing param "
                        f"({', '.join(params) or 'none'})")
    rows = sort_rows(run_rows(runs, params), sort)
    columns = ["run", "id", "status"] + (["parent"] if any(r["parent"] for r in rows) else []) + params
    columns += [m for m in METRICS if any(r[m] is not None for r in rows)]
    header = (f"experiment {exp.name}: {len(runs)} run(s)"
              f"{'' if len(runs) < limit else f' (the latest {limit}; --limit N for more)'}; "
              f"params that differ: {', '.join(params) or 'none'}")
    return header + "\n" + format_table(rows, columns) + _end_reasons(runs, [r["id"] for r in rows])


def _end_reasons(runs: list, order: list[str]) -> str:
    """Lines under the table: why each FAILED or KILLED run ended (its ``pipeline.end_reason``), in table order."""
    by_id = {r.info.run_id[:8]: r for r in runs}
    lines = []
    for run_id in order:
        run = by_id[run_id]
        reason = (run.data.tags.get(END_REASON_TAG) or "").strip()
        if run.info.status in ("FAILED", "KILLED") and reason:
            lines.append(f"  {run.info.run_name} ({run_id}) {run.info.status}: {reason.splitlines()[0][:240]}")
    return "\n\nwhy runs ended early:\n" + "\n".join(lines) if lines else ""


def _pick_experiment(client, name: str | None):
    if name is not None:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise UserError(f"no experiment {name!r} in this store; experiments: {names}")
        return exp
    every = client.search_experiments()
    exps = [e for e in every if e.name != "Default" or len(every) == 1]
    if len(exps) != 1:
        names = ", ".join(sorted(e.name for e in exps)) or "none"
        raise UserError(f"choose an experiment with --experiment NAME; this store has: {names}")
    return exps[0]


PROBE_TIMEOUT_S = 5.0


def _first_sentence(exc: BaseException) -> str:
    text = str(exc)
    if "MLFLOW_ALLOW_FILE_STORE" in text:  # MLflow 3's refusal of a directory (file store): one long paragraph
        return ("MLflow's file store (a directory) is in maintenance mode and refused; use a sqlite:/// or "
                "http(s):// store, or set MLFLOW_ALLOW_FILE_STORE=true")
    if "timed out" in text.lower():  # requests' ReadTimeout inside MLflow's "Max retries exceeded" paragraph
        wait = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
        return f"the server took the request but sent no answer within {wait} s (MLFLOW_HTTP_REQUEST_TIMEOUT)"
    return first_line(exc).split(". ", 1)[0].rstrip(".")  # its first sentence


def check_store(uri: str, hint: str = "pass --tracking-uri (or set MLFLOW_TRACKING_URI)") -> None:
    """One ``UserError`` line for a store ``pipeline runs`` cannot read, found without changing anything:
    a ``sqlite:///`` file that is missing or is not an MLflow SQLite database (MLflow would turn an empty
    or foreign one into its own), or an ``http(s)://`` server that does not answer (MLflow would retry
    for minutes in silence). ``hint``: how the user names another store."""
    from pipeline.train.tracking import check_tracking_uri, missing_sqlite_store

    if not uri.startswith("sqlite:"):  # SQLite files are checked below, as stores to read
        check_tracking_uri(uri)  # a scheme MLflow has no store for
    missing = missing_sqlite_store(uri)
    if missing:
        raise UserError(f"no MLflow store at {missing}: train first, or {hint}")
    if uri.startswith("sqlite:///"):
        _check_sqlite_store(uri, uri[len("sqlite:///"):], hint)
    elif uri.lower().startswith(("http://", "https://")):
        _probe_server(uri)
    elif "://" not in uri or uri.startswith("file:"):  # MLflow's file store: a directory it would create
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        path = url2pathname(urlparse(uri).path) if uri.startswith("file:") else uri
        if not os.path.isdir(path):
            raise UserError(f"no MLflow store at {path}: train first, or {hint}")


def _check_sqlite_store(uri: str, path: str, hint: str) -> None:
    import sqlite3
    from pathlib import Path

    from pipeline.train.tracking import SQLITE_HEADER, sqlite_header

    try:
        header = sqlite_header(path)
    except OSError as exc:
        raise UserError(f"cannot read the MLflow store at {uri}: {exc.strerror or exc}") from None
    if header != SQLITE_HEADER:
        what = "an empty file" if not header else "not an SQLite database"
        raise UserError(f"no MLflow store at {uri}: {path} is {what}; {hint}")
    try:  # read-only: a database of another program is left as it is
        con = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.Error:
        return  # locked, or the like: MLflow says what it is
    if "experiments" not in tables:
        raise UserError(f"no MLflow store at {uri}: {path} is an SQLite database of something else (no "
                        f"experiments table); {hint}")


def _probe_server(uri: str) -> None:
    """One GET of ``URI/health``: any HTTP answer (even 401 or 404) means a server is there."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return  # it answered
    except urllib.error.URLError as exc:
        reason = exc.reason
    except (OSError, ValueError, http.client.HTTPException) as exc:  # a timeout, a reset, a malformed URL
        reason = exc
    if isinstance(reason, ssl.SSLError):
        return  # a TLS server answered; MLflow's own settings decide (MLFLOW_TRACKING_INSECURE_TLS, …)
    if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
        text = f"no answer within {PROBE_TIMEOUT_S:.0f} s"
    else:
        text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    raise UserError(f"cannot reach the MLflow server at {uri}: {text}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``runs`` to the ``pipeline`` command."""
    p = subparsers.add_parser(
        "runs", help="table of an experiment's MLflow runs: the params that differ, final metrics",
        description="List an experiment's runs with the params that differ between them and their final "
                    "metrics ($MLFLOW_TRACKING_URI, else sqlite:///mlruns.db).")
    p.add_argument("--experiment", default=None, metavar="NAME",
                   help="MLflow experiment (default: the store's only one)")
    p.add_argument("--sort", default=None, metavar="KEY",
                   help="a metric (best first, e.g. val_top1) or a differing param; default: newest first")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="the latest N runs (default 50)")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow store or server")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from pipeline.train.tracking import resolve_tracking_uri
    from pipeline.train.tracking_queue import http_env_defaults

    if args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    uri = resolve_tracking_uri(args.tracking_uri)
    http_env_defaults()  # a server that answers /health and then hangs: one line in seconds, not minutes
    check_store(uri)
    print(runs_table(uri, args.experiment, args.sort, args.limit))
    return 0


__all__ = ["check_store", "differing_params", "format_table", "register", "run_rows", "runs_table", "sort_rows"]
