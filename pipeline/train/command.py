"""``pipeline train`` and ``pipeline evaluate`` subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing

from pipeline.train.config import Precision
from pipeline.train.tracking_queue import http_env_defaults

PRECISIONS = typing.get_args(Precision)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``pipeline train`` and ``python -m pipeline.train``."""
    p.add_argument("--config", default="fashion_mnist", metavar="NAME_OR_FILE",
                   help="bundled config name (fashion_mnist, fashion_mnist_resnet, cifar10, imagenet_resnet50) "
                        "or a YAML file (default: fashion_mnist)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 --set scaling.num_workers=4 (repeatable)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="same as --set train.precision=… (auto: bf16 on GPUs and AMX CPUs that multiply it natively, "
                        "else fp16 on a GPU, fp32 on a CPU)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT_OR_MLFLOW_MODEL",
                   help="start from these weights: a checkpoint dir/file, or an MLflow model: runs:/<run id>/<model "
                        "name> (e.g. runs:/<id>/seed_cnn), models:/<model id>, models:/<name>/<version>; the head "
                        "is replaced when the class count differs")
    p.add_argument("--freeze-backbone-epochs", type=int, default=None, metavar="N",
                   help="with --init-from: train only the head for the first N epochs")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's and Ray Train's info lines (always kept in Ray's session logs)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``evaluate`` to the ``pipeline`` command."""
    t = subparsers.add_parser(
        "train", help="train a classifier on shards with Ray Train (DDP) and log to MLflow",
        description="Train on Ray Train workers (a local Ray unless RAY_ADDRESS is set) and track the run in "
                    "MLflow ($MLFLOW_TRACKING_URI, else sqlite:///mlruns.db). Starting a job again with the "
                    "same run.name resumes it from its latest checkpoint.",
    )
    add_train_arguments(t)
    t.set_defaults(func=run_train)

    e = subparsers.add_parser("evaluate", help="top-1/top-5 and per-class accuracy of a model on a shard split",
                              description="Evaluate a checkpoint or MLflow model on a shard split, in this process.")
    e.add_argument("--model", required=True, metavar="CHECKPOINT_OR_MLFLOW_MODEL",
                   help="checkpoint directory/file from pipeline train, or an MLflow model: runs:/<run id>/<model name> "
                        "(e.g. runs:/<id>/seed_cnn), models:/<model id>, models:/<name>/<version>")
    e.add_argument("--shards", required=True, metavar="DIR", help="shard directory (with index.json)")
    e.add_argument("--split", default="val", help="train | val (default: val)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--backend", default="auto", choices=("auto", "dali", "torch"))
    e.add_argument("--device", default="auto", choices=("auto", "gpu", "cpu"))
    e.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="default: what the checkpoint was trained in (fp32 for MLflow models and for fp16 off CUDA)")
    e.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    e.add_argument("--log-as", default=None, metavar="NAME",
                   help="also log the figures to the MLflow run that trained the model as NAME_top1, NAME_top5, "
                        "NAME_loss (e.g. --log-as test for a test split read once); the store is "
                        "$MLFLOW_TRACKING_URI, else sqlite:///mlruns.db")
    e.set_defaults(func=run_evaluate)


def config_from_args(args: argparse.Namespace):
    """The validated ``TrainConfig`` of parsed ``train`` arguments."""
    from pipeline.train.config import load_config

    overrides = list(args.overrides)
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.init_from:
        overrides.append(f"train.init_from={json.dumps(args.init_from)}")  # quoted: a YAML scalar, verbatim
    if args.freeze_backbone_epochs is not None:
        overrides.append(f"train.freeze_backbone_epochs={args.freeze_backbone_epochs}")
    return load_config(args.config, overrides)


def run_train(args: argparse.Namespace) -> int:
    """``pipeline train``: validate the config, fit, print the test accuracy and where the run is tracked."""
    cfg = config_from_args(args)
    http_env_defaults()  # a tracking server that stops answering: seconds per request, not MLflow's minutes
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from pipeline.train.launch import JobFailed, fit, summary

    try:
        result = fit(cfg, verbose=args.verbose)
    except JobFailed as exc:  # the workers' errors were shown as Ray printed them; this says what it means
        print(f"pipeline train: error: {exc}", file=sys.stderr)
        return 1
    if result.stopped:
        from pipeline.train.preempt import exit_code

        print(f"pipeline train: stopped by {result.stopped} after a checkpoint at {result.checkpoint_path}; "
              f"run the same command again to continue (--set run.name={result.run_name})", file=sys.stderr)
        if result.tracking_behind:
            print(result.tracking_behind, file=sys.stderr)
        return exit_code(result.stopped)
    print(summary(result))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``pipeline evaluate``: print top-1/top-5 and per-class accuracy."""
    from pipeline.train.evaluate import RunLog, evaluate_model

    http_env_defaults()
    # MLflow's download bar for an MLflow model: on a terminal only, not as lines in a log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if sys.stderr.isatty() else "false")
    run_log = RunLog(args.model, args.log_as) if args.log_as is not None else None  # its errors before the work
    res = evaluate_model(args.model, args.shards, args.split, batch_size=args.batch_size, backend=args.backend,
                         device=args.device, precision=args.precision)
    if args.json:
        print(json.dumps({"split": res.split, "samples": res.samples, "top1": res.top1, "top5": res.top5,
                          "loss": res.loss, "precision": res.precision,
                          "per_class": {c: a for c, _, a in res.per_class()}}))
    else:
        print(res.format())
    if run_log is not None:
        run_log.log(res, args.shards)
        print(f"logged as {args.log_as}_top1, {args.log_as}_top5, {args.log_as}_loss to MLflow run {run_log.run_id}",
              file=sys.stderr)
    return 0


__all__ = ["add_train_arguments", "config_from_args", "register", "run_evaluate", "run_train"]
