"""The benchmarks' code runs: each GPU benchmark module in its --smoke mode (tiny shapes, the Triton
interpreter on a CPU) and the main job's layers part, in subprocesses. No timing is asserted: a GPU loan
is short, and a typo in a benchmark must show here, not there."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import ON_GPU

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep what is there (wheels)
    env = {**os.environ, "PYTHONPATH": path, "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.parametrize(
    "module", ["decode", "decode --splits", "decode --append", "generate", "window", "host", "tune", "hf", "varlen"]
)
def test_gpu_benchmark_module_runs(module, tmp_path):
    out = tmp_path / "rows.json"
    name, *flags = module.split()
    run(["-m", f"bench.{name}", *flags, "--smoke", "--json", str(out)], tmp_path)
    assert json.loads(out.read_text())["meta"]["torch"]


def test_main_job_runs(tmp_path):
    proc = run(["-m", "bench", "--parts", "layers", "--out", str(tmp_path), "--no-progress"], tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["layers"]
    assert ("interpreter_agreement" in report) == (not ON_GPU)  # the interpreter check runs where there is no GPU
    assert "Chapter layers on real text" in proc.stdout
