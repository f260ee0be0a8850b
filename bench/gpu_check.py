"""One command that checks a fresh GPU machine in minutes: install, kernel tests, CUDA tests, benchmarks, a short run.

    DVP_GPU_CHECK_OUT=$OUT bash bench/gpu_check.sh            # on the GPU machine, under 8 minutes
    DVP_GPU_CHECK_OUT=/tmp/x bash bench/gpu_check.sh --dry-run  # on a CPU, at toy sizes (the test suite does)

Each stage runs as its own process group under its own time limit, so a failure or a hang costs that
stage only; the stages after it still run. The test files run one pytest each, so that one file's
failures never stop the next file. Needs no network: the project installs with
`pip install --no-build-isolation --no-deps -e .`; if that fails (an old setuptools, say), the later
stages import a copy of the installed layout (dvp_fast/ with kernels/ and csrc/ inside it) instead.
The install stage fails loudly when the Triton backend cannot run on a CUDA machine: every later
figure would then be the torch fallback's. Wheels the machine lacks are installed from
DVP_GPU_CHECK_WHEELS (a folder of .whl files, e.g. `pip download safetensors --no-deps -d
carry/wheels`) when given. The short run trains on the embedded digits (shipped inside dvp_fast);
should they not load, on DVP_GPU_CHECK_MNIST (a folder of the MNIST IDX files) or on random binary images.

The stages, their limits and the time each is expected to take are in `stages()` and `EXPECTED_S`
(how they were estimated: docs/gpu-check.md). Writes at most 11 files into $DVP_GPU_CHECK_OUT:

    summary.json  every stage: commands, exit codes, seconds, limit, whether it timed out
    summary.md    the plan (every stage's commands and limit), the results, the environment, and
                  the tail of each failed stage's log
    install.log  kernel-tests.log  cuda-tests.log  bench.log  train.log  compile-tests.log   each stage's output
    bench.json   bench/run.py's results, as far as it got (it writes after every group)
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
SUMMARY_RESERVE_S = 15  # the summary is written after the last stage, inside the total

# Kernel tests first (each file on its own), the slow compile and capture tests after them.
KERNEL_TEST_FILES = ("tests/test_dml.py", "tests/test_gaussian_kl.py", "tests/test_dct.py", "tests/test_sampling.py")
CUDA_TEST_FILE = "tests/test_cuda.py"
COMPILE_TESTS = "compiled_and_graphed"  # test_cuda's torch.compile tests: a cold inductor cache, the slowest
# The first GPU run's benchmark selection, in the order the performance goals need it: the fused ops
# against their fallback at the presets' training shapes, the training step (fast path against eager
# fp32, images/s and peak memory), then 1000 samples of 50 steps (eager against the CUDA graph).
# No torch.compile variants: a cold inductor compile of each would not fit.
FIRST_RUN_BENCH = ("--only ops.dml_log_prob ops.gaussian_sample_kl ops.gaussian_sample_kl_grouped ops.dct_pair "
                   "model.train sampling.sample1000 --presets cifar10 mnist --paper-batch --no-compile "
                   "--case-budget 5")

# Limits of the real run, in seconds, and what each stage is expected to take on an H100, from counts of
# what it runs and this project's CPU figures (docs/gpu-check.md shows the arithmetic). The compile tests
# come last and get the time the other stages left (at least REST_MIN_S): they are the least certain.
LIMITS_S = dict(install=45, kernel_tests=105, cuda_tests=75, bench=135, train=65, compile_tests=None)
EXPECTED_S = dict(install=32, kernel_tests=78, cuda_tests=52, bench=100, train=42, compile_tests=80)
REST_MIN_S = 40
DRY_LIMITS_S = dict(install=60, kernel_tests=60, cuda_tests=90, bench=90, train=120, compile_tests=None)


def stages(dry: bool, work: str, wheels: str | None) -> list[dict]:
    """The stages in order: name, limit in seconds, the shell commands, and whether a failed command
    stops the stage (keep_going: the test files each report, whatever the ones before did)."""
    py = sys.executable
    cli = f"{py} -m dvp_fast"  # needs no console scripts on PATH
    run = os.path.join(work, "run")
    probe = f"{py} bench/gpu_check.py --probe"
    if dry:  # never touch the CPU machine's environment: only check that the project imports
        install = [probe]
        kernel_tests = [f"{py} -m pytest -q -p no:cacheprovider --maxfail=10 tests/test_dml.py "
                        f"-k 'zero_temperature and not triton'"]
        cuda_tests = [f"DVP_FAST_CUDA_TESTS_ON_CPU=1 {py} -m pytest -q -p no:cacheprovider --maxfail=10 "
                      f"{CUDA_TEST_FILE} -k 'device_batches or no_host_synchronisation or graph_sampler_for'"]
        compile_tests = [f"DVP_FAST_CUDA_TESTS_ON_CPU=1 {py} -m pytest -q -p no:cacheprovider --maxfail=10 "
                         f"{CUDA_TEST_FILE} -k '{COMPILE_TESTS}'"]  # skipped on a CPU: checks the selection
        bench = (f"{py} bench/run.py --device cpu --quick --only ops.dct_pair --presets mnist --no-compile "
                 f"--no-plots --out {work}/bench")
        train = [f"{cli} train --preset mnist {_random_binary_data(work, 300)} --out {run} --max-steps 2 --batch-size 10 "
                 f"--device cpu --no-progress",
                 f"{cli} sample --checkpoint {run} --n 4 --steps 2 --out {work}/samples.png --device cpu --no-progress",
                 f"{cli} eval --checkpoint {run} --limit 2 --num-samples 4 --device cpu --no-progress"]
    else:
        install = [f"{py} -c \"import setuptools; print('setuptools', setuptools.__version__)\"",
                   f"{py} -m pip install --no-build-isolation --no-deps -e . || "
                   f"{py} bench/gpu_check.py --source-layout {_layout(work)}"]
        if wheels:
            install.append(f"{py} -m pip install --no-index --no-deps {wheels}/*.whl")
        install.append(probe)
        # test_sampling's torch.compile test runs its sampler on the CPU (CI has it): not here.
        kernel_tests = [f"{py} -m pytest -q -p no:cacheprovider --maxfail=10 --durations=5 {f}"
                        + (" -k 'not compiled_and_eager'" if f.endswith("test_sampling.py") else "")
                        for f in KERNEL_TEST_FILES]
        cuda_tests = [f"{py} -m pytest -q -p no:cacheprovider --maxfail=10 --durations=10 {CUDA_TEST_FILE} "
                      f"-k 'not {COMPILE_TESTS}'"]
        compile_tests = [f"{py} -m pytest -q -p no:cacheprovider --maxfail=10 --durations=10 {CUDA_TEST_FILE} "
                         f"-k '{COMPILE_TESTS}'"]
        bench = f"{py} bench/run.py --device cuda {FIRST_RUN_BENCH} --no-plots --out {work}/bench"
        train = [Deferred(f"{cli} train --preset mnist --data (embedded, or DVP_GPU_CHECK_MNIST's, or random) "
                          f"--out {run} --max-steps 200 --eval-every 100 --device cuda --no-progress",
                          lambda: f"{cli} train --preset mnist {_train_data(work)} --out {run} --max-steps 200 "
                                  f"--eval-every 100 --device cuda --no-progress"),
                 f"{cli} sample --checkpoint {run} --n 64 --out {work}/samples.png --device cuda --no-progress",
                 f"{cli} eval --checkpoint {run} --limit 100 --num-samples 1000 --device cuda --no-progress"]
    limits = DRY_LIMITS_S if dry else LIMITS_S
    return [dict(name="install", commands=install, limit=limits["install"]),
            dict(name="kernel-tests", commands=kernel_tests, limit=limits["kernel_tests"], keep_going=True),
            dict(name="cuda-tests", commands=cuda_tests, limit=limits["cuda_tests"]),
            dict(name="bench", commands=[bench], limit=limits["bench"]),
            dict(name="train", commands=train, limit=limits["train"]),
            dict(name="compile-tests", commands=compile_tests, limit=limits["compile_tests"])]


class Deferred:
    """A command made when its stage starts (it depends on what the stages before it installed)."""

    def __init__(self, shown: str, make):
        self.shown, self.make = shown, make

    def __str__(self) -> str:
        return self.shown


def _layout(work: str) -> str:
    return os.path.join(work, "src")


def make_source_layout(dest: str) -> None:
    """The installed package's layout from this checkout, without pip: dvp_fast/ with kernels/ and
    csrc/ copied inside it (setup.py's package_dir), for PYTHONPATH."""
    package = os.path.join(dest, "dvp_fast")
    shutil.rmtree(dest, ignore_errors=True)
    # (kernels and csrc inside a checkout's dvp_fast/ would be links to the folders copied next)
    shutil.copytree(os.path.join(ROOT, "dvp_fast"), package,
                    ignore=shutil.ignore_patterns("__pycache__", "kernels", "csrc"))
    for sub in ("kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, sub), os.path.join(package, sub), ignore=shutil.ignore_patterns("__pycache__"))
    print(f"gpu_check: the editable install failed; later stages import the copy in {dest}", flush=True)


def probe() -> int:
    """Versions and backends; exit 3 when a CUDA device is present but the Triton backend cannot run."""
    import numpy
    import torch

    from dvp_fast import __file__ as package_file, ops
    from dvp_fast.ops._backend import availability

    print(f"dvp_fast from {os.path.dirname(package_file)}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"numpy {numpy.__version__}; CUDA device: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}", flush=True)
    for backend in ("triton", "cpp"):
        ok, why = availability(backend)
        print(f"backend {backend}: {'available' if ok else 'NOT available: ' + why}", flush=True)
    if torch.cuda.is_available() and not ops.backend_available("triton"):
        print("gpu_check: error: CUDA is here but the Triton backend is not: every later stage would run the torch "
              "fallback", file=sys.stderr, flush=True)
        return 3
    return 0


def _random_binary_data(work: str, count: int = 6000) -> str:
    """--data for a throughput-only run: `count` random binary 28x28 images as an .npy file."""
    import numpy as np

    path = os.path.join(work, "random-binary.npy")
    np.save(path, (np.random.default_rng(0).random((count, 28, 28)) < 0.15).astype(np.uint8) * 255)
    return f"--data npy:{path}"


def _train_data(work: str) -> str:
    """--data for the short run: the embedded digits if they load (they ship inside dvp_fast), else
    MNIST from DVP_GPU_CHECK_MNIST, else random binary images (throughput only)."""
    found = subprocess.run([sys.executable, "-c", "import dvp_fast.data as d; d.load_images('embedded')"],
                           capture_output=True, env=_env(work))
    if found.returncode == 0:
        return "--data embedded"
    if os.environ.get("DVP_GPU_CHECK_MNIST"):
        return f"--data mnist --data-dir {os.environ['DVP_GPU_CHECK_MNIST']}"
    return _random_binary_data(work)


def run_stage(stage: dict, out: str, deadline: float, work: str | None = None) -> dict:
    """Run a stage's commands in order under its limit; a failed command ends the stage unless it keeps going."""
    left = deadline - time.monotonic()  # a stage without a limit of its own gets the rest
    limit = max(1.0, left if stage["limit"] is None else min(stage["limit"], left))
    log_path = os.path.join(out, f"{stage['name']}.log")
    started = time.monotonic()
    result = dict(name=stage["name"], commands=[], limit_s=round(limit), rc=None, exit_codes=[], timed_out=False)
    with open(log_path, "w") as log:
        for command in stage["commands"]:
            command = command.make() if isinstance(command, Deferred) else command
            result["commands"].append(command)
            left = limit - (time.monotonic() - started)
            log.write(f"$ {command}\n")
            log.flush()
            proc = subprocess.Popen(command, shell=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=_env(work))
            try:
                rc = proc.wait(timeout=max(1.0, left))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the whole process group: pytest workers, compilers
                proc.wait()
                rc = 124
                result["timed_out"] = True
                log.write(f"\n[gpu_check] stopped after {limit:.0f} s (the stage's limit)\n")
            result["exit_codes"].append(rc)
            if result["rc"] in (None, 0):
                result["rc"] = rc  # the stage's exit code: its first failure's
            if result["timed_out"] or (rc != 0 and not stage.get("keep_going")):
                break
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _env(work: str | None) -> dict:
    """This environment; where the editable install failed, the copy of the installed layout goes first
    on PYTHONPATH (the checkout itself cannot serve: dvp_fast.kernels exists only once installed)."""
    env = dict(os.environ)
    layout = _layout(work) if work else None
    if layout and os.path.isdir(layout):
        env["PYTHONPATH"] = layout + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def environment() -> dict:
    probe_code = ("import json, platform, torch; import numpy; "
                  "t = __import__('importlib').util.find_spec('triton'); "
                  "tv = __import__('triton').__version__ if t else None; "
                  "d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'; "
                  "print(json.dumps(dict(device=d, torch=torch.__version__, cuda=torch.version.cuda, triton=tv, "
                  "numpy=numpy.__version__, python=platform.python_version())))")
    env = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    try:
        env.update(json.loads(subprocess.run([sys.executable, "-c", probe_code], capture_output=True, text=True,
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


def plan_lines(plan: list[dict], dry: bool) -> list[str]:
    """The plan as a markdown list: each stage's limit, expected time and commands."""
    lines = []
    for stage in plan:
        key = stage["name"].replace("-", "_")
        expected = "" if dry else f", expected about {EXPECTED_S[key]} s"
        going = " (each command runs whatever the one before returned)" if stage.get("keep_going") else ""
        limit = f"limit {stage['limit']} s" if stage["limit"] else "limit: the time the stages before it left"
        lines += [f"- **{stage['name']}**: {limit}{expected}{going}"]
        lines += [f"  - `{command}`" for command in stage["commands"]]
    return lines


def write_summary(out: str, env: dict, plan: list[dict], results: list[dict], bench_md: str, dry: bool,
                  seconds: float) -> None:
    summary = dict(dry_run=dry, seconds=round(seconds, 1), environment=env, stages=results,
                   planned=[dict(name=s["name"], limit_s=s["limit"]) for s in plan],
                   ok=len(results) == len(plan) and all(r["rc"] == 0 for r in results))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = [f"# dvp_fast GPU check{' (dry run on a CPU)' if dry else ''}", "",
             f"{env.get('date')}; {env.get('device')}; torch {env.get('torch')} (CUDA {env.get('cuda')}), "
             f"triton {env.get('triton')}, numpy {env.get('numpy')}, python {env.get('python')}; "
             f"commit {env.get('commit')}; {seconds:.0f} s in all.", ""]
    install = next((r for r in results if r["name"] == "install"), None)
    if install and install["rc"] == 3:
        lines += ["**The Triton backend is not available on this CUDA machine: the figures below are the torch "
                  "fallback's.** See install.log.", ""]
    lines += ["| stage | exit code | seconds | limit | timed out |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['rc']} | {r['seconds']} | {r['limit_s']} | {r['timed_out']} |" for r in results]
    lines += ["", "## The plan", "", f"Total limit {TOTAL_LIMIT_S} s; the stages' own limits add up to "
              f"{sum(s['limit'] or 0 for s in plan)} s.", "", *plan_lines(plan, dry), ""]
    for r in results:
        if r["rc"] != 0:
            lines += [f"## {r['name']}: the end of {r['name']}.log", "", "```text",
                      _tail(os.path.join(out, f"{r['name']}.log")).rstrip(), "```", ""]
    if bench_md:
        lines += ["## bench/run.py", "", bench_md]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check dvp_fast on a fresh GPU machine in under 8 minutes.")
    p.add_argument("--dry-run", action="store_true", help="on a CPU, at toy sizes, without installing anything")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the install stage's last command
    p.add_argument("--source-layout", metavar="DIR", help=argparse.SUPPRESS)  # its fallback for a failed install
    args = p.parse_args(argv)
    if args.probe:
        return probe()
    if args.source_layout:
        make_source_layout(args.source_layout)
        return 0
    out = os.environ.get("DVP_GPU_CHECK_OUT")
    if not out:
        print("gpu_check: error: set DVP_GPU_CHECK_OUT to the folder for the results", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    started = time.monotonic()
    deadline = started + TOTAL_LIMIT_S - SUMMARY_RESERVE_S
    env = environment()
    results = []
    with tempfile.TemporaryDirectory(prefix="dvp-gpu-check-") as work:
        plan = stages(args.dry_run, work, os.environ.get("DVP_GPU_CHECK_WHEELS"))
        for line in plan_lines(plan, args.dry_run):
            print(f"gpu_check: plan: {line.strip()}", flush=True)
        for stage in plan:
            result = run_stage(stage, out, deadline, work)
            results.append(result)
            print(f"gpu_check: {result['name']}: exit {result['rc']} in {result['seconds']} s"
                  f"{' (timed out)' if result['timed_out'] else ''}", flush=True)
        if os.path.exists(os.path.join(work, "samples.png")):
            shutil.copyfile(os.path.join(work, "samples.png"), os.path.join(out, "samples.png"))
        bench_md = collect_bench(work, out)
    write_summary(out, env, plan, results, bench_md, args.dry_run, time.monotonic() - started)
    ok = all(r["rc"] == 0 for r in results)
    print(f"gpu_check: {'all stages passed' if ok else 'some stages failed'}; see {out}/summary.md", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
