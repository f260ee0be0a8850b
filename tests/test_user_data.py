"""A user's own images: folder:/npz:/npy: sources, their checks, dvp-train/dvp-eval on them, and fit()."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dvp_fast import DVPVAE
from dvp_fast.cli import eval_main
from dvp_fast.data import load_embedded, load_images
from dvp_fast.data.user import load_user_images, user_split
from dvp_fast.train import evaluate, fit
from dvp_fast.train_cli import main as train_main


@pytest.fixture(scope="module")
def digits():
    return load_embedded("train")[0][:40]  # uint8 (40, 1, 28, 28)


def write_pngs(folder, images, mode="L", classes=2):
    """One PNG per image, spread over `classes` class subfolders; returns the paths in sorted order."""
    paths = []
    for i, image in enumerate(images):
        sub = os.path.join(folder, f"class{i % classes}")
        os.makedirs(sub, exist_ok=True)
        array = image.numpy()
        pil = Image.fromarray(array[0]) if mode == "L" else Image.fromarray(array.transpose(1, 2, 0), "RGB")
        paths.append(os.path.join(sub, f"{i:03d}.png"))
        pil.save(paths[-1])
    return sorted(paths)


def test_folder_source_reads_every_pixel_as_written(tmp_path, digits):
    paths = write_pngs(str(tmp_path / "f"), digits)
    (tmp_path / "f" / "notes.txt").write_text("ignored: not an image")
    loaded = load_user_images(f"folder:{tmp_path / 'f'}")
    order = [int(os.path.basename(p)[:3]) for p in paths]  # sorted by class folder, then name
    assert loaded.dtype == torch.uint8 and loaded.shape == (40, 1, 28, 28)
    assert torch.equal(loaded, digits[order])
    rgb = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    paths = write_pngs(str(tmp_path / "rgb"), rgb, mode="RGB", classes=1)
    assert torch.equal(load_user_images(f"folder:{tmp_path / 'rgb'}"), rgb)


def test_array_sources_in_every_layout(tmp_path, digits):
    hw = digits[:, 0].numpy()
    np.save(tmp_path / "a.npy", hw)
    np.save(tmp_path / "b.npy", hw[..., None])               # (N, H, W, 1)
    np.savez(tmp_path / "c.npz", images=digits.numpy(), labels=np.arange(40))  # (N, C, H, W) under "images"
    np.savez(tmp_path / "d.npz", hw)                            # one unnamed array
    for spec in ("npy:a.npy", "npy:b.npy", "npz:c.npz", "npz:d.npz"):
        kind, name = spec.split(":")
        assert torch.equal(load_user_images(f"{kind}:{tmp_path / name}"), digits), spec
    rgb = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", rgb)
    assert torch.equal(load_user_images(f"npy:{tmp_path / 'rgb.npy'}"), torch.from_numpy(rgb).permute(0, 3, 1, 2))


def test_the_val_split_is_seeded_disjoint_and_complete(digits):
    train, val = user_split(digits, 7, "train"), user_split(digits, 7, "val")
    assert val.shape[0] == 4 and train.shape[0] == 36
    rows = lambda part: {bytes(img.numpy()) for img in part}
    assert rows(train) | rows(val) == rows(digits) and not rows(train) & rows(val)
    assert torch.equal(val, user_split(digits, 7, "val"))
    assert not torch.equal(val, user_split(digits, 8, "val"))
    with pytest.raises(ValueError, match="splits .*'train', 'val', 'all'.*not 'test'"):
        user_split(digits, 7, "test")


def _bad_sources(tmp_path, digits):
    """(source, what the one-line message must contain) for each kind of bad input."""
    cases = []
    write_pngs(str(tmp_path / "sizes"), digits[:3], classes=1)
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "sizes" / "class0" / "zz.png")
    cases.append(("folder:" + str(tmp_path / "sizes"), "zz.png: grayscale 30x30, but"))
    write_pngs(str(tmp_path / "modes"), digits[:3], classes=1)
    Image.fromarray(np.zeros((28, 28, 3), np.uint8), "RGB").save(tmp_path / "modes" / "class0" / "zz.png")
    cases.append(("folder:" + str(tmp_path / "modes"), "zz.png: RGB 28x28, but"))
    write_pngs(str(tmp_path / "alpha"), digits[:1], classes=1)
    Image.new("RGBA", (28, 28)).save(tmp_path / "alpha" / "class0" / "zz.png")
    cases.append(("folder:" + str(tmp_path / "alpha"), "zz.png: image mode 'RGBA'"))
    write_pngs(str(tmp_path / "broken"), digits[:2], classes=1)
    (tmp_path / "broken" / "class0" / "zz.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cases.append(("folder:" + str(tmp_path / "broken"), "zz.jpg: not a readable image"))
    (tmp_path / "empty").mkdir()
    cases.append(("folder:" + str(tmp_path / "empty"), "no image files"))
    cases.append(("folder:" + str(tmp_path / "nowhere"), "no folder"))
    (tmp_path / "zero.npy").write_bytes(b"")
    cases.append(("npy:" + str(tmp_path / "zero.npy"), "zero.npy: not a readable .npy file"))
    np.save(tmp_path / "float.npy", np.zeros((2, 28, 28), np.float32))
    cases.append(("npy:" + str(tmp_path / "float.npy"), "expected uint8 pixels in [0, 255], got dtype float32"))
    np.save(tmp_path / "none.npy", np.zeros((0, 28, 28), np.uint8))
    cases.append(("npy:" + str(tmp_path / "none.npy"), "holds no images"))
    np.save(tmp_path / "odd.npy", np.zeros((2, 5, 28, 28), np.uint8))
    cases.append(("npy:" + str(tmp_path / "odd.npy"), "with C = 1 or 3, got shape (2, 5, 28, 28)"))
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 28, 28), np.uint8), b=np.zeros(2))
    cases.append(("npz:" + str(tmp_path / "two.npz"), "holds ['a', 'b']: expected one array, or one named 'images'"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases.append(("npy:" + str(tmp_path / "obj.npy"), "obj.npy: not a readable .npy file"))
    return cases


def test_bad_sources_are_one_line_errors_naming_the_file(tmp_path, digits):
    for source, expected in _bad_sources(tmp_path, digits):
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            load_user_images(source)
        message = str(info.value)
        assert expected in message and "\n" not in message, (source, message)


@pytest.mark.slow
def test_dvp_train_and_dvp_eval_on_a_folder(tmp_path, digits, capsys):
    write_pngs(str(tmp_path / "mine"), digits)
    source = f"folder:{tmp_path / 'mine'}"
    out = str(tmp_path / "run")
    assert train_main(["--data", source, "--out", out, "--batch-size", "12", "--max-steps", "2", "--no-progress"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert eval_main(["--checkpoint", out, "--num-samples", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"{source}/all, 40 images, 2 importance samples" in printed
    assert eval_main(["--checkpoint", out, "--split", "val", "--num-samples", "2", "--no-progress"]) == 0
    assert "/val, 4 images" in capsys.readouterr().out
    # Images of another shape than the preset's are refused in one line, before any training.
    rgb = np.zeros((6, 32, 32, 3), np.uint8)
    np.save(tmp_path / "rgb.npy", rgb)
    code = train_main(["--data", f"npy:{tmp_path / 'rgb.npy'}", "--out", str(tmp_path / "r"), "--max-steps", "1",
                       "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "rgb.npy: a tensor of shape (6, 3, 32, 32), but preset 'mnist' expects grayscale" in err
    assert not os.path.exists(tmp_path / "r")
    with pytest.raises(SystemExit) as info:  # argparse's usage error
        train_main(["--data", "pictures", "--no-progress"])
    assert info.value.code == 2
    assert "folder:PATH, npz:PATH or npy:PATH" in capsys.readouterr().err


def test_fit_trains_on_a_uint8_tensor(digits):
    torch.manual_seed(0)
    model = DVPVAE.from_preset("mnist", num_ch=8, diffusion_channels=16, diffusion_res_blocks=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, digits, max_steps=3, batch_size=12, progress=False)
    assert result["steps"] == 3 and np.isfinite(result["val_loss"]) and np.isfinite(result["train_loss"])
    assert bool(model.pseudo.scale_fitted) and not model.training
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "likelihood_head.weight" in changed
    # The model now holds the EMA weights; use_ema=False keeps the raw ones, from the same start.
    torch.manual_seed(0)
    raw = DVPVAE.from_preset("mnist", num_ch=8, diffusion_channels=16, diffusion_res_blocks=1)
    fit(raw, digits, max_steps=3, batch_size=12, progress=False, use_ema=False)
    assert not torch.equal(raw.likelihood_head.weight, model.likelihood_head.weight)
    assert np.isfinite(evaluate(model, user_split(digits, 0, "val"), 100)["val_loss"])
    with pytest.raises(ValueError, match="expected uint8 images in \\[0, 255\\], got dtype torch.float32"):
        fit(model, digits.float(), max_steps=1)
    with pytest.raises(ValueError, match=r"shape \(40, 1, 28, 14\), but preset 'mnist' expects grayscale"):
        fit(model, digits[..., :14], max_steps=1)


def test_load_images_takes_user_sources(tmp_path, digits):
    np.save(tmp_path / "x.npy", digits.numpy())
    source = f"npy:{tmp_path / 'x.npy'}"
    assert torch.equal(load_images(source, "all"), digits)
    assert torch.equal(load_images(source, "val", seed=3), user_split(digits, 3, "val"))
