"""dvp-sample and dvp-eval on a tiny trained run."""
import pytest
import torch

from dvp_fast.cli import eval_main, sample_main
from dvp_fast.train_cli import main as train_main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "mnist")
    assert train_main(["--out", out, "--max-steps", "2", "--batch-size", "50", "--no-progress"]) == 0
    return out


@pytest.mark.slow
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


def test_eval_reports_the_standard_error_of_the_nll_over_images(run_dir, capsys, monkeypatch):
    import json
    import os
    import statistics

    from dvp_fast.model import DVPVAE

    values = [float(v) for v in (80, 95, 70, 101, 88, 93, 77, 84)]  # per-image NLLs, in batches of 3, 3, 2
    seen = []

    def fixed_nll(self, x, num_samples, progress=None):
        out = torch.tensor(values[len(seen):len(seen) + x.shape[0]])
        seen.extend(out.tolist())
        return out

    monkeypatch.setattr(DVPVAE, "nll", fixed_nll)
    assert eval_main(["--checkpoint", run_dir, "--num-samples", "2", "--limit", "8", "--batch-size", "3"]) == 0
    mean, stderr = statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5
    assert f"IWAE NLL       {mean:.3f} ± {stderr:.3f} nats" in capsys.readouterr().out
    with open(os.path.join(run_dir, "evaluations.json")) as f:
        assert json.load(f)[-1]["nll_stderr"] == pytest.approx(stderr, rel=1e-9)


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


def test_eval_shows_progress_with_the_time_left(run_dir, capsys):
    assert eval_main(["--checkpoint", run_dir, "--num-samples", "5", "--limit", "6", "--batch-size", "3"]) == 0
    err = capsys.readouterr().err
    assert "dvp-eval IWAE" in err and "100%" in err and "30/30" in err  # 6 images x 5 draws, with tqdm's ETA


def test_sample_shows_progress_and_draws_in_batches(run_dir, tmp_path, capsys):
    png = tmp_path / "g.png"
    assert sample_main(["--checkpoint", run_dir, "--n", "5", "--batch-size", "2", "--out", str(png), "--steps", "2",
                        "--save-tensor"]) == 0
    assert torch.load(tmp_path / "g.pt").shape == (5, 1, 28, 28)
    assert "5/5" in capsys.readouterr().err


def test_rerunning_a_finished_run_says_there_is_nothing_to_do(run_dir, capsys):
    assert train_main(["--out", run_dir, "--max-steps", "2", "--batch-size", "50", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already trained 2 steps" in out and "nan" not in out


def test_the_end_of_run_line_gives_both_losses_in_bits_per_dim():
    from dvp_fast.train_cli import _summary_line

    line = _summary_line(160, 16, 151.2, (0.2031, 10), dict(val_loss=0.2107, active_units=0.93), 0.2101, 150, 0)
    assert line == ("done: 160 steps (10.0 epochs) in 151 s; loss in bits/dim: training 0.2031 (mean of the last 10 "
                    "steps), validation 0.2107 (best 0.2101 at step 150); 93% active units")


def test_grids_are_drawn_at_twice_the_size_by_default(tmp_path):
    """Each pixel of a 2x grid is a 2x2 block of the 1x grid's value: no new values, twice the size."""

    from dvp_fast.images import make_grid, save_grid

    images = torch.rand(5, 1, 7, 6) * 2 - 1
    one, two = make_grid(images, nrow=3, scale=1), make_grid(images, nrow=3, scale=2)
    assert tuple(one.shape) == (2 * (7 + 2) + 2, 3 * (6 + 2) + 2, 1) and tuple(two.shape) == (2 * (14 + 2) + 2, 3 * (12 + 2) + 2, 1)
    assert torch.equal(two[2:2 + 14:2, 2:2 + 12:2], one[2:2 + 7, 2:2 + 6])  # the first image, every other pixel
    assert torch.equal(two[3:3 + 14:2, 3:3 + 12:2], one[2:2 + 7, 2:2 + 6])
    path = save_grid(images, str(tmp_path / "g.png"), nrow=3)
    with open(path, "rb") as f:
        header = f.read(24)
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (height, width) == tuple(two.shape[:2])
    with pytest.raises(ValueError, match="scale must be a positive integer"):
        make_grid(images, scale=0)
