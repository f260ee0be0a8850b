"""The judge of the main job's pictures: a small convolutional classifier of MNIST digits, trained once on
the 4,000 embedded training digits and kept beside the tests (judge.pt). It shares no code with dvp_fast.

    python tests/judge.py train            # (re)train and save judge.pt, print its test accuracy
    python tests/judge.py score RUN_DIR    # the judge's figures for a dvp-train run's best.pt

A sharper judge than softmax regression: it is sure of a clean digit and unsure of a stroke or a blob,
so the share of samples it is sure of tells a readable sample grid from one of strokes.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "judge.pt")
SURE = 0.9  # a sample the judge gives at least this probability counts as a readable digit


class Judge(nn.Module):
    """Two 3x3 convolutions with max-pooling, then a linear layer: about 20k weights."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) of images in [0, 1], (N, 1, 28, 28)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [-1, 1] images -> float in [0, 1]."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else (images.float().clamp(-1, 1) + 1.0) / 2.0


def train(epochs: int = 15, seed: int = 0) -> tuple[Judge, float]:
    """Adam on the embedded training digits, each batch shifted by up to 2 pixels; returns the judge and
    its accuracy on the 500 embedded test digits."""
    from dvp_fast.data import load_dataset

    images, labels = load_dataset("embedded", "train")
    x = _unit(images)
    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], 100):
            rows = order[i:i + 100]
            dy, dx = torch.randint(-2, 3, (2,)).tolist()
            batch = torch.roll(x[rows], shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            F.cross_entropy(judge(batch), labels[rows]).backward()
            opt.step()
    judge.eval()
    test, test_labels = load_dataset("embedded", "test")
    with torch.no_grad():
        accuracy = (judge(_unit(test)).argmax(1) == test_labels).double().mean().item()
    return judge, accuracy


def load() -> Judge:
    judge = Judge()
    judge.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return judge.eval()


@torch.no_grad()
def probabilities(judge: Judge, images: torch.Tensor) -> torch.Tensor:
    return torch.softmax(judge(_unit(images)), dim=1)


@torch.no_grad()
def score_samples(judge: Judge, samples: torch.Tensor) -> dict:
    """Mean confidence, the share of samples it is SURE of, the largest class share and the classes seen."""
    probs = probabilities(judge, samples)
    top = probs.max(1).values
    shares = torch.bincount(probs.argmax(1), minlength=10).double() / probs.shape[0]
    return dict(sample_confidence=top.mean().item(), sample_sure=(top >= SURE).double().mean().item(),
                sample_class_share=shares.max().item(), sample_classes=int((shares > 0.02).sum()))


def score_model(judge: Judge, model, n: int = 500, temperature: float = 1.0, seed: int = 1) -> dict:
    """The judge's figures for a model: reconstruction accuracy on the 500 embedded test digits and the
    sample figures of n samples at `temperature` (after torch.manual_seed(seed))."""
    from dvp_fast.data import load_dataset

    images, labels = load_dataset("embedded", "test")
    torch.manual_seed(seed)
    recon = model.reconstruct(images.float() / 127.5 - 1.0)
    accuracy = (probabilities(judge, recon).argmax(1) == labels).double().mean().item()
    return dict(recon_accuracy=accuracy, **score_samples(judge, model.sample(n, temperature=temperature)))


def score_run(run: str, n: int = 500, temperature: float = 1.0, seed: int = 1) -> dict:
    """score_model for a dvp-train run's best.pt."""
    from dvp_fast import DVPVAE

    return score_model(load(), DVPVAE.from_checkpoint(run).eval(), n, temperature, seed)


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        trained, acc = train()
        torch.save(trained.state_dict(), WEIGHTS)
        print(f"judge: test accuracy {acc:.3f} on the 500 embedded test digits; saved {WEIGHTS}")
    elif sys.argv[1:2] == ["score"]:
        for t in (1.0, 0.8, 0.6):
            print(t, score_run(sys.argv[2], temperature=t))
    else:
        print(__doc__)
