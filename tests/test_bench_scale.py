"""`pipeline bench scale --quick`: the cost-growth series runs end to end (figures not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_quick_scale_bench_writes_table_plot_and_report(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "scale", "--quick", "--no-mlflow", "--out", str(tmp_path / "results"),
         "--workdir", str(tmp_path / "work")],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(next((tmp_path / "results").glob("*-quick.json")).read_text())
    assert payload["stages"] == ["scale"] and payload["errors"] == {}
    cases = {(r["case"], r["metric"]) for r in payload["results"]}
    for setting in ("256MB", "2MB"):
        for case in (f"build {setting}", f"no-op resume {setting}", f"verify {setting} 1w", f"loader start {setting}",
                     f"epoch rebuild {setting}", f"imagenet plan {setting}"):
            assert any(c == case for c, _ in cases), case
    # Two sizes were measured, so every sized cost has a fitted slope in the table.
    sizes = {r["params"]["n"] for r in payload["results"] if not r["params"].get("planning_only")}
    assert len(sizes) == 2
    # Each step records what else the machine did during its own runs: load average at each start, CPU steal.
    for r in payload["results"]:
        runs = len(r["values"])  # one per run of the step that measured it
        assert len(r["params"]["load_avg_1m"]) == runs, r
        if os.path.exists("/proc/stat"):
            assert len(r["params"]["cpu_steal"]) == runs and all(0 <= s <= 1 for s in r["params"]["cpu_steal"]), r
    table = (tmp_path / "work" / "scale" / "scale.md").read_text()
    assert "Load average (1 min) at the steps' starts" in table
    assert "| build 256MB seconds |" in table and "Planning only, 5,500 records" in table
    with Image.open(tmp_path / "work" / "scale" / "scale-loglog.png") as img:
        assert img.format == "PNG" and img.width > 300
    # A no-op resume wrote nothing, and every build verified clean (the children assert both).
    assert all(v > 0 for r in payload["results"] for v in r["values"] if r["metric"] != "worker_rss")
