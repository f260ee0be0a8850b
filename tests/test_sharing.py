"""Shareable weights and safe checkpoints: safetensors folders, weights_only checkpoints, dvp-export.

The malicious files here really do run code when unpickled (each test checks that once with
weights_only=False, so it could fail), and no entry point of dvp_fast may run it.
"""
import json
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from dvp_fast import DVPVAE
from dvp_fast.checkpoint import CheckpointError, load_checkpoint, upgrade_main as checkpoint_main
from dvp_fast.cli import eval_main, sample_main
from dvp_fast.export import export_main
from dvp_fast.train_cli import main as train_main

RUN = ["--batch-size", "10", "--max-steps", "2", "--eval-every", "2", "--no-progress", "--seed", "5"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "mnist")
    assert train_main(["--out", out, *RUN]) == 0
    return out


def test_save_and_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DVPVAE.from_preset("mnist", num_ch=8, diffusion_channels=16, diffusion_res_blocks=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.pseudo.scale.fill_(3.0)
    paths = model.save_pretrained(str(tmp_path / "m"))
    assert sorted(os.path.basename(p) for p in paths) == ["config.json", "model.safetensors"]
    # The file is a plain safetensors table, readable without dvp_fast: the oracle for what we wrote.
    from safetensors.torch import load_file

    table = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert table.keys() == model.state_dict().keys()
    assert all(torch.equal(table[k], v) for k, v in model.state_dict().items())
    loaded = DVPVAE.from_pretrained(str(tmp_path / "m"))
    assert loaded.config == model.config
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    model.eval(), loaded.eval()
    torch.manual_seed(1)
    a = model(x).elbo
    torch.manual_seed(1)
    assert torch.equal(a, loaded(x).elbo)
    config = json.load(open(tmp_path / "m" / "config.json"))
    assert config["format"] == "dvp_fast.pretrained" and config["model"]["num_ch"] == 8


def test_from_pretrained_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no folder .*not a Hub repo id"):
        DVPVAE.from_pretrained(str(tmp_path / "missing" / "deeper"))
    (tmp_path / "f.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file.*from_checkpoint"):
        DVPVAE.from_pretrained(str(tmp_path / "f.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        DVPVAE.from_pretrained(str(tmp_path / "empty"))
    # Hub repo ids: without huggingface_hub, and without a network.
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r'dvp_fast\[hub\]'):
        DVPVAE.from_pretrained("someone/dvp-mnist")
    offline = types.ModuleType("huggingface_hub")

    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\n(multi-line detail)")

    offline.hf_hub_download = no_network
    monkeypatch.setitem(sys.modules, "huggingface_hub", offline)
    with pytest.raises(OSError) as info:
        DVPVAE.from_pretrained("someone/dvp-mnist")
    assert "cannot fetch 'someone/dvp-mnist'" in str(info.value) and "\n" not in str(info.value)


def test_a_folder_in_the_hub_layout_loads_by_repo_id(tmp_path, monkeypatch):
    model = DVPVAE.from_preset("mnist", num_ch=8, diffusion_channels=16, diffusion_res_blocks=1)
    model.save_pretrained(str(tmp_path / "repo"))
    hub = types.ModuleType("huggingface_hub")
    asked = []

    def download(repo_id, filename, revision=None):  # what the Hub's cache returns: a path per file
        asked.append((repo_id, filename, revision))
        return str(tmp_path / "repo" / filename)

    hub.hf_hub_download = download
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    loaded = DVPVAE.from_pretrained("owner/name", revision="v1")
    assert asked == [("owner/name", "config.json", "v1"), ("owner/name", "model.safetensors", "v1")]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.skipif(not __import__("importlib").util.find_spec("huggingface_hub"), reason="huggingface_hub absent")
def test_the_real_hub_client_offline_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OSError) as info:
        DVPVAE.from_pretrained("someone/not-cached")
    assert "without a network, pass the path of a local folder" in str(info.value)


# --- training checkpoints --------------------------------------------------------------------------------
def test_training_checkpoints_load_with_weights_only(run_folder):
    for name in ("last.pt", "best.pt"):
        payload = torch.load(os.path.join(run_folder, name), weights_only=True)
        assert payload["format_version"] == 2 and payload["step"] == 2
        assert isinstance(payload["rng"]["numpy"]["keys"], torch.Tensor)


def _format1_checkpoint(run_folder: str, path: str) -> tuple:
    """A format-1 checkpoint as dvp_fast wrote them before: numpy's RNG state as an ndarray tuple."""
    payload = torch.load(os.path.join(run_folder, "last.pt"), weights_only=True)
    np.random.seed(123)
    state = np.random.get_state()
    payload["format_version"] = 1
    payload["rng"]["numpy"] = state
    payload["rng"]["python"] = tuple([payload["rng"]["python"][0], tuple(payload["rng"]["python"][1]),
                                      payload["rng"]["python"][2]])
    torch.save(payload, path)
    return state


@pytest.mark.slow
def test_a_format1_checkpoint_is_refused_and_converts(run_folder, tmp_path, capsys):
    old = str(tmp_path / "old.pt")
    state = _format1_checkpoint(run_folder, old)
    with pytest.raises(CheckpointError, match=r"python -m dvp_fast upgrade-checkpoint --trust .*old\.pt"):
        load_checkpoint(old)
    # As a user runs it: the command the refusal names (its module runs as __main__ without warnings).
    proc = subprocess.run([sys.executable, "-m", "dvp_fast", "upgrade-checkpoint", "--trust", old], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "is now format 2" in proc.stdout and not proc.stderr.strip(), proc.stderr
    assert os.path.exists(old + ".format1")
    payload = load_checkpoint(old)
    assert payload["format_version"] == 2
    keys = payload["rng"]["numpy"]["keys"].numpy().astype(np.uint32)
    assert np.array_equal(keys, state[1]) and payload["rng"]["numpy"]["pos"] == state[2]
    # Converting twice is refused, the original stays.
    assert checkpoint_main(["--trust", old]) == 2
    assert "only format 1" in capsys.readouterr().err


# --- files whose unpickling runs code ------------------------------------------------------------------------
class RunsCode:
    """Unpickling this makes the directory `marker` (os.mkdir), standing for any code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def evil(tmp_path, run_folder):
    """A run folder whose best.pt and last.pt run code when unpickled, plus the marker they would make."""
    marker = str(tmp_path / "code-ran")
    folder = tmp_path / "evil-run"
    folder.mkdir()
    payload = torch.load(os.path.join(run_folder, "last.pt"), weights_only=True)
    payload["trainer"]["extra"] = RunsCode(marker)
    for name in ("best.pt", "last.pt"):
        torch.save(payload, str(folder / name))
    for name in ("config.json", "metrics.csv"):
        (folder / name).write_bytes(open(os.path.join(run_folder, name), "rb").read())
    # The file really runs code when unpickled the unsafe way: this is what the tests below guard.
    torch.load(str(folder / "last.pt"), weights_only=False)
    assert os.path.isdir(marker)
    os.rmdir(marker)
    return str(folder), marker


def test_no_entry_point_runs_code_from_a_checkpoint(evil, tmp_path, capsys):
    folder, marker = evil
    for call in (lambda: DVPVAE.from_checkpoint(folder), lambda: DVPVAE.from_checkpoint(folder + "/last.pt")):
        with pytest.raises(CheckpointError, match="refused"):
            call()
    assert sample_main(["--checkpoint", folder, "--out", str(tmp_path / "s.png"), "--no-progress"]) == 2
    assert eval_main(["--checkpoint", folder, "--limit", "1", "--num-samples", "1", "--no-progress"]) == 2
    assert train_main(["--out", folder, *RUN[:2], "--max-steps", "3", "--no-progress"]) == 2
    assert export_main(["--checkpoint", folder, "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all("refused" in line for line in err), err
    assert not os.path.exists(marker)


def test_from_pretrained_never_unpickles(tmp_path, run_folder):
    marker = str(tmp_path / "code-ran")
    folder = tmp_path / "evil-pretrained"
    DVPVAE.from_checkpoint(run_folder).save_pretrained(str(folder))
    os.remove(folder / "model.safetensors")
    with open(folder / "pytorch_model.bin", "wb") as f:  # the pickled weights other libraries fall back to
        pickle.dump(RunsCode(marker), f)
    with pytest.raises(FileNotFoundError, match="never loaded"):
        DVPVAE.from_pretrained(str(folder))
    torch.save({"w": RunsCode(marker)}, str(folder / "model.safetensors"))  # a pickle under the right name
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        DVPVAE.from_pretrained(str(folder))
    assert not os.path.exists(marker)


# --- dvp-export ----------------------------------------------------------------------------------------------
def test_export_writes_a_loadable_folder_and_a_model_card(run_folder, tmp_path, capsys):
    assert eval_main(["--checkpoint", run_folder, "--split", "test", "--limit", "2", "--num-samples", "3",
                      "--no-progress"]) == 0
    out = str(tmp_path / "shared")
    assert export_main(["--checkpoint", run_folder, "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    exported, ema = DVPVAE.from_pretrained(out), DVPVAE.from_checkpoint(run_folder, ema=True)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), ema.state_dict().values()))
    card = open(os.path.join(out, "README.md")).read()
    val = load_checkpoint(os.path.join(run_folder, "best.pt"))["best_val_loss"]
    assert card.startswith("---\nlibrary_name: dvp_fast\n")
    for text in ("`mnist` preset", "2 steps of batch 10", f"{val:.4f} bits/dim", "exponential moving average",
                 "IWAE with 3 importance samples on 2 images", "DVPVAE.from_pretrained("):
        assert text in card, text
    info = json.load(open(os.path.join(out, "config.json")))["training"]
    assert info["steps"] == 2 and info["evaluations"][0]["num_samples"] == 3
    assert f"{info['evaluations'][0]['nll']:.3f} ± {info['evaluations'][0]['nll_stderr']:.3f} nats" in card
    # Nothing of the user's is overwritten: an existing export needs --force, a foreign file is never replaced.
    assert export_main(["--checkpoint", run_folder, "--out", out]) == 2
    assert export_main(["--checkpoint", run_folder, "--out", out, "--force", "--raw-weights"]) == 0
    assert "raw training weights" in open(os.path.join(out, "README.md")).read()
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    assert export_main(["--checkpoint", run_folder, "--out", out, "--force"]) == 2
    assert "holds notes.txt" in capsys.readouterr().err
