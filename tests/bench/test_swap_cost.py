"""bench.swap_cost runs (two layers, one repeat): the script behind README's figure for the swap's verification."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_swap_cost_runs(tmp_path):
    out = tmp_path / "rows.json"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    args = [sys.executable, "-m", "bench.swap_cost", "--layers", "2", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["verify"] for r in rows] == [False, True] and all(r["ms"] > 0 and r["layers"] == 2 for r in rows)
