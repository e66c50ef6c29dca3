"""Turn a benchmark payload into files a person reads: JSON, a Markdown table, PNG plots, an MLflow run."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.common import steal_note
from pipeline.fileio import write_atomic

_ROLE_COLOURS = {"case": "#1f77b4", "baseline": "#ff7f0e", "limit": "#7f7f7f"}


def stage_options(parser, *, quick: str, workdir: str, repeats: bool = True) -> None:
    """The options every stage module takes when run on its own: --quick, --workdir, --repeats, --report."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--workdir", type=Path, default=None, help=workdir)
    if repeats:
        parser.add_argument("--repeats", type=int, default=None, help="rounds of all cases (default 3, quick 1)")
    parser.add_argument("--report", type=Path, default=None,
                        help="also write the JSON/Markdown/plot report, as `pipeline bench` does, into this folder")


def report_if_asked(stage: str, module: str, args, results: list, ratios: list, *, started: str,
                    seconds: float) -> None:
    """``stage_report`` into ``args.report`` when the stage module was given ``--report DIR``."""
    import sys

    if args.report is not None:
        stage_report(stage, results, ratios, args.report, quick=args.quick, started=started, seconds=seconds,
                     command=" ".join([f"python -m {module}", *sys.argv[1:]]))


def stage_report(stage: str, results: list, ratios: list, out_dir: Path, *, quick: bool, started: str,
                 seconds: float, command: str) -> dict[str, Path]:
    """One stage's report, as ``pipeline bench STAGE`` writes it, from a stage module run on its own
    (``python -m benchmarks.STAGE_bench --report DIR``, which takes --repeats and size options the suite does not)."""
    import socket

    from benchmarks.common import machine_info

    payload = {"format_version": 1, "started": started, "quick": quick, "stages": [stage], "machine": machine_info(),
               "seconds": {stage: seconds}, "results": [r.to_dict() for r in results],
               "goals": [g.to_dict() for g in ratios], "errors": {}, "command": command}
    stem = f"{started[:10]}-{socket.gethostname().split('.')[0]}-{stage}" + ("-quick" if quick else "")
    return write_report(payload, out_dir, stem)


