"""bench/run.py --quick on CPU: every section runs, and its JSON and markdown say what a reader needs."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, BENCH)

import run  # noqa: E402  bench/run.py

ENV_KEYS = ("device", "device_name", "torch", "triton", "git_commit", "git_dirty", "cpu_count", "torch_threads",
            "command", "date", "backends_timed")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest's; not a benchmark setting
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = glob.glob(str(out / "*-quick.json"))
    (md_path,) = glob.glob(str(out / "*-quick.md"))
    with open(json_path) as f:
        result = json.load(f)
    with open(md_path) as f:
        md = f.read()
    return result, md, proc.stdout, out


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.slow
def test_quick_run_records_the_environment(quick_run):
    result, md, _, out = quick_run
    env = result["environment"]
    for key in ENV_KEYS:
        assert key in env, key
    assert env["device"] == "cpu" and env["device_name"].startswith("CPU")
    assert env["quick"] is True and env["torch_threads"] == 1
    assert "--quick" in env["command"]
    assert env["backends_timed"][0] == "torch"
    assert _finite(result["copy_bandwidth"]["median_gbps"]) and result["copy_bandwidth"]["median_gbps"] > 0
    assert all(os.path.basename(p).startswith("cpu-") for p in glob.glob(str(out / "*")))
    assert env["device_name"] in md and env["torch"] in md and str(env["git_commit"]) in md


@pytest.mark.slow
def test_quick_run_covers_every_section_and_group(quick_run):
    result, md, stdout, _ = quick_run
    assert set(result["sections"]) == set(run.SECTIONS)
    backends = result["environment"]["backends_timed"]
    for section, groups in run.SECTIONS.items():
        rows = result["sections"][section]["rows"]
        assert rows, section
        for group in groups:
            if group == "cpp_small" and "cpp" not in backends:
                continue
            assert any(r["group"] == group for r in rows), f"{section}.{group} has no rows"
        assert f"## {section}" in md and f"== {section}" in stdout
    ops_rows = result["sections"]["ops"]["rows"]
    for backend in backends:  # every available backend was timed
        assert any(r["variant"] == backend and r["group"] == "dml_log_prob" for r in ops_rows), backend
    assert any(r["variant"] == "authors" for r in ops_rows if r["group"] == "dct_pair")
    train = [r for r in result["sections"]["model"]["rows"] if r["group"] == "train"]
    assert {r["variant"] for r in train} == {"eager fp32", "fast"}
    assert {r["metric"] for r in train} == {"throughput", "peak memory"}
    eager = [r for r in train if r["variant"] == "eager fp32" and r["metric"] == "throughput"]
    assert all("cpp" not in r["dispatch"] for r in eager), "the eager path must run the torch fallbacks only"


@pytest.mark.slow
def test_quick_run_numbers_are_finite_and_labelled(quick_run):
    result, md, _, _ = quick_run
    rows = [r for sec in result["sections"].values() for r in sec["rows"]]
    failed = [n for n in result["notes"] if "failed" in n]
    assert not failed, failed
    for r in rows:
        where = f"{r['section']}.{r['group']} {r['case']} {r['variant']} {r['metric']}"
        assert _finite(r["value"]) and r["value"] >= 0, where
        assert r["unit"], where
        assert r["spread"] is None or (_finite(r["spread"]) and r["spread"] >= 0), where
        if r["ratio"] is not None:
            assert _finite(r["ratio"]) and r["ratio"] > 0 and r["baseline"], where
    # every case with a baseline variant has its ratios filled in
    timed = [r for r in rows if r["section"] == "ops" and r["metric"] == "time" and r["group"] != "dct_pair"]
    assert all(r["ratio"] is not None for r in timed if r["variant"] != "torch")
    # reduced sizes say so
    assert all("reduced" in r["note"] for r in rows if r["section"] == "model" and r["group"] == "train")
    assert "| case | variant | metric |" in md


def test_only_selects_sections_and_groups():
    assert run.selection(None) == run.SECTIONS
    assert run.selection(["ops.dml_log_prob", "sampling"]) == {"ops": ("dml_log_prob",),
                                                                 "sampling": run.SECTIONS["sampling"]}
    with pytest.raises(SystemExit, match="unknown group"):
        run.selection(["model.nothing"])
    with pytest.raises(SystemExit, match="unknown section"):
        run.selection(["kernels"])


def test_only_runs_groups_in_the_order_named():
    assert list(run.selection(["sampling.sample1000", "ops.dct_pair", "ops.dml_log_prob"]).items()) == [
        ("sampling", ("sample1000",)), ("ops", ("dct_pair", "dml_log_prob"))]
    assert "conv1x1" in run.SECTIONS["ops"]


def test_presets_and_paper_batch_choose_the_training_cases(monkeypatch):
    """--presets cifar10 mnist --paper-batch: the cifar10 step at 128, then the mnist step at 250, nothing else."""
    import bench_model
    import common

    st = common.Settings.make("cpu", quick=False)
    st.presets, st.paper_batch = ("cifar10", "mnist"), True
    seen = []
    monkeypatch.setattr(bench_model, "_train_case", lambda preset, batch, st: seen.append((preset, batch)) or [])
    bench_model.bench_train(st)
    assert seen == [("cifar10", 128), ("mnist", 250)]
    assert st.chosen([("mnist", 1), ("omniglot", 2), ("cifar10", 3)], preset_of=lambda s: s[0]) == [
        ("cifar10", 3), ("mnist", 1)]


def test_a_run_stopped_part_way_keeps_the_groups_it_finished(tmp_path, monkeypatch):
    """The results are written after every group: a run killed in its second group (here: interrupted)
    leaves the first group's rows on disk, and says which groups it did not run."""
    import common

    def fake_group(section, group, st, copy_gbps):
        if group == "dml_log_prob":
            raise KeyboardInterrupt  # the time limit's kill, as far as this process can tell
        return [common.row(section, group, "a case", "torch", "time", "ms", value=1.5, n=3)]

    monkeypatch.setattr(run, "run_group", fake_group)
    monkeypatch.setattr(common, "copy_bandwidth", lambda st: dict(median_gbps=1.0, iqr_gbps=0.1, method="stub"))
    with pytest.raises(KeyboardInterrupt):
        run.main(["--device", "cpu", "--quick", "--only", "ops.dct_pair", "ops.dml_log_prob", "sampling.steps",
                  "--no-plots", "--out", str(tmp_path)])
    (json_path,) = glob.glob(str(tmp_path / "*-partial.json"))
    result = json.load(open(json_path))
    assert result["complete"] is False and result["not_yet_run"] == ["ops.dml_log_prob", "sampling.steps"]
    assert [r["group"] for r in result["sections"]["ops"]["rows"]] == ["dct_pair"]
    assert "**incomplete**" in open(json_path[:-5] + ".md").read()


@pytest.mark.slow
def test_teacher_report_writes_the_learning_curve_and_the_evaluations_of_best_pt(tmp_path):
    from dvp_fast.cli import eval_main
    from dvp_fast.train_cli import main as train_main

    teacher = str(tmp_path / "teacher")
    assert train_main(["--out", teacher, "--max-steps", "3", "--batch-size", "10", "--log-every", "1",
                       "--no-progress"]) == 0
    assert eval_main(["--checkpoint", teacher, "--limit", "4", "--num-samples", "2", "--no-progress"]) == 0
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "teacher_report.py"), "--run", teacher,
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md,) = glob.glob(str(out / "teacher-*.md"))
    text = open(md).read()
    assert "3 optimisation steps" in text and "| 2 |" in text and " ± " in text, text  # K = 2, with its s.e.
    assert glob.glob(str(out / "teacher-*.png")) and len(open(md[:-3] + ".csv").read().splitlines()) == 4
