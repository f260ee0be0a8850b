"""The README's main job ends with digits: its reconstructions and samples, judged by a classifier.

The judge (tests/judge.py, weights in tests/judge.pt) is a small convolutional classifier trained once on
the 4,000 embedded training digits (0.966 on the 500 test digits); it shares no code with dvp_fast.
Reconstructions of the held-out test digits must mostly get their input's label; samples must be
digits it is sure of, spread over the ten classes. The thresholds sit between the main job the README
used to run (160 steps of 50) and the one it runs now (320 steps of 25) (bench/results/main-job-2026-12-07.md): the old
one fails the sure-share check, and an untrained model fails them all.
"""
import os
import re
import shlex
import sys

import pytest
import torch

from dvp_fast import DVPVAE
from dvp_fast.data import load_dataset
from dvp_fast.train_cli import main as train_main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import judge as judge_module  # noqa: E402  tests/judge.py

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
# Measured (bench/results/main-job-2026-12-07.md, 500 samples at temperature 1, seed 1): the main job
# 0.938 / 0.268 sure / 0.216 largest class share / 10 classes; the old one (160 steps of 50) 0.914 / 0.230
# / 0.288 / 9, which fails the sure share and the class share.
MIN_RECONSTRUCTION_ACCURACY = 0.8
MIN_SAMPLE_SURE = 0.245
MAX_SAMPLE_CLASS_SHARE = 0.26
MIN_SAMPLE_CLASSES = 8


def readme_main_job() -> list[str]:
    """The arguments of the README's main job command (the first `dvp-train ... runs/mnist-embedded` line)."""
    with open(README) as f:
        text = f.read()
    match = re.search(r"^dvp-train (.*--out runs/mnist-embedded.*)$", text, re.MULTILINE)
    assert match, "README.md has no main job line `dvp-train ... --out runs/mnist-embedded ...`"
    return shlex.split(match.group(1))


@pytest.fixture(scope="module")
def judge():
    return judge_module.load()


def test_the_judge_reads_the_held_out_digits(judge):
    images, labels = load_dataset("embedded", "test")
    accuracy = (judge_module.probabilities(judge, images).argmax(1) == labels).double().mean().item()
    assert accuracy >= 0.95, f"the judge itself is too weak: {accuracy:.3f} test accuracy"


def score(model: DVPVAE, judge) -> dict:
    return judge_module.score_model(judge, model)  # 500 samples at temperature 1, seed 1


def assert_digits(scores: dict) -> None:
    assert scores["recon_accuracy"] >= MIN_RECONSTRUCTION_ACCURACY, scores
    assert scores["sample_sure"] >= MIN_SAMPLE_SURE, scores
    assert scores["sample_class_share"] <= MAX_SAMPLE_CLASS_SHARE, scores
    assert scores["sample_classes"] >= MIN_SAMPLE_CLASSES, scores


def test_the_thresholds_fail_the_main_job_the_readme_used_to_run():
    """The figures measured for 160 steps of 50 (bench/results/main-job-2026-12-07.md) do not pass: the
    thresholds ask for what the longer run of smaller batches gives."""
    with pytest.raises(AssertionError):
        assert_digits(dict(recon_accuracy=0.914, sample_sure=0.230, sample_class_share=0.288, sample_classes=9))


@pytest.mark.slow
def test_the_judge_rejects_an_untrained_model(judge):
    torch.manual_seed(0)
    scores = score(DVPVAE.from_preset("mnist").eval(), judge)
    with pytest.raises(AssertionError):
        assert_digits(scores)
    assert scores["recon_accuracy"] < 0.3


@pytest.mark.slow
def test_the_readme_main_job_ends_with_digits(judge, tmp_path, capsys):
    """Runs the README's main job as written (only --out moved to a temporary folder)."""
    args = readme_main_job()
    args[args.index("--out") + 1] = str(tmp_path / "mnist-embedded")
    assert train_main(args + ["--no-progress"]) == 0
    assert "done:" in capsys.readouterr().out
    model = DVPVAE.from_checkpoint(str(tmp_path / "mnist-embedded")).eval()
    assert_digits(score(model, judge))
