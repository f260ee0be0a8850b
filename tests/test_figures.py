"""dvp-figures and dvp_fast.figures: the paper's figures from a run, checked where a closed form exists.

The runs are dvp-train runs of a small model (2 steps), one MNIST-shaped on the shipped digits and one
CIFAR-shaped on a user's npy images, so that the command is tested on both presets' layouts in seconds.
"""
import csv
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import dvp_fast.train_cli as train
from dvp_fast import DVPVAE
from dvp_fast import figures
from dvp_fast.checkpoint import save_checkpoint
from dvp_fast.config import model_preset
from dvp_fast.figures_cli import FIGURES, figures_main
from helpers import SMALL

SMALLER = {**SMALL, "enc_blocks_per_scale": 1}
QUICK = ["--n", "3", "--draws-per-u", "1", "--images", "2", "--draws", "3", "--steps", "4", "--au-images", "40"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DVPVAE.from_preset("mnist", **SMALL).eval()


@pytest.fixture(scope="module")
def digits():
    from dvp_fast.data import load_images

    return load_images("embedded", "val")[:40]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"mnist": run folder, "cifar10": run folder}: 2 steps each of dvp-train on a small model."""
    root = tmp_path_factory.mktemp("runs")
    colour = np.random.default_rng(0).integers(0, 256, size=(30, 32, 32, 3), dtype=np.uint8)
    np.save(root / "colour.npy", colour)
    real = model_preset
    common = ["--max-steps", "2", "--batch-size", "10", "--eval-every", "2", "--log-every", "1", "--no-progress",
              "--threads", "1", "--seed", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "model_preset", lambda name, **kw: real(name, **{**SMALLER, **kw}))
        assert train.main(["--out", str(root / "mnist"), "--preset", "mnist", "--data", "embedded", *common]) == 0
        assert train.main(["--out", str(root / "cifar10"), "--preset", "cifar10",
                           "--data", f"npy:{root / 'colour.npy'}", *common]) == 0
    return {"mnist": str(root / "mnist"), "cifar10": str(root / "cifar10")}


# --- DVPVAE.decode(top=...) --------------------------------------------------------------------------------------------
def test_decode_with_every_latent_kept_is_the_posterior_draw(model, digits):
    """Seen failing: with `top` ignored the layers are prior draws, not the encoder's."""
    x = digits[:4].float() / 127.5 - 1.0
    torch.manual_seed(1)
    enc = model.encode(x)
    expected = model.params_to_images(model.likelihood_params(enc.z))
    assert torch.equal(model.decode(enc.u, top=enc.z), expected)
    assert not torch.allclose(model.decode(enc.u), expected, atol=1e-3)


def test_decode_keeps_the_top_latents_and_draws_the_rest(model, digits):
    x = digits[:3].float() / 127.5 - 1.0
    enc = model.encode(x)
    kept = model._top_down_prior(model._condition_pyramid(enc.u), model._prior_noises(3), 1.0, None, enc.z[:1])
    assert torch.equal(kept[0], enc.z[0])
    # At temperature 0 the layers below are their prior means given z_L: the same image twice, and not the
    # image of the prior's own z_L mean.
    once, twice = (model.decode(enc.u, temperature=0.0, top=enc.z[:1]) for _ in range(2))
    assert torch.equal(once, twice)
    assert not torch.allclose(once, model.decode(enc.u, temperature=0.0), atol=1e-4)


@pytest.mark.parametrize("top, message", [
    ("z", "top must be a list of tensors"),
    ([torch.zeros(3, 1, 7, 7)], r"top\[0\] \(z_3\) must have shape \(2, 1, 7, 7\), got \(3, 1, 7, 7\)"),
    ([torch.zeros(2, 1, 7, 7)] * 4, "top holds 4 latents, the model has 3 latent layers"),
])
def test_decode_refuses_a_bad_top(model, top, message):
    u = torch.zeros(2, *model.pseudo.shape)
    with pytest.raises((TypeError, ValueError), match=message):
        model.decode(u, top=top)


