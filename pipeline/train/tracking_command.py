"""``pipeline tracking sync RUN_DIR``: send a job's spooled tracking records to its MLflow server now."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import UserError, first_line


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tracking`` (with ``sync``) to the ``pipeline`` command."""
    t = subparsers.add_parser("tracking", help="the MLflow records a job spooled while its server was unreachable",
                              description="Training never waits on the tracking server: what it could not send "
                                          "waits in <storage path>/<run name>/tracking/ and is sent at the next "
                                          "start of the same job, or now with `pipeline tracking sync`.")
    sub = t.add_subparsers(dest="tracking_command", required=True, metavar="COMMAND")
    s = sub.add_parser("sync", help="send a job's unsent tracking records now, in order",
                       description="Send the unsent records of a job (metrics, params, tags, artifacts, the final "
                                   "status) to the tracking server the job used. Safe to repeat: nothing is "
                                   "logged twice.")
    s.add_argument("run_dir", metavar="RUN_DIR", help="the job's directory: <run.storage_path>/<run.name>")
    s.set_defaults(func=run_sync)


def run_sync(args: argparse.Namespace) -> int:
    from pipeline.train.tracking import spool_dir_for
    from pipeline.train.tracking_queue import JOB_FILE, http_env_defaults, sync, unsent_records

    run_dir = Path(args.run_dir)
    spool = run_dir if (run_dir / JOB_FILE).exists() else spool_dir_for(str(run_dir.resolve()))
    if not (spool / JOB_FILE).exists():
        raise UserError(f"{run_dir} holds no tracking spool ({spool / JOB_FILE} is missing): "
                        f"give the job's <run.storage_path>/<run.name> directory")
    http_env_defaults()
    before = unsent_records(spool)
    try:
        sent, run_id = sync(spool)
    except Exception as exc:  # the server is still unreachable or refuses: one line, the spool kept
        first = first_line(exc)[:300]
        raise UserError(f"tracking sync: {unsent_records(spool)} of {before} record(s) still unsent ({first}); "
                        f"they stay in {spool}, run this again later") from None
    print(f"tracking sync: sent {sent} record(s) to MLflow run {run_id}; nothing left in {spool}")
    return 0


__all__ = ["register", "run_sync"]
