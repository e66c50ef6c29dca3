"""``python -m pipeline.train --config … --set …``: the same as ``pipeline train``.

This is the form ``ray job submit -- python -m pipeline.train …`` runs on a cluster.
"""

from __future__ import annotations

import sys

from pipeline.errors import ArgumentParser, UserError
from pipeline.train.command import add_train_arguments, run_train


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` like ``pipeline train`` and run it; user errors become one stderr line and exit 2."""
    parser = ArgumentParser(prog="python -m pipeline.train",
                                     description="Train on Ray Train and track in MLflow (same as `pipeline train`).")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except UserError as exc:
        print(f"pipeline train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
