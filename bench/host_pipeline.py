"""The DataLoader path that bench/bench_data.py measures DeviceBatches against (not used by training).

    loader = make_loader(images, 250, seed=0, epoch=3, start=2)   # the batches DeviceBatches(...).batches(3, 2) yields
    host = HostBatches(images, 250, "cuda", seed=0, num_workers=2)  # DeviceBatches' interface, data in host memory

Batch order is DeviceBatches': `dvp_fast.data.batches.epoch_order(n, seed, epoch)`, so the two
paths yield the same batches, mid-epoch starts included (tests/test_host_pipeline.py checks it).
"""
from __future__ import annotations

import torch

from dvp_fast.data.batches import check_batch_args, epoch_order, num_batches, to_float


class _Batches(torch.utils.data.Dataset):
    """Map-style dataset of whole batches, indexed by (epoch, batch): DeviceBatches' order.

    Keys carry the epoch, so persistent workers serve any epoch without being told about it.
    """

    def __init__(self, images, batch_size, seed, shuffle, drop_last, raw):
        self.images, self.batch_size, self.seed, self.shuffle, self.raw = images, batch_size, seed, shuffle, raw
        self.num_batches = num_batches(images.shape[0], batch_size, drop_last)
        self._epoch = None

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, i = key
        if not 0 <= i < self.num_batches:
            raise IndexError(f"batch {i} of an epoch of {self.num_batches}")
        if self._epoch != epoch:  # one permutation per epoch and process
            self._order = epoch_order(self.images.shape[0], self.seed, epoch, self.shuffle)
            self._epoch = epoch
        x = self.images[self._order[i * self.batch_size:(i + 1) * self.batch_size]]
        return x if self.raw else to_float(x)


class EpochSampler(torch.utils.data.Sampler):
    """Yields the (epoch, batch) keys of batches start.. of one epoch; `set_epoch` moves it on."""

    def __init__(self, num_batches: int, epoch: int = 0, start: int = 0):
        self.num_batches = num_batches
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)

    def __iter__(self):
        return ((self.epoch, i) for i in range(self.start, self.num_batches))


def make_loader(images: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                start: int = 0, drop_last: bool = True, num_workers: int = 0, pin_memory: bool = False,
                raw: bool = False, persistent_workers: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over CPU `images` yielding [-1, 1] float batches (uint8 if `raw`).

    It yields exactly the batches `DeviceBatches(images, batch_size, ..., seed).batches(epoch, start)`
    does (same order), so the two paths are interchangeable, mid-run included.
    `loader.sampler.set_epoch(e, start)` points it at another epoch.
    """
    check_batch_args(images, batch_size, drop_last)
    dataset = _Batches(images.cpu(), batch_size, seed, shuffle, drop_last, raw)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=EpochSampler(len(dataset), epoch, start),
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=persistent_workers and num_workers > 0)


class HostBatches:
    """DeviceBatches' interface for data that stays in host memory: one DataLoader (persistent
    workers), uint8 batches copied to `device` (4x less traffic than floats) and converted there."""

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device | str, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, num_workers: int = 0):
        self.device = torch.device(device)
        self.loader = make_loader(images, batch_size, shuffle, seed, 0, 0, drop_last, num_workers,
                                  pin_memory=self.device.type == "cuda", raw=True, persistent_workers=True)

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def batches(self, epoch: int, start: int = 0):
        self.loader.sampler.set_epoch(epoch, start)
        for x in self.loader:
            yield to_float(x.to(self.device, non_blocking=True))
