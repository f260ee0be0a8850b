"""bench/gpu_check.sh: its dry run on the CPU passes and shows its plan, the real run's plan fits its
time budget and names only what exists, a stage that hangs is stopped at its limit, and a stage of
test files runs every file whatever the one before returned."""
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402
import run as bench_run  # noqa: E402  bench/run.py

STAGES = ["install", "kernel-tests", "cuda-tests", "bench", "train", "compile-tests"]


@pytest.mark.slow
def test_the_dry_run_passes_and_shows_its_plan(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=500, env={**os.environ, "DVP_GPU_CHECK_OUT": str(out),
                                                       "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(os.listdir(out))
    assert len(files) <= 11 and {"summary.json", "summary.md", "kernel-tests.log", "cuda-tests.log", "bench.json",
                                 "samples.png"} <= set(files)
    summary = json.load(open(out / "summary.json"))
    assert summary["ok"] and summary["dry_run"] and [s["name"] for s in summary["stages"]] == STAGES
    assert all(s["rc"] == 0 and not s["timed_out"] for s in summary["stages"])
    md = open(out / "summary.md").read()
    assert "| kernel-tests | 0 |" in md and "## The plan" in md
    for planned in summary["planned"][:-1]:  # every stage with its limit, and every command it ran
        assert f"**{planned['name']}**: limit {planned['limit_s']} s" in md
    assert "**compile-tests**: limit: the time the stages before it left" in md
    for stage in summary["stages"]:
        assert all(f"`{command}`" in md for command in stage["commands"])
    train = next(s for s in summary["stages"] if s["name"] == "train")
    assert "--data npy:" in " ".join(train["commands"]), "the real run's fallback data path"
    cuda_log = open(out / "cuda-tests.log").read()
    assert " passed" in cuda_log and "graph_sampler_for" in summary["stages"][2]["commands"][0]
    assert "backend cpp: available" in open(out / "install.log").read()


def test_the_real_plan_fits_the_budget_and_names_what_exists(tmp_path):
    plan = gpu_check.stages(dry=False, work=str(tmp_path), wheels=None)
    assert [s["name"] for s in plan] == STAGES
    *fixed, rest = plan
    assert rest["limit"] is None and all(s["limit"] for s in fixed), "the compile tests get what is left"
    assert sum(s["limit"] for s in fixed) + gpu_check.REST_MIN_S <= gpu_check.TOTAL_LIMIT_S - gpu_check.SUMMARY_RESERVE_S
    expected = gpu_check.EXPECTED_S
    assert all(expected[s["name"].replace("-", "_")] <= 0.75 * s["limit"] for s in fixed), "each stage needs room"
    assert sum(expected.values()) <= 0.85 * gpu_check.TOTAL_LIMIT_S
    commands = [str(c) for s in plan for c in s["commands"]]
    assert not any(" -x" in c for c in commands), "-x would throw away every later test"
    tests = plan[1]["commands"] + plan[2]["commands"] + plan[5]["commands"]
    files = [next(w for w in c.split() if w.startswith("tests/")) for c in tests]
    assert files == [*gpu_check.KERNEL_TEST_FILES, gpu_check.CUDA_TEST_FILE, gpu_check.CUDA_TEST_FILE]
    assert all(os.path.exists(os.path.join(ROOT, f)) for f in files)
    assert plan[1]["keep_going"] and all("--maxfail=" in c for c in tests)
    # The bench selection is one bench/run.py accepts, and has no torch.compile variants.
    args = bench_run.parse_args(shlex.split(gpu_check.FIRST_RUN_BENCH))
    assert args.no_compile and args.paper_batch and args.presets == ["cifar10", "mnist"]
    assert list(bench_run.selection(args.only)) == ["ops", "model", "sampling"]


def test_a_hanging_stage_is_stopped_at_its_limit(tmp_path):
    stage = dict(name="hang", commands=["sleep 30", "echo never"], limit=1)
    start = time.monotonic()
    result = gpu_check.run_stage(stage, str(tmp_path), deadline=time.monotonic() + 60)
    assert time.monotonic() - start < 10
    assert result["timed_out"] and result["rc"] == 124
    log = open(tmp_path / "hang.log").read()
    assert "stopped after 1 s" in log and "never" not in log.split("$ sleep 30")[1].split("[gpu_check]")[0]


def test_a_stage_that_keeps_going_runs_every_command_and_reports_the_first_failure(tmp_path):
    stage = dict(name="files", commands=["exit 1", "echo second", "exit 2"], limit=30, keep_going=True)
    result = gpu_check.run_stage(stage, str(tmp_path), deadline=time.monotonic() + 60)
    assert result["exit_codes"] == [1, 0, 2] and result["rc"] == 1
    assert "second" in open(tmp_path / "files.log").read()
    stops = gpu_check.run_stage(dict(stage, keep_going=False), str(tmp_path), deadline=time.monotonic() + 60)
    assert stops["exit_codes"] == [1]


def test_the_probe_fails_loudly_on_a_cuda_machine_without_the_triton_backend(monkeypatch, capsys):
    import torch

    from dvp_fast.ops._backend import backend_unavailable

    assert gpu_check.probe() == 0 or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a stand-in GPU")
    with backend_unavailable("triton", "the Triton kernels are not installed (stand-in)"):
        assert gpu_check.probe() == 3
    captured = capsys.readouterr()
    assert "backend triton: NOT available: the Triton kernels are not installed" in captured.out
    assert "every later stage would run the torch fallback" in captured.err


def test_the_source_layout_imports_the_kernels_without_an_install(tmp_path):
    """A failed editable install leaves the checkout, where dvp_fast.kernels does not exist: the copy of
    the installed layout provides it."""
    layout = tmp_path / "src"
    gpu_check.make_source_layout(str(layout))
    code = "import dvp_fast, dvp_fast.kernels.dml, dvp_fast.csrc; print(dvp_fast.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(layout)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(layout))
    assert os.path.exists(layout / "dvp_fast" / "csrc" / "dml.cpp")


def test_without_an_output_folder_it_says_so(monkeypatch, capsys):
    monkeypatch.delenv("DVP_GPU_CHECK_OUT", raising=False)
    assert gpu_check.main(["--dry-run"]) == 2
    assert "set DVP_GPU_CHECK_OUT" in capsys.readouterr().err
