"""Input pipeline throughput: batches per second of `DeviceBatches` (whole dataset on the device)
against the DataLoader path (`HostBatches` of bench/host_pipeline.py: host uint8, copied and
converted on the device).

    python bench/bench_data.py --device cuda [--quick]

Random uint8 data of MNIST's and CIFAR-10's shapes, the presets' batch sizes. Each repeat is one
full epoch (worker start-up included where the loader has workers), the device synchronised before
the clock is read; the value is the median over repeats, the spread (max - min) / median.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dvp_fast.data import DeviceBatches

try:
    from .host_pipeline import HostBatches
except ImportError:  # run as a script from bench/
    from host_pipeline import HostBatches

SHAPES = {"mnist": ((1, 28, 28), 250, 60000), "cifar10": ((3, 32, 32), 128, 50000)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epoch_rates(source, device: torch.device, repeats: int) -> list[float]:
    """Batches per second of `repeats` epochs, after one warm-up epoch."""
    rates = []
    for epoch in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        count = 0
        for x in source.batches(epoch):
            count += 1
        _sync(device)
        if epoch > 0:
            rates.append(count / (time.perf_counter() - t0))
    return rates


def bench_pipeline(device: str, quick: bool) -> list[dict]:
    """Rows {"section", "name", "value", "unit"}: median batches/s and its spread per pipeline."""
    dev = torch.device(device)
    repeats = 3 if quick else 7
    workers = max(1, min(4, (os.cpu_count() or 2) - 1))
    rows = []
    for dataset, (shape, batch_size, full_n) in SHAPES.items():
        n = 10_000 if quick else full_n
        images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        sources = {
            "DeviceBatches": lambda: DeviceBatches(images, batch_size, dev, seed=0),
            "HostBatches (DataLoader, 0 workers)": lambda: HostBatches(images, batch_size, dev, seed=0),
            f"HostBatches (DataLoader, {workers} workers)":
                lambda: HostBatches(images, batch_size, dev, seed=0, num_workers=workers),
        }
        for label, make in sources.items():
            rates = _epoch_rates(make(), dev, repeats)
            median = statistics.median(rates)
            name = f"{dataset}-shaped {label}, batch {batch_size}, N={n}, {dev.type}"
            rows.append({"section": "data", "name": name, "value": median, "unit": "batch/s"})
            rows.append({"section": "data", "name": name + " spread", "value": 100 * (max(rates) - min(rates)) / median,
                         "unit": "%"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# torch {torch.__version__}, device {name}")
    for row in bench_pipeline(args.device, args.quick):
        print(f"{row['section']:6s} {row['name']:80s} {row['value']:12.1f} {row['unit']}")


if __name__ == "__main__":
    main()