# --- the figures' numbers -------------------------------------------------------------------------------------------
def test_generative_reconstructions_at_temperature_zero_are_one_image(model, digits):
    """Closed form: at T = 0 every z not kept is its prior mean, so each row's draws are the same image;
    at T = 1 they differ (seen failing when the draws shared one noise)."""
    cold = figures.generative_reconstructions(model, digits[:3], draws=4, levels=(0, 1, 2), temperature=0.0)
    for k, rows in cold["rows"].items():
        assert torch.equal(rows, rows[:, :1].expand_as(rows)), k
        assert float(cold["spread"][k].max()) == 0.0
    warm = figures.generative_reconstructions(model, digits[:3], draws=4, levels=(0, 1), temperature=1.0)
    for k, rows in warm["rows"].items():
        assert (warm["spread"][k] > 0).all(), k
    assert cold["labels"] == {0: "u fixed", 1: "u, z3 fixed", 2: "u, z3, z2 fixed"}


def test_generative_reconstruction_csv_holds_what_was_drawn(model, digits, tmp_path):
    out = str(tmp_path / "recon.png")
    torch.manual_seed(0)
    result = figures.generative_reconstructions(model, digits[:2], draws=2, levels=(0, 1), out=out)
    cells = figures.read_pixel_csv(figures.csv_path(out))
    assert len(cells) == 2 * (2 + 2 * 2)
    assert torch.equal(cells[("1", "input", "0")], result["inputs"][1])
    assert torch.equal(cells[("0", "u_image", "0")], result["u_image"][0])
    assert torch.equal(cells[("1", "fixed_top_1", "1")], result["rows"][1][1, 1].float())


def _idct_image(u: np.ndarray, scale: np.ndarray, size: int) -> np.ndarray:
    """Algorithm 2 from the DCT-II's definition, in float64: 2 clamp(A_d^T (u S) A_d, 0, 1) - 1 with
    A[k, n] = sqrt(1/D) (k = 0) or sqrt(2/D) cos(pi (n + 1/2) k / D)."""
    d = u.shape[-1]
    a = np.array([[math.sqrt((1.0 if k == 0 else 2.0) / size) * math.cos(math.pi * (n + 0.5) * k / size)
                   for n in range(size)] for k in range(d)])
    return 2.0 * np.clip(np.einsum("kh,bckl,lw->bchw", a, u * scale, a), 0.0, 1.0) - 1.0


def test_pseudo_inputs_are_drawn_through_the_inverse_dct(model, tmp_path):
    out = str(tmp_path / "pseudo.png")
    result = figures.pseudo_input_figure(model, 3, out, draws=2, steps=4)
    cells = figures.read_pixel_csv(figures.csv_path(out))
    u = torch.stack([cells[(str(j), "u", "0")] for j in range(3)]).double().numpy()
    shown = torch.stack([cells[(str(j), "u_image", "0")] for j in range(3)]).double().numpy()
    expected = _idct_image(u, model.pseudo.scale.double().numpy(), 28)
    assert np.abs(shown - expected).max() < 1e-5
    assert result["decoded"].shape == (2, 3, 1, 28, 28)
    assert torch.equal(cells[("2", "decoded", "1")], result["decoded"][1, 2])


def test_latent_use_is_active_units_per_layer(model, digits, tmp_path):
    out = str(tmp_path / "au.png")
    torch.manual_seed(5)
    result = figures.latent_use({"small": (model, digits)}, out, threshold=0.01)
    torch.manual_seed(5)
    expected = model.active_units(digits.float() / 127.5 - 1.0, threshold=0.01, per_layer=True)
    assert list(result["small"].values()) == expected
    rows = read_csv(figures.csv_path(out))
    assert [r["layer"] for r in rows] == ["z3", "z2", "z1"]
    assert [float(r["fraction"]) for r in rows] == expected
    assert all(int(r["active_units"]) == round(float(r["fraction"]) * int(r["units"])) for r in rows)


