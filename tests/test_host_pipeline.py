"""bench/host_pipeline.py, the DataLoader path that bench/bench_data.py measures DeviceBatches
against: it yields DeviceBatches' batches, mid-epoch starts and persistent workers included."""
import os
import sys

import numpy as np
import pytest
import torch

from dvp_fast.data import DeviceBatches

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from host_pipeline import HostBatches, make_loader  # noqa: E402


def tagged_images(n: int, shape: tuple, seed: int = 0) -> np.ndarray:
    """Random uint8 images whose first two bytes hold the row index, so rows can be traced."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0], flat[:, 1] = np.arange(n) // 256, np.arange(n) % 256
    return images


def epoch(source, e, start=0):
    return [x.cpu() for x in source.batches(e, start)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_path_equals_device_batches(num_workers):
    images = torch.from_numpy(tagged_images(77, (3, 4, 4)))
    device = DeviceBatches(images, 16, "cpu", seed=3, drop_last=False)
    for start in (0, 2):
        expected = epoch(device, 1, start)
        loader = make_loader(images, 16, seed=3, epoch=1, start=start, drop_last=False, num_workers=num_workers)
        got = list(loader)
        assert len(got) == len(expected) == 5 - start
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    loader.sampler.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(list(loader), epoch(device, 2)))
    host = HostBatches(images, 16, "cpu", seed=3, drop_last=False, num_workers=num_workers)
    assert len(host) == 5
    for e, start in ((1, 1), (2, 0), (1, 0)):  # persistent workers follow the epoch in the keys
        got, expected = epoch(host, e, start), epoch(device, e, start)
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_batch_argument_checks():
    with pytest.raises(ValueError, match="uint8"):
        make_loader(torch.zeros(10, 1, 4, 4), 2)
    with pytest.raises(ValueError, match="exceeds"):
        make_loader(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), 11)
