"""dvp-sample and dvp-eval on a tiny trained run."""
import pytest
import torch

from dvp_fast.cli import eval_main, sample_main
from dvp_fast.train import main as train_main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "mnist")
    assert train_main(["--out", out, "--max-steps", "2", "--batch-size", "50", "--no-progress"]) == 0
    return out


def test_sample_writes_a_png_grid_and_tensor(run_dir, tmp_path, capsys):
    png = tmp_path / "grid.png"
    assert sample_main(["--checkpoint", run_dir, "--n", "6", "--out", str(png), "--steps", "3", "--seed", "1",
                        "--save-tensor"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = torch.load(tmp_path / "grid.pt")
    assert images.shape == (6, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert "6 samples" in capsys.readouterr().out
    # same seed, same samples
    assert sample_main(["--checkpoint", run_dir, "--n", "6", "--out", str(tmp_path / "b.png"), "--steps", "3",
                        "--seed", "1", "--save-tensor"]) == 0
    assert torch.equal(images, torch.load(tmp_path / "b.pt"))


def test_eval_prints_elbo_nll_and_active_units(run_dir, capsys):
    assert eval_main(["--checkpoint", run_dir, "--num-samples", "3", "--limit", "8", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "negative ELBO" in out and "IWAE NLL" in out and "bits/dim" in out and "active units" in out


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "/no/such/run", "--out", "x.png"], "checkpoint not found: /no/such/run"),
    (["--checkpoint", "RUN", "--out", "/no/such/dir/x.png"], "output folder does not exist"),
])
def test_sample_errors_are_one_line(run_dir, capsys, argv, message):
    argv = [a.replace("RUN", run_dir) for a in argv]
    assert sample_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_eval_rejects_a_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"\x00" * 100)
    assert eval_main(["--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "best.pt" in err and "\n" not in err
