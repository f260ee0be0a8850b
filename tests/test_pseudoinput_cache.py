"""The cached normaliser S of the DCT pseudo-inputs (dvp_fast/pseudoinput_cache.py): hits, key
changes, damaged entries, the real model."""
import os
import warnings

import pytest
import torch
from torch import nn

from dvp_fast import data
from dvp_fast.config import model_preset
from dvp_fast.pseudoinput import PseudoInput
from dvp_fast.pseudoinput_cache import fit_scale_cached


class PseudoOnly(nn.Module):
    """The part of DVPVAE that fit_scale_cached uses, without the rest of the model."""

    def __init__(self, **overrides):
        super().__init__()
        self.config = model_preset("mnist", **overrides)
        self.pseudo = PseudoInput(self.config)
        self.fits = 0

    def fit_pseudoinput_scale(self, images, batch_size=2048):
        self.fits += 1
        return self.pseudo.fit_scale(images, batch_size)


@pytest.fixture
def digits():
    return data.load_embedded("train")[0][:600]


def test_scale_cache_hit_and_key_changes(tmp_path, digits):
    first = PseudoOnly()
    s1 = fit_scale_cached(first, digits, "embedded", "train", cache_dir=str(tmp_path))
    assert first.fits == 1 and bool(first.pseudo.scale_fitted)
    direct = PseudoOnly().pseudo.fit_scale(digits)
    torch.testing.assert_close(s1, direct, rtol=0, atol=0)

    second = PseudoOnly()
    s2 = fit_scale_cached(second, digits, "embedded", "train", cache_dir=str(tmp_path))
    assert second.fits == 0 and bool(second.pseudo.scale_fitted)
    torch.testing.assert_close(second.pseudo.scale, direct, rtol=0, atol=0)
    assert torch.equal(s2, s1)

    changes = [(PseudoOnly(), digits[:-1], "train"), (PseudoOnly(pseudoinput_scale="floor"), digits, "train"),
               (PseudoOnly(pseudoinput_size=5), digits, "train"), (PseudoOnly(), digits, "val")]
    for model, images, split in changes:
        fit_scale_cached(model, images, "embedded", split, cache_dir=str(tmp_path))
        assert model.fits == 1
    floor = changes[1][0].pseudo.scale
    assert torch.equal(floor, torch.floor(floor)) and not torch.equal(floor, s1)
    files = os.listdir(tmp_path / "scales")
    assert len(files) == 5 and not [f for f in files if "part" in f]


def only_cache_file(tmp_path):
    (path,) = (tmp_path / "scales").iterdir()
    return path


@pytest.mark.parametrize("damage", ["garbage", "truncated", "stale key", "bad scale"])
def test_damaged_or_stale_cache_is_recomputed(tmp_path, digits, damage):
    fit_scale_cached(PseudoOnly(), digits, "embedded", "train", cache_dir=str(tmp_path))
    path = only_cache_file(tmp_path)
    entry = torch.load(path, weights_only=True)
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "stale key":
        entry["key"]["content"] = "0" * 64
        entry["scale"] = entry["scale"] * 3
        torch.save(entry, path)
    else:
        entry["scale"] = torch.zeros_like(entry["scale"])
        torch.save(entry, path)
    model = PseudoOnly()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scale = fit_scale_cached(model, digits, "embedded", "train", cache_dir=str(tmp_path))
    assert model.fits == 1
    assert bool(caught) == (damage != "stale key")  # unreadable or invalid: warned; stale: silently replaced
    torch.testing.assert_close(scale, PseudoOnly().pseudo.fit_scale(digits), rtol=0, atol=0)
    reread = PseudoOnly()
    fit_scale_cached(reread, digits, "embedded", "train", cache_dir=str(tmp_path))
    assert reread.fits == 0  # the rewritten entry is good


def test_scale_cache_with_the_real_model(tmp_path, monkeypatch, digits):
    from dvp_fast import DVPVAE

    monkeypatch.setenv("DVP_FAST_CACHE", str(tmp_path))
    model = DVPVAE.from_preset("mnist")
    scale = fit_scale_cached(model, digits, "embedded")
    assert tuple(scale.shape) == (1, 7, 7) and (tmp_path / "scales").is_dir()
    with pytest.raises(ValueError, match="DCT pseudo-inputs"):
        fit_scale_cached(DVPVAE.from_preset("mnist", pseudoinputs=False), digits, "embedded")
