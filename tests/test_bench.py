"""`pipeline bench --quick`: the suite runs end to end and writes a well-formed report (figures not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.common import Ratio, Result, ratio
from benchmarks.report import markdown, write_report

REPO = Path(__file__).resolve().parents[1]


def _payload() -> dict:
    results = [
        Result("shard", "pass-through", "case", "mb_per_s", "MB/s", [90.0, 100.0, 110.0], {"scaling": 2, "series": "p"}),
        Result("shard", "pass-through 1w", "case", "mb_per_s", "MB/s", [50.0, 55.0], {"scaling": 1, "series": "p"}),
        Result("shard", "tar -cf", "limit", "mb_per_s", "MB/s", [200.0, 200.0]),
    ]
    goal = ratio(results, "pass-through / tar -cf", "pass-through", "tar -cf", metric="mb_per_s", goal=0.9)
    return {"format_version": 1, "started": "2026-01-01T00:00:00+00:00", "quick": False, "stages": ["shard"],
            "machine": {"host": "h", "cpus": 2, "processor": "cpu", "python": "3.11"}, "seconds": {"shard": 1.0},
            "results": [r.to_dict() for r in results], "goals": [goal.to_dict()], "errors": {}}


def test_medians_ratios_and_report_files(tmp_path):
    payload = _payload()
    assert payload["results"][0]["median"] == 100.0
    assert payload["results"][0]["spread"] == pytest.approx(0.1)
    assert payload["goals"][0]["value"] == pytest.approx(0.5) and payload["goals"][0]["met"] is False
    files = write_report(payload, tmp_path, "2026-01-01-h")
    assert sorted(files) == ["json", "markdown", "scaling", "throughput"]
    for key in ("scaling", "throughput"):
        with Image.open(files[key]) as img:
            assert img.format == "PNG" and img.width > 300
    text = files["markdown"].read_text()
    assert "| shard | pass-through | case | MB/s | 100 | ±10% | 3 |  |" in text
    assert "| pass-through / tar -cf | 0.50 | ≥ 0.9 | **no** |" in text
    assert json.loads(files["json"].read_text())["plots"] == {"scaling": "2026-01-01-h-scaling.png",
                                                              "throughput": "2026-01-01-h-throughput.png"}
    assert markdown(payload) == text


def test_ratio_names_missing_case():
    with pytest.raises(KeyError, match=r"no result for \('nope', 'm'\)"):
        ratio([Result("x", "a", "case", "m", "u", [1.0])], "r", "nope", "a", metric="m")
    assert Ratio("r", "a", "b", 1.0).met is None


@pytest.mark.slow
def test_quick_suite_writes_report_and_mlflow_run(tmp_path):
    """The whole suite in --quick mode, as a user runs it, logging to a throwaway MLflow store."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "all", "--quick", "--out", str(tmp_path / "results"),
         "--workdir", str(tmp_path / "work"), "--experiment", "bench-test"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = list((tmp_path / "results").glob("*-quick.json"))
    assert len(reports) == 1
    payload = json.loads(reports[0].read_text())
    assert payload["quick"] is True and payload["errors"] == {}
    stages = {r["stage"] for r in payload["results"]}
    assert stages == {"shard", "load", "train"}
    for r in payload["results"]:
        assert r["role"] in ("case", "baseline", "limit") and r["values"] and all(v > 0 for v in r["values"])
    assert {g["name"] for g in payload["goals"]} >= {"pass-through / tar -cf", "DALI-CPU / torch fallback"}
    stem = reports[0].with_suffix("")
    for suffix in (".md", "-throughput.png", "-scaling.png"):
        assert Path(f"{stem}{suffix}").stat().st_size > 0

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["bench-test"], output_format="list")
    assert len(runs) == 1
    assert "ratio.pass-through / tar -cf" in runs[0].data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert f"{stem.name}.json" in artifacts
