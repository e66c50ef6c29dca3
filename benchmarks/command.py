"""`pipeline bench [shard|load|train|gpu|all] [--quick]`: run the suite, write the report, log it to MLflow."""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import sys
from pathlib import Path

from pipeline.errors import UserError, first_line

_DEFAULT_OUT = Path(__file__).resolve().parent / "results"
_DEFAULT_WORK = Path(__file__).resolve().parent / "data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", nargs="?", default="all",
                        choices=["shard", "load", "train", "scale", "gpu", "resume", "all"],
                        help="which stage to benchmark (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data and one repeat: checks the suite end to end in seconds, figures meaningless")
    parser.add_argument("--out", type=Path, default=_DEFAULT_OUT,
                        help="folder for <date>-<host>.json/.md/.png (default: benchmarks/results)")
    parser.add_argument("--workdir", type=Path, default=_DEFAULT_WORK,
                        help="benchmark data, generated once and reused (default: benchmarks/data)")
    parser.add_argument("--experiment", default="pipeline-benchmarks",
                        help="MLflow experiment for this run (default: pipeline-benchmarks)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="throughput of every stage against its baseline and limit",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from benchmarks.report import log_to_mlflow, write_report
    from benchmarks.suite import ON_DEMAND, STAGES, run_suite

    if not args.no_mlflow and not args.experiment.strip():
        raise UserError("--experiment is empty: give an MLflow experiment name, or --no-mlflow")
    stages = [s for s in STAGES if s not in ON_DEMAND] if args.stage == "all" else [args.stage]
    if not args.no_mlflow:  # a store the report cannot go to is one line now, not after hours of benchmarks
        _check_store()
    for folder in (args.out, args.workdir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create {folder}: {exc.strerror}") from None
    bar = tqdm(total=len(stages), unit="stage", disable=not sys.stderr.isatty())
    try:
        payload = run_suite(stages, quick=args.quick, workdir=args.workdir, progress=bar)
    finally:
        bar.close()
    host = socket.gethostname().split(".")[0]
    stem = f"{dt.date.today().isoformat()}-{host}" + ("-quick" if args.quick else "")
    files = write_report(payload, args.out, stem)
    print(files["markdown"].read_text(encoding="utf-8"))
    for kind, path in sorted(files.items()):
        print(f"{kind:>10}: {path}")
    if not args.no_mlflow:
        try:
            run_id = log_to_mlflow(payload, files, experiment=args.experiment, run_name=stem)
        except Exception as exc:  # noqa: BLE001 - the store went away during the run: the report is on disk
            raise UserError(f"the report is written ({files['markdown']}), but logging it to MLflow failed: "
                            f"{first_line(exc)}") from None
        print(f"    mlflow: experiment {args.experiment!r}, run {run_id}")
    return 1 if payload["errors"] else 0


def _check_store() -> None:
    """The MLflow store the report will go to: a known scheme, an SQLite file (or a new one), a server that
    answers, with short HTTP waits."""
    import os

    from pipeline.train.runs import check_store
    from pipeline.train.tracking import check_tracking_uri
    from pipeline.train.tracking_queue import http_env_defaults

    http_env_defaults()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db")
    hint = "set MLFLOW_TRACKING_URI to a store that answers, or pass --no-mlflow"
    try:
        check_tracking_uri(uri)
        if uri.lower().startswith(("http://", "https://")):
            check_store(uri, hint=hint)
    except UserError as exc:
        raise UserError(f"{exc} ({hint})" if hint not in str(exc) else str(exc)) from None
