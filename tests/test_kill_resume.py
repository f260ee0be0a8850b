"""dvp-train killed with SIGKILL at random moments, then re-run: it resumes and loses nothing.

Real processes, real signals: a run is killed (at random times, and once exactly while a
checkpoint is being written), the folder is checked after every kill (last.pt loads,
metrics.csv and config.json parse), and the same command is then re-run to the end. It
must resume from the last complete checkpoint, clean up the dead writer's temporary file,
log every step exactly once and end with the losses and weights of an uninterrupted run.

The processes run dvp_fast.train_cli's own main() on a tiny model with the torch ops, with
evaluation stubbed (the run folder, not the model's quality, is under test), so the test
takes one to two minutes on two busy CPU cores.
"""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from dvp_fast.checkpoint import load_checkpoint
from helpers import TINY

STEPS = 6
ARGS = ["--max-steps", str(STEPS), "--checkpoint-every", "1", "--batch-size", "50", "--log-every", "1",
        "--eval-every", "100000", "--no-progress", "--seed", "11", "--device", "cpu"]
# The ops run on the torch fallback in every process: the C++ kernels are rebuilt whenever csrc/ changes,
# and a run compared bit for bit with another must not straddle two builds.
RUNNER = f"""
import sys
import dvp_fast.run_folder as run_folder
import dvp_fast.train as train
import dvp_fast.train_cli as train_cli
from dvp_fast.config import model_preset
from dvp_fast.ops._backend import mark_unavailable
mark_unavailable("cpp", "pinned to the torch fallback by the test")
train_cli.model_preset = lambda name, **kw: model_preset(name, **{{**{TINY!r}, **kw}})
train.evaluate = lambda model, images, batch_size, *precision: dict(val_elbo=-100.0, val_loss=1.0, active_units=0.5,
                                                                    layers=dict(kl=[1.0, 2.0], active_units=[0.5]))
run_folder.save_images = lambda *args, **kwargs: None
sys.exit(train_cli.main(sys.argv[1:]))
"""

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")]


def start(out: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, "--out", out, *ARGS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def temporaries(out: str, pid: int | None = None) -> list[str]:
    """Temporary checkpoint files in `out` (of the writer `pid` only, if given)."""
    tag = ".pt.tmp" if pid is None else f".pt.tmp{pid}"
    try:
        return [e.name for e in os.scandir(out) if e.name.endswith(tag) or (pid is None and tag in e.name)]
    except FileNotFoundError:
        return []


def inode(out: str, name: str) -> int | None:
    try:
        return os.stat(os.path.join(out, name)).st_ino
    except FileNotFoundError:
        return None


def kill(proc: subprocess.Popen) -> str:
    """SIGKILL `proc`; returns its stderr."""
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return err


def assert_readable(out: str) -> int:
    """The folder a kill leaves behind is readable; returns the step last.pt holds (0 if none yet)."""
    step = 0
    if os.path.exists(os.path.join(out, "last.pt")):
        step = load_checkpoint(os.path.join(out, "last.pt"))["step"]
        assert 1 <= step <= STEPS
    if os.path.exists(os.path.join(out, "metrics.csv")):
        with open(os.path.join(out, "metrics.csv"), newline="") as f:
            reader = csv.DictReader(f)
            list(reader)
            assert reader.fieldnames[0] == "step"
    if os.path.exists(os.path.join(out, "config.json")):
        json.load(open(os.path.join(out, "config.json")))
    return step


def logged(out: str) -> list[tuple]:
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return [(r["step"], r["loss"], r["grad_norm"], r["skipped"]) for r in csv.DictReader(f) if r["loss"]]


def run_to_end(out: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", RUNNER, "--out", out, *ARGS], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_sigkill_at_random_moments_then_resume(tmp_path):
    rng = random.Random(2024)
    # The reference: a run never killed. Its duration scales the kill times to this machine's speed.
    whole, out = str(tmp_path / "whole"), str(tmp_path / "killed")
    started = time.perf_counter()
    run_to_end(whole)
    duration = time.perf_counter() - started
    history = []

    # A kill that lands while last.pt is being written: watch for this writer's temporary file, and
    # kill at its first, second or third checkpoint.
    for _ in range(3):
        before = assert_readable(out)
        proc, writes_to_skip, seen = start(out), rng.randrange(3), set()
        while proc.poll() is None:
            fresh = {inode(out, n) for n in temporaries(out, proc.pid)} - seen - {None}
            if fresh and len(seen) >= writes_to_skip:
                break
            seen |= fresh
            time.sleep(0.0005)
        if proc.poll() is not None:
            continue  # finished before we saw the write we wanted: no kill this time
        kill(proc)
        left = temporaries(out, proc.pid)
        step = assert_readable(out)
        history.append(("mid-write", before, step, left))
        if left:  # the writer died mid-write: its temporary file is still there
            break
    assert any(kind == "mid-write" and left for kind, _, _, left in history), \
        f"no kill landed during a checkpoint write in 3 tries: {history}"
    stale = history[-1][3]

    # Kills at random moments: during start-up, a step, a metrics append or a checkpoint, whatever comes.
    stderr = []
    for _ in range(3):
        before = assert_readable(out)
        proc = start(out)
        time.sleep(rng.uniform(0.25, 0.95) * duration)
        stderr.append(kill(proc) if proc.poll() is None else proc.communicate()[1])
        history.append(("random", before, assert_readable(out), temporaries(out)))

    # The same command, left to finish, resumes from the last complete checkpoint...
    resume_step = assert_readable(out)
    done = run_to_end(out)
    if 0 < resume_step < STEPS:
        assert f"resuming {os.path.join(out, 'last.pt')} at step {resume_step} " in done.stdout
    # The first process to get past start-up removed the dead writer's file, and said so.
    assert not temporaries(out)
    removed = f"removed {os.path.join(out, stale[0])}, left by an interrupted checkpoint write"
    assert any(removed in err for err in [*stderr, done.stderr]), (removed, stderr, done.stderr)
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == STEPS
    steps = [row[0] for row in logged(out)]
    assert steps == [str(s) for s in range(1, STEPS + 1)], (steps, history)

    print("kills (kind, step before, step after, temporaries left):", history)  # shown with pytest -s

    # ... and ends exactly where the run that was never killed ended.
    assert logged(out) == logged(whole), (logged(out), logged(whole), history)
    killed, uninterrupted = (load_checkpoint(os.path.join(d, "last.pt")) for d in (out, whole))
    for part in ("model", "ema"):
        assert all(torch.equal(killed[part][k], uninterrupted[part][k]) for k in killed[part]), part
