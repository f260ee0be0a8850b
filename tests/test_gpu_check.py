"""bench/gpu_check.sh: its dry run on the CPU passes, stays within its file budget, and a stage
that hangs is stopped at its limit without costing the stages after it."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_the_dry_run_passes_and_writes_at_most_eight_files(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=400, env={**os.environ, "DVP_GPU_CHECK_OUT": str(out),
                                                       "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and {"summary.json", "summary.md", "tests.log", "bench.json", "samples.png"} <= set(files)
    summary = json.load(open(out / "summary.json"))
    assert summary["ok"] and summary["dry_run"] and [s["name"] for s in summary["stages"]] == [
        "install", "tests", "bench", "train"]
    assert all(s["rc"] == 0 and not s["timed_out"] for s in summary["stages"])
    assert "| tests | 0 |" in open(out / "summary.md").read()
    assert " passed" in open(out / "tests.log").read()


def test_a_hanging_stage_is_stopped_at_its_limit(tmp_path):
    stage = dict(name="hang", commands=["sleep 30", "echo never"], limit=1)
    start = time.monotonic()
    result = gpu_check.run_stage(stage, str(tmp_path), deadline=time.monotonic() + 60)
    assert time.monotonic() - start < 10
    assert result["timed_out"] and result["rc"] == 124
    log = open(tmp_path / "hang.log").read()
    assert "stopped after 1 s" in log and "never" not in log.split("$ sleep 30")[1].split("[gpu_check]")[0]


def test_without_an_output_folder_it_says_so(monkeypatch, capsys):
    monkeypatch.delenv("DVP_GPU_CHECK_OUT", raising=False)
    assert gpu_check.main(["--dry-run"]) == 2
    assert "set DVP_GPU_CHECK_OUT" in capsys.readouterr().err