def write_report(payload: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``stem.json``, ``stem.md`` and the plots into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    plots = {
        "throughput": plot_throughput(payload, out_dir / f"{stem}-throughput.png"),
        "scaling": plot_scaling(payload, out_dir / f"{stem}-scaling.png"),
    }
    paths.update({k: v for k, v in plots.items() if v is not None})
    payload = dict(payload, plots={k: v.name for k, v in paths.items()})
    paths["json"] = _write_text(out_dir / f"{stem}.json", json.dumps(payload, indent=2, sort_keys=True) + "\n")
    paths["markdown"] = _write_text(out_dir / f"{stem}.md", markdown(payload))
    return paths


def _write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _fmt(x: float) -> str:
    if x != x:  # NaN
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def markdown(payload: dict[str, Any]) -> str:
    """The results table and the goals, with the machine they were measured on."""
    m = payload["machine"]
    lines = [
        f"# Benchmarks {payload['started']}{' (quick)' if payload['quick'] else ''}",
        "",
        f"Machine: {m.get('host')}, {m.get('processor')}, {m.get('cpus')} CPUs"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; torch {m.get('torch', '?')}, DALI {m.get('dali', 'n/a')}, Python {m.get('python')}.",
        "",
        "| stage | case | role | unit | median | spread | repeats | params |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in payload["results"]:
        params = ", ".join(f"{k}={v}" for k, v in sorted(r.get("params", {}).items())
                           if k not in ("scaling", "series"))  # plot bookkeeping, kept in the JSON
        lines.append(
            f"| {r['stage']} | {r['case']} | {r['role']} | {r['unit']} | {_fmt(r['median'])} | "
            f"±{r['spread'] * 100:.0f}% | {len(r['values'])} | {params} |"
        )
    if payload.get("goals"):
        lines += ["", "| ratio | value | goal | met |", "|---|---:|---:|---|"]
        for g in payload["goals"]:
            goal = "—" if g["goal"] is None else f"≥ {g['goal']:g}"
            met = {True: "yes", False: "**no**", None: "—"}[g["met"]]
            lines.append(f"| {g['name']} | {g['value']:.2f} | {goal} | {met} |")
    note = steal_note(payload["results"])
    if note:
        lines += ["", f"**Noisy host:** {note}."]
    if payload.get("errors"):
        lines += ["", "Stages that failed:"]
        lines += [f"- {stage}: `{err}`" for stage, err in payload["errors"].items()]
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in payload["seconds"].items()), ""]
    return "\n".join(lines)


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(payload: dict[str, Any], path: Path) -> Path | None:
    """One horizontal bar chart per (stage, metric): median with min–max whiskers, coloured by role."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in payload["results"]:
        groups[(r["stage"], r["unit"])].append(r)
    if not groups:
        return None
    plt = _matplotlib()
    n = len(groups)
    fig, axes = plt.subplots(n, 1, figsize=(8, 1.2 + 0.45 * sum(len(v) for v in groups.values()) + 0.6 * n),
                             squeeze=False)
    for ax, ((stage, unit), rows) in zip(axes[:, 0], sorted(groups.items())):
        names = [r["case"] for r in rows]
        med = [r["median"] for r in rows]
        lo = [r["median"] - min(r["values"]) for r in rows]
        hi = [max(r["values"]) - r["median"] for r in rows]
        ax.barh(names, med, xerr=[lo, hi], color=[_ROLE_COLOURS[r["role"]] for r in rows], capsize=3)
        ax.invert_yaxis()
        ax.set_title(f"{stage}: {unit}", fontsize=10, loc="left")
        for y, (v, top) in enumerate(zip(med, (m + h for m, h in zip(med, hi)))):
            ax.text(top, y, f"  {_fmt(v)}", va="center", fontsize=8)
        ax.set_xlim(0, max(m + h for m, h in zip(med, hi)) * 1.18)  # room for the labels
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _ROLE_COLOURS.values()]
    fig.legend(handles, list(_ROLE_COLOURS), loc="upper right", fontsize=8, ncol=3, frameon=False)
    m = payload["machine"]
    fig.suptitle(f"{m.get('host')} · {m.get('cpus')} CPUs{' · ' + m['gpu'] if m.get('gpu') else ''}", fontsize=9,
                 x=0.02, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scaling(payload: dict[str, Any], path: Path) -> Path | None:
    """Throughput against workers/threads for results that carry ``params['scaling']`` (the x value)."""
    series: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in payload["results"]:
        p = r.get("params", {})
        if "scaling" in p and r["unit"] != "fraction":
            series[(r["stage"], p.get("series", r["case"]), r["unit"])].append((float(p["scaling"]), r["median"]))
    if not series:
        return None
    plt = _matplotlib()
    stages = sorted({k[0] for k in series})
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for (st, name, unit), pts in sorted(series.items()):
            if st != stage:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax.set_ylabel(unit)
        ax.set_xlabel("workers / threads")
        ax.set_title(f"{stage} scaling", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", text)


def log_to_mlflow(payload: dict[str, Any], files: dict[str, Path], *, experiment: str, run_name: str) -> str:
    """Log one benchmark run (medians as metrics, machine as params, report files as artifacts); returns run id."""
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db"))
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=_artifact_location(experiment))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({"host": payload["machine"].get("host", ""), "quick": str(payload["quick"]),
                         "stages": ",".join(payload["stages"])})
        mlflow.log_params({f"machine.{k}": str(v)[:500] for k, v in payload["machine"].items()})
        metrics = {}
        for r in payload["results"]:
            key = _metric_name(f"{r['stage']}.{r['case']}.{r['metric']}")
            metrics[key] = r["median"]
        for g in payload["goals"]:
            metrics[_metric_name(f"ratio.{g['name']}")] = g["value"]
        mlflow.log_metrics(metrics)
        for p in files.values():
            mlflow.log_artifact(str(p))
        return run.info.run_id


def _artifact_location(experiment: str) -> str | None:
    # With the local SQLite store, artifacts go under ./mlartifacts (what `mlflow ui` serves);
    # a remote tracking server decides its own artifact root.
    if "MLFLOW_TRACKING_URI" in os.environ:
        return None
    return (Path("mlartifacts") / experiment).resolve().as_uri()
