"""`python -m benchmarks [shard|load|train|all] [--quick]`: the same as `pipeline bench`."""

import argparse
import sys

from benchmarks.command import add_arguments, run_bench
from pipeline.errors import UserError

parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run the throughput benchmark suite.")
add_arguments(parser)
args = parser.parse_args()
try:
    raise SystemExit(run_bench(args))
except UserError as exc:
    print(f"benchmarks: error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