def test_training_curve_csv_is_the_runs_metrics(runs, tmp_path):
    metrics = os.path.join(runs["mnist"], "metrics.csv")
    out = str(tmp_path / "curves.png")
    figures.training_curves(metrics, out)
    written = read_csv(figures.csv_path(out))
    assert written == [{k: r[k] for k in figures.CURVE_FIELDS} for r in read_csv(metrics)]
    assert len(written) == 2 and all(r["grad_norm"] for r in written) and written[-1]["val_loss"]


# --- the command ----------------------------------------------------------------------------------------------------------
def _check_folder(folder: str, names) -> None:
    assert sorted(os.listdir(folder)) == sorted(n for png in names for n in (png, png[:-4] + ".csv"))
    for png in names:
        with Image.open(os.path.join(folder, png)) as im:
            assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 250, (png, im.size)
        rows = read_csv(os.path.join(folder, png[:-4] + ".csv"))
        assert rows, png


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
def test_dvp_figures_writes_every_figure(runs, preset, tmp_path, capsys):
    out = str(tmp_path / "figs")
    assert figures_main(["--checkpoint", runs[preset], "--out", out, *QUICK]) == 0
    printed = capsys.readouterr().out
    _check_folder(out, FIGURES.values())
    assert printed.count("-> ") == 4
    side = 32 if preset == "cifar10" else 28
    recon = figures.read_pixel_csv(os.path.join(out, "generative_reconstructions.csv"))
    assert len(recon) == 2 * (2 + 2 * 3) and recon[("0", "input", "0")].shape[-1] == side
    layers = read_csv(os.path.join(out, "latent_use.csv"))
    assert len(layers) == 3 and {r["run"] for r in layers} == {preset}


def test_compare_draws_two_runs_of_different_shapes(runs, tmp_path):
    out = str(tmp_path / "figs")
    assert figures_main(["--checkpoint", runs["mnist"], "--compare", runs["cifar10"], "--out", out,
                         "--only", "latents", *QUICK]) == 0
    _check_folder(out, ["latent_use.png"])
    rows = read_csv(os.path.join(out, "latent_use.csv"))
    assert [r["run"] for r in rows] == ["mnist"] * 3 + ["cifar10"] * 3


def test_a_model_without_pseudo_inputs_skips_their_figure(tmp_path, capsys):
    torch.manual_seed(0)
    plain = DVPVAE.from_preset("mnist", **SMALLER, pseudoinputs=False)
    run = tmp_path / "plain"
    run.mkdir()
    save_checkpoint(dict(model_config=plain.config.to_dict(), model=plain.state_dict(), run=dict(data="embedded")),
                    str(run / "best.pt"))
    out = str(tmp_path / "figs")
    assert figures_main(["--checkpoint", str(run), "--out", out, *QUICK]) == 0
    err = capsys.readouterr().err
    assert "no pseudo-inputs" in err and "skipped pseudo_inputs.png" in err and "no metrics.csv" in err
    _check_folder(out, ["generative_reconstructions.png", "latent_use.png"])
    recon = figures.read_pixel_csv(os.path.join(out, "generative_reconstructions.csv"))
    assert {key[1] for key in recon} == {"input", "fixed_top_1"}


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{tmp}/nowhere"], "nowhere"),
    (["--checkpoint", "{mnist}", "--levels", "0,4"], "--levels: the model has 3 latent layers, so at most 3 can "
                                                     "be kept; got 0,4"),
    (["--checkpoint", "{mnist}", "--levels", "a"], "expected comma-separated integers such as 0,1, got 'a'"),
    (["--checkpoint", "{mnist}", "--data", "npy:{tmp}/colour.npy"], r"images of shape \(3, 32, 32\), the model of"),
])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, argv, message):
    np.save(tmp_path / "colour.npy", np.zeros((4, 32, 32, 3), dtype=np.uint8))
    argv = [a.format(tmp=tmp_path, mnist=runs["mnist"]) for a in argv]
    try:
        code = figures_main([*argv, "--out", str(tmp_path / "figs"), *QUICK])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("dvp-figures: error:") and re.search(message, err), err
