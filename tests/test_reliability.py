"""Bad input, bad files, bad command lines, full disks: every public entry point refuses clearly.

Each error must name what was expected and what came; the command-line tools print it as
one line on stderr with a non-zero exit code, and show the traceback only with --debug.
Training runs here use a small MNIST-shaped model and a stubbed evaluation, to stay fast.
"""
import csv
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import dvp_fast.run_folder as run_folder
import dvp_fast.train as loop
import dvp_fast.train_cli as train
from dvp_fast import DVPVAE, ops
from dvp_fast.checkpoint import (FORMAT_VERSION, CheckpointError, load_checkpoint, remove_stale_temporaries,
                                 save_checkpoint)
from dvp_fast.cli import eval_main, sample_main
from dvp_fast.config import model_preset, train_preset
from dvp_fast.ops.dct import dct_scale_bound
from helpers import SMALL

BACKENDS = [b for b in ("torch", "triton", "cpp") if ops.backend_available(b)]
FAST = ["--batch-size", "50", "--log-every", "1", "--no-progress", "--seed", "3", "--eval-every", "1000"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DVPVAE.from_preset("mnist", **SMALL).eval()


@pytest.fixture
def small_runs(monkeypatch):
    """dvp-train on the small model, with a stub evaluation (the files are what is under test)."""
    real = model_preset
    monkeypatch.setattr(train, "model_preset", lambda name, **kw: real(name, **{**SMALL, **kw}))
    monkeypatch.setattr(loop, "evaluate", lambda m, images, bs, *precision: dict(
        val_elbo=-100.0, val_loss=1.0, active_units=0.5, layers=dict(kl=[1.0, 2.0], active_units=[0.5])))
    monkeypatch.setattr(run_folder, "save_images", lambda *a, **k: None)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def metrics(folder):
    with open(os.path.join(folder, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


# --- model calls ----------------------------------------------------------------------------------------------------
X = lambda: torch.rand(2, 1, 28, 28) * 2 - 1  # noqa: E731
MODEL_CASES = {
    "forward float64": (lambda m: m(X().double()), TypeError, r"float64 but the model's weights are torch.float32"),
    "forward target shape": (lambda m: m(X(), target=torch.zeros(1, 1, 28, 28)), ValueError,
                             r"target must match x: shape \(2, 1, 28, 28\).*got shape \(1, 1, 28, 28\)"),
    "forward target NaN": (lambda m: m(X(), target=torch.full((2, 1, 28, 28), float("nan"))), ValueError,
                           r"target must lie in \[0, 1\].*nan"),
    "forward empty batch": (lambda m: m(X()[:0]), ValueError, r"\(B, 1, 28, 28\).*got \(0, 1, 28, 28\)"),
    "nll float samples": (lambda m: m.nll(X(), num_samples=2.5), ValueError,
                          "num_samples must be a positive integer, got 2.5"),
    "nll wrong shape": (lambda m: m.nll(torch.zeros(2, 1, 27, 27)), ValueError, r"got \(2, 1, 27, 27\)"),
    "sample float n": (lambda m: m.sample(2.5), ValueError, "n must be a positive integer, got 2.5"),
    "sample NaN temperature": (lambda m: m.sample(2, temperature=float("nan")), ValueError,
                               "temperature must be a finite number >= 0, got nan"),
    "sample zero steps": (lambda m: m.sample(2, steps=0), ValueError, "steps must be a positive integer, got 0"),
    "decode NaN u": (lambda m: m.decode(torch.full((2, 1, 7, 7), float("nan"))), ValueError, "u contains NaN"),
    "decode wrong u": (lambda m: m.decode(torch.zeros(2, 1, 5, 5)), ValueError,
                       r"u must have shape \(B, 1, 7, 7\), got \(2, 1, 5, 5\)"),
    "decode inf temperature": (lambda m: m.decode(torch.zeros(2, 1, 7, 7), temperature=float("inf")), ValueError,
                               "temperature must be a finite number"),
    "encode out of range": (lambda m: m.encode(X() * 3 + 3), ValueError, r"must lie in \[-1, 1\]"),
    "encode on another device": (lambda m: m.encode(X().to("meta")), ValueError,
                                 "x is on meta but the model is on cpu"),
    "active_units batch_size 0": (lambda m: m.active_units(X(), batch_size=0), ValueError,
                                  "batch_size must be a positive integer, got 0"),
    "active_units uint8": (lambda m: m.active_units(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)), TypeError,
                           "floating-point.*uint8"),
    "fit scale NaN": (lambda m: m.fit_pseudoinput_scale(torch.full((3, 1, 28, 28), float("nan"))), ValueError,
                      "NaN or infinite"),
    "fit scale 0..255 floats": (lambda m: m.fit_pseudoinput_scale(torch.full((3, 1, 28, 28), 200.0)), ValueError,
                                r"must lie in \[-1, 1\], got values in \[200, 200\]"),
    "fit scale int64": (lambda m: m.fit_pseudoinput_scale(torch.zeros(3, 1, 28, 28, dtype=torch.long)), TypeError,
                        "uint8 .* or floating-point .* got dtype torch.int64"),
    "fit scale numpy": (lambda m: m.fit_pseudoinput_scale(np.zeros((3, 1, 28, 28), np.uint8)), TypeError,
                        "torch.Tensor .* got ndarray"),
    "fit scale wrong shape": (lambda m: m.fit_pseudoinput_scale(torch.zeros(3, 3, 28, 28, dtype=torch.uint8)),
                              ValueError, r"\(N, 1, 28, 28\), got shape \(3, 3, 28, 28\)"),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_calls_reject_bad_input(model, case):
    call, error, match = MODEL_CASES[case]
    with pytest.raises(error, match=match):
        call(model)


def test_bad_configs_name_the_field():
    for overrides, match in [(dict(diffusion_groups=0), "diffusion_groups must be a positive integer, got 0"),
                             (dict(min_logvar=2.0), r"min_logvar \(2.0\) must be <= max_logvar \(1.0\)"),
                             (dict(latent_scales=(1, 1, 1)), "cannot be halved 3 times")]:
        with pytest.raises(ValueError, match=match):
            model_preset("mnist", **overrides)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan"):
        train_preset("mnist", lr=float("nan"))
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields: \['lrr'\]"):
        train_preset("mnist", lrr=1.0)


# --- ops: shapes, dtypes, devices, integer arguments (values are the model's job) -----------------------------------
S = dct_scale_bound(1, 7, 28)
M = torch.zeros(4, 3, 5, 5)
P = torch.zeros(2, 100, 4, 4)
XD = torch.zeros(2, 3, 4, 4)
OP_CASES = {
    "dct_crop 3-D x": (lambda b: ops.dct_crop(torch.zeros(1, 28, 28), S, backend=b), ValueError,
                       r"x must have shape \(B, C, D, D\), got shape \(1, 28, 28\)"),
    "dct_crop int x": (lambda b: ops.dct_crop(torch.zeros(2, 1, 28, 28, dtype=torch.long), S, backend=b), TypeError,
                       "x must be a floating-point tensor .* got torch.int64"),
    "dct_crop channels": (lambda b: ops.dct_crop(torch.zeros(2, 3, 28, 28), S, backend=b), ValueError,
                          r"scale must be \(C, d, d\) with C = 3, got shape \(1, 7, 7\)"),
    "dct_crop device": (lambda b: ops.dct_crop(torch.zeros(2, 1, 28, 28), S.to("meta"), backend=b), ValueError,
                        "one device, got x on cpu, scale on meta"),
    "idct_pad float size": (lambda b: ops.idct_pad(torch.zeros(2, 1, 7, 7), S, 28.5, backend=b), ValueError,
                            "size must be an integer >= 7, got 28.5"),
    "idct_pad small size": (lambda b: ops.idct_pad(torch.zeros(2, 1, 7, 7), S, 5, backend=b), ValueError,
                            "size must be an integer >= 7, got 5"),
    "idct_pad scale": (lambda b: ops.idct_pad(torch.zeros(2, 1, 5, 5), S, 28, backend=b), ValueError,
                       r"scale must be \(C, d, d\) = \(1, 5, 5\), got \(1, 7, 7\)"),
    "kl shapes": (lambda b: ops.gaussian_sample_kl(M, M[:2], M, M, backend=b), ValueError,
                  r"share one shape, got mu_q \(4, 3, 5, 5\), logvar_q \(2, 3, 5, 5\)"),
    "kl dtype": (lambda b: ops.gaussian_sample_kl(M, M.int(), M, M, backend=b), TypeError,
                 "logvar_q must be a floating-point tensor .* got torch.int32"),
    "kl device": (lambda b: ops.gaussian_sample_kl(M, M, M.to("meta"), M, backend=b), ValueError,
                  "mu_p on meta"),
    "kl empty batch": (lambda b: ops.gaussian_sample_kl(M[:0], M[:0], M[:0], M[:0], backend=b), ValueError,
                       r"at least one element .* got shape \(0, 3, 5, 5\)"),
    "kl grouped batches": (lambda b: ops.gaussian_sample_kl_grouped([(M,) * 4, (M[:2],) * 4], backend=b),
                           ValueError, r"layer 0's batch size and device \(4 on cpu\), layer 1 has 2 on cpu"),
    "dml channels": (lambda b: ops.dml_log_prob(XD, P[:, :90], backend=b), ValueError,
                     r"params must be \(B, 100, H, W\) for num_mix=10 .* got shape \(2, 90, 4, 4\)"),
    "dml float num_mix": (lambda b: ops.dml_log_prob(XD, P, 10.0, backend=b), ValueError,
                          "num_mix must be an integer >= 1, got 10.0"),
    "dml grey x": (lambda b: ops.dml_log_prob(XD[:, :1], P, backend=b), ValueError,
                   r"x must be \(B, 3, H, W\), got shape \(2, 1, 4, 4\)"),
    "dml device": (lambda b: ops.dml_log_prob(XD, P.to("meta"), backend=b), ValueError, "params on meta"),
    "dml_sample temperature": (lambda b: ops.dml_sample(P, float("nan"), backend=b), ValueError,
                               "temperature must be >= 0, got nan"),
    "unknown backend": (lambda b: ops.dct_crop(torch.zeros(2, 1, 28, 28), S, backend="cuda"), ValueError,
                        r"backend must be one of \('auto', 'triton', 'cpp', 'torch'\), got 'cuda'"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OP_CASES)
def test_ops_reject_bad_input_on_every_backend(case, backend):
    call, error, match = OP_CASES[case]
    with pytest.raises(error, match=match):
        call(backend)


def test_ops_do_not_check_values():
    """NaN goes through an op untouched (no host sync): catching it is the model's and trainer's job."""
    y = ops.dct_crop(torch.full((1, 1, 28, 28), float("nan")), S, backend="torch")
    assert torch.isnan(y).all()


# --- checkpoint files -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory, model):
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pt")
    save_checkpoint(dict(model_config=model.config.to_dict(), model=model.state_dict()), path)
    return path


def test_truncated_checkpoints_are_refused_naming_the_file(checkpoint_file, tmp_path):
    raw = open(checkpoint_file, "rb").read()
    bad = tmp_path / "bad.pt"
    for length in (0, 10, len(raw) // 3, len(raw) // 2, len(raw) - 30, len(raw) - 1):
        bad.write_bytes(raw[:length])
        with pytest.raises(CheckpointError, match="bad.pt: not a readable checkpoint"):
            load_checkpoint(str(bad))
        with pytest.raises(CheckpointError, match="bad.pt"):
            DVPVAE.from_checkpoint(str(bad))


def test_a_flipped_bit_is_caught_by_the_checksums(checkpoint_file, tmp_path):
    """torch.load itself never verifies the zip CRCs: a flip in the weights would load as other numbers."""
    raw = open(checkpoint_file, "rb").read()
    reference = load_checkpoint(checkpoint_file)["model"]
    with zipfile.ZipFile(checkpoint_file) as archive:
        data = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64]
    rng = random.Random(0)
    bad = tmp_path / "flipped.pt"
    for _ in range(12):  # positions inside tensor payloads: always detected
        info = rng.choice(data)
        pos = info.header_offset + 30 + len(info.filename) + len(info.extra) + rng.randrange(info.file_size)
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="flipped.pt: corrupt checkpoint: checksum mismatch"):
            load_checkpoint(str(bad))
    for _ in range(12):  # anywhere: refused, or loaded with identical weights
        flipped = bytearray(raw)
        flipped[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(flipped))
        try:
            loaded = load_checkpoint(str(bad))["model"]
        except CheckpointError:
            continue
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_foreign_and_newer_checkpoints_are_refused(checkpoint_file, tmp_path):
    tensor_only = str(tmp_path / "tensor.pt")
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="not a dvp_fast checkpoint .* got a Tensor"):
        load_checkpoint(tensor_only)
    payload = load_checkpoint(checkpoint_file)
    newer = str(tmp_path / "newer.pt")
    torch.save({**payload, "format_version": FORMAT_VERSION + 1}, newer)
    with pytest.raises(CheckpointError, match=f"format {FORMAT_VERSION + 1} is newer .* upgrade dvp_fast"):
        DVPVAE.from_checkpoint(newer)
    no_weights = str(tmp_path / "no_weights.pt")
    torch.save({k: v for k, v in payload.items() if k != "model"}, no_weights)
    with pytest.raises(CheckpointError, match="holds no model weights"):
        DVPVAE.from_checkpoint(no_weights)
    bad_config = str(tmp_path / "bad_config.pt")
    torch.save({**payload, "model_config": {**payload["model_config"], "num_chanels": 3}}, bad_config)
    with pytest.raises(CheckpointError, match=r"bad_config.pt: its model_config .* \['num_chanels'\]"):
        DVPVAE.from_checkpoint(bad_config)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def _resumable(preset: str, **changes) -> dict:
    """A payload with every key a resume reads, for tests that stop before the weights load."""
    return dict(model_config=model_preset(preset, **SMALL).to_dict(), train_config=train_preset(preset).to_dict(),
                run=dict(data="embedded"), model={}, trainer={}, step=1, epoch=0, batch_index=1, rng={}, **changes)


@pytest.mark.parametrize("write,message", [
    (lambda p: save_checkpoint(_resumable("omniglot"), p), "holds a run of preset 'omniglot' with another "
                                                             "configuration; choose a new --out"),
    (lambda p: torch.save({**_resumable("mnist"), "format_version": FORMAT_VERSION + 1}, p),
     f"cannot resume: .*last.pt: checkpoint format {FORMAT_VERSION + 1} is newer .* move .*last.pt away to start "
     f"this run afresh"),
    (lambda p: save_checkpoint({k: v for k, v in _resumable("mnist").items() if k not in ("trainer", "rng")}, p),
     "cannot resume: .*last.pt: not a training checkpoint that can be resumed: missing trainer, rng"),
    (lambda p: open(p, "wb").write(b"PK\x03\x04 half a file"), "cannot resume: .*last.pt: not a readable checkpoint"),
])
def test_resume_refuses_a_foreign_or_damaged_last_pt(small_runs, tmp_path, capsys, write, message):
    out = str(tmp_path / "run")
    os.makedirs(out)
    write(os.path.join(out, "last.pt"))
    assert train.main(["--out", out, "--max-steps", "2", *FAST]) == 2
    err = one_error_line(capsys)
    assert err.startswith("dvp-train: error: ")
    assert re.search(message, err), err
    with pytest.raises((CheckpointError, ValueError)):  # --debug: the exception itself, traceback and all
        train.main(["--out", out, "--max-steps", "2", "--debug", *FAST])


# --- command lines --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("main,argv,message", [
    (train.main, ["--preset", "svhn"], "dvp-train: error: argument --preset: invalid choice: 'svhn'"),
    (train.main, ["--max-steps", "0"], "dvp-train: error: --max-steps must be >= 1, got 0"),
    (train.main, ["--max-steps", "3", "--epochs", "2"], "not allowed with argument"),
    (sample_main, ["--checkpoint", "x", "--out", "y.png", "--n", "-3"], "argument --n: must be > 0, got -3"),
    (sample_main, ["--checkpoint", "x", "--out", "y.png", "--temperature", "nan"], "finite number >= 0, got nan"),
    (eval_main, ["--checkpoint", "x", "--split", "dev"], "argument --split: invalid choice: 'dev'"),
])
def test_bad_command_lines_are_one_line(capsys, main, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = one_error_line(capsys)
    assert message in err and err.endswith("--help)")


@pytest.mark.parametrize("argv,message", [
    (["--data", "mnist", "--data-dir", "EMPTY"], "mnist: missing train-images-idx3-ubyte[.gz] and "
                                                 "train-labels-idx1-ubyte[.gz] in EMPTY"),
    (["--data", "omniglot", "--data-dir", "EMPTY"], "omniglot: missing EMPTY/chardata.mat"),
    (["--data", "mnist", "--data-dir", "GARBAGE"], "bad IDX magic number"),
    (["--batch-size", "100000"], "batch_size 100000 exceeds the 4000 images of the dataset"),
])
def test_missing_or_corrupt_data_is_one_line(small_runs, tmp_path, capsys, argv, message):
    empty, garbage = tmp_path / "empty", tmp_path / "garbage"
    empty.mkdir()
    garbage.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (garbage / name).write_bytes(b"\x00\x00\x08\x04 not an IDX file at all")
    argv = [a.replace("EMPTY", str(empty)).replace("GARBAGE", str(garbage)) for a in argv]
    assert train.main(["--out", str(tmp_path / "run"), "--max-steps", "1", *FAST, *argv]) == 2
    err = one_error_line(capsys)
    assert message.replace("EMPTY", str(empty)) in err
    if "missing" in message:
        assert "--download on the command line" in err


def test_sample_and_eval_errors_are_one_line_and_debug_raises(tmp_path, capsys, checkpoint_file):
    png = str(tmp_path / "grid.png")
    assert sample_main(["--checkpoint", str(tmp_path / "none"), "--out", png]) == 2
    assert "checkpoint not found" in one_error_line(capsys)
    with pytest.raises(FileNotFoundError):
        sample_main(["--checkpoint", str(tmp_path / "none"), "--out", png, "--debug"])
    assert eval_main(["--checkpoint", checkpoint_file]) == 2  # the file does not record its dataset
    assert "does not record its dataset: pass --data" in one_error_line(capsys)


def test_an_unexpected_error_is_one_line_labelled_internal(small_runs, monkeypatch, tmp_path, capsys):
    def boom(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(train, "_load_data", boom)
    assert train.main(["--out", str(tmp_path / "run"), "--max-steps", "1", *FAST]) == 1
    err = one_error_line(capsys)
    assert "internal error: KeyError: 'boom' (re-run with --debug for the traceback)" in err
    with pytest.raises(KeyError):
        train.main(["--out", str(tmp_path / "run"), "--max-steps", "1", "--debug", *FAST])


@pytest.mark.slow
def test_real_process_prints_one_line_and_traceback_only_with_debug(tmp_path):
    """The installed entry point as a user meets it: exit code, stderr, --debug."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = [sys.executable, "-m", "dvp_fast.train", "--out", str(blocker / "run"), "--max-steps", "1"]
    quiet = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().count("\n") == 0, quiet.stderr
    assert f"dvp-train: error: cannot write to the run folder {blocker / 'run'}: Not a directory" in quiet.stderr
    loud = subprocess.run(argv + ["--debug"], capture_output=True, text=True, timeout=300)
    assert loud.returncode != 0 and "Traceback (most recent call last)" in loud.stderr


# --- disks and folders ----------------------------------------------------------------------------------------------
def test_unwritable_out_is_refused_before_training(small_runs, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train, "_load_data", lambda *a: pytest.fail("training started"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert train.main(["--out", str(blocker / "run"), "--max-steps", "1", *FAST]) == 2
    assert "cannot write to the run folder" in one_error_line(capsys)


@pytest.mark.skipif(IS_ROOT, reason="root writes into a read-only folder anyway; the path-under-a-file case "
                                    "above covers the refusal")
def test_read_only_out_is_refused_before_training(small_runs, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train, "_load_data", lambda *a: pytest.fail("training started"))
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert train.main(["--out", str(out), "--max-steps", "1", *FAST]) == 2
        assert "cannot write to the run folder" in one_error_line(capsys)
    finally:
        out.chmod(0o700)


def test_a_nearly_full_disk_is_refused_before_training(small_runs, monkeypatch, tmp_path, capsys):
    usage = shutil.disk_usage(tmp_path)._replace(free=1 << 18)
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: usage)
    out = str(tmp_path / "run")
    assert train.main(["--out", out, "--max-steps", "1", *FAST]) == 2
    err = one_error_line(capsys)
    assert "only 0.2 MiB free on the disk of" in err and "MiB for its checkpoints" in err
    assert not os.path.exists(os.path.join(out, "metrics.csv"))


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(small_runs, monkeypatch, tmp_path, capsys):
    out = tmp_path / "runs" / "x"  # neither runs/ nor runs/x exists yet
    assert train.main(["--preset", "cifar10", "--out", str(out), "--max-steps", "1", *FAST]) == 2
    assert "expects RGB images of shape (3, 32, 32)" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()

    calls = []
    real_step = train.Trainer.step

    def step_then_fail(self, x, fail_at):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("boom")
        return real_step(self, x)

    # config.json, metrics.csv (a header only) and .lock are written by then: all removed
    monkeypatch.setattr(train.Trainer, "step", lambda self, x: step_then_fail(self, x, 1))
    assert train.main(["--out", str(out), "--max-steps", "3", *FAST]) == 2
    assert "boom" in one_error_line(capsys) and calls and not (tmp_path / "runs").exists()

    mine = tmp_path / "mine"  # a folder that existed before the run: nothing of it is deleted
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    calls.clear()
    assert train.main(["--out", str(mine), "--max-steps", "3", *FAST]) == 2
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "config.json").exists()

    calls.clear()  # after a checkpoint everything stays
    monkeypatch.setattr(train.Trainer, "step", lambda self, x: step_then_fail(self, x, 2))
    assert train.main(["--out", str(out), "--max-steps", "3", "--checkpoint-every", "1", *FAST]) == 2
    assert {"last.pt", "config.json", "metrics.csv"} <= set(os.listdir(out))
    capsys.readouterr()


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ kernels are not available here")
def test_the_cpp_kernels_are_loaded_before_the_progress_bar(small_runs, monkeypatch, tmp_path, capsys):
    """Their first build prints its lines before training starts, not onto step 1's progress bar."""
    import tqdm

    from dvp_fast.ops import _backend

    monkeypatch.setenv("DVP_FAST_CACHE", str(tmp_path / "cache"))
    argv = ["--max-steps", "1", *[a for a in FAST if a != "--no-progress"]]
    assert train.main(["--out", str(tmp_path / "warm-up"), *argv]) == 0  # the normaliser S is cached now
    events, real_availability, real_tqdm = [], _backend.availability, tqdm.tqdm

    class Progress(real_tqdm):
        def __init__(self, *args, **kwargs):
            events.append("progress bar")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(_backend, "availability",
                        lambda backend: (events.append(backend), real_availability(backend))[1])
    monkeypatch.setattr(tqdm, "tqdm", Progress)
    assert train.main(["--out", str(tmp_path / "run"), *argv]) == 0
    assert events.index("cpp") < events.index("progress bar"), events[:5]
    capsys.readouterr()


def test_a_failed_checkpoint_write_keeps_the_previous_one(small_runs, monkeypatch, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--out", out, "--max-steps", "1", *FAST]) == 0
    before = open(os.path.join(out, "last.pt"), "rb").read()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    capsys.readouterr()
    assert train.main(["--out", out, "--max-steps", "3", "--checkpoint-every", "1", *FAST]) == 2
    err = one_error_line(capsys)
    assert f"cannot write checkpoint {os.path.join(out, 'last.pt')} (No space left on device); the previous one " \
           f"is untouched; training stopped at step 2; re-run the same command to resume" in err
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == 1
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command resumes and finishes
    assert train.main(["--out", out, "--max-steps", "3", *FAST]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out) if r["loss"]] == ["1", "2", "3"]


def test_a_second_run_in_the_same_folder_is_refused(small_runs, tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        assert train.main(["--out", str(out), "--max-steps", "1", *FAST]) == 2
        assert "another dvp-train (pid 4242) is training in" in one_error_line(capsys)
    assert train.main(["--out", str(out), "--max-steps", "1", *FAST]) == 0  # lock released: fine


def test_leftovers_of_a_killed_run_are_cleaned_or_ignored(small_runs, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--out", out, "--max-steps", "1", *FAST]) == 0
    dead = os.path.join(out, ".last.pt.tmp99999999")  # no such pid
    open(dead, "wb").write(b"PK\x03\x04 half a checkpoint")
    with open(os.path.join(out, "metrics.csv"), "a") as f:
        f.write("2,0.02,0.0001,4.1")  # a row cut short by the kill, no newline
    open(os.path.join(out, "metrics.csv.tmp"), "w").write("step\n1")
    capsys.readouterr()
    assert train.main(["--out", out, "--max-steps", "2", *FAST]) == 0
    assert f"removed {dead}" in capsys.readouterr().err
    assert not os.path.exists(dead)
    assert [r["step"] for r in metrics(out)] == ["1", "2"] and all(None not in r.values() for r in metrics(out))
    json.load(open(os.path.join(out, "config.json")))


def test_remove_stale_temporaries_keeps_a_live_writers_file(tmp_path):
    live = tmp_path / f".last.pt.tmp{os.getppid()}"
    dead = tmp_path / ".best.pt.tmp99999999"
    live.write_bytes(b"")
    dead.write_bytes(b"")
    assert remove_stale_temporaries(str(tmp_path)) == [str(dead)]
    assert live.exists()


# --- numerics and determinism ---------------------------------------------------------------------------------------
def test_a_huge_learning_rate_is_survived_by_skipping_and_reported(small_runs, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--out", out, "--max-steps", "4", "--lr", "1e6", *FAST]) == 0
    captured = capsys.readouterr()
    rows = [r for r in metrics(out) if r["loss"]]
    skipped = int(rows[-1]["skipped"])
    assert skipped >= 1, rows
    for before, row in zip(rows, rows[1:]):  # a logged step that was skipped has no loss to report
        if int(row["skipped"]) > int(before["skipped"]):
            assert row["loss"] == row["elbo"] == "nan", row
    assert f"({skipped} skipped as non-finite)" in captured.out
    assert "skipped" in captured.err and "non-finite loss or gradient" in captured.err
    ckpt = load_checkpoint(os.path.join(out, "last.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_run_that_keeps_diverging_stops_with_one_line(small_runs, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(loop, "MAX_CONSECUTIVE_SKIPS", 2)
    out = str(tmp_path / "run")
    assert train.main(["--out", out, "--max-steps", "6", "--lr", "1e6", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dvp-train: error: training diverged: the last 2 steps (up to step ")
    assert "lower --lr (it is 1e+06)" in err


def test_same_seed_same_run_and_a_sigterm_stop_loses_nothing(small_runs, monkeypatch, tmp_path, capsys):
    """Two fresh runs with one --seed are identical; so is a third stopped by SIGTERM after step 2 and re-run."""
    runs = [str(tmp_path / name) for name in ("a", "b", "stopped")]
    for out in runs[:2]:
        assert train.main(["--out", out, "--max-steps", "3", *FAST]) == 0
    real_step, calls = train.Trainer.step, []

    def step_then_sigterm(self, x):
        real_step(self, x)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler does before preempting a job

    monkeypatch.setattr(train.Trainer, "step", step_then_sigterm)
    capsys.readouterr()
    assert train.main(["--out", runs[2], "--max-steps", "3", *FAST]) == 128 + signal.SIGTERM
    err = one_error_line(capsys)
    assert f"dvp-train: stopped by SIGTERM after step 2; saved {os.path.join(runs[2], 'last.pt')}; re-run" in err
    monkeypatch.setattr(train.Trainer, "step", real_step)
    assert train.main(["--out", runs[2], "--max-steps", "3", *FAST]) == 0

    columns = ("step", "loss", "elbo", "recon", "kl", "grad_norm", "skipped")
    logged = [[tuple(r[c] for c in columns) for r in metrics(out) if r["loss"]] for out in runs]
    assert len(logged[0]) == 3 and logged[0] == logged[1] == logged[2]
    weights = [load_checkpoint(os.path.join(out, "last.pt")) for out in runs]
    for part in ("model", "ema"):
        assert all(torch.equal(w[part][k], weights[0][part][k]) for w in weights[1:] for k in weights[0][part])
