"""Multi-process training through DDP (gloo, CPU): identical to one process on the joined batch."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dvp_fast import DVPVAE
from dvp_fast.config import train_preset
from dvp_fast.trainer import Trainer
from helpers import SMALL, NoRandomness

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step(model, x, ddp=None):
    model.validate_inputs = False
    trainer = Trainer(model, train_preset("mnist", lr=1e-2), steps_per_epoch=10, ddp_model=ddp)
    with NoRandomness():
        trainer.step(x)
    return [p.detach().clone() for p in model.parameters()]


def _batch():
    return torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DVPVAE.from_preset("mnist", **SMALL)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    params = _one_step(model, _batch()[rank::world], ddp)
    torch.save(params, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_equals_single_process_on_the_joined_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = _one_step(DVPVAE.from_preset("mnist", **SMALL), _batch())
    torch.manual_seed(0)
    before = list(DVPVAE.from_preset("mnist", **SMALL).parameters())
    for rank in range(2):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(ranked, single):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(single, before))  # the step did move the weights


@pytest.mark.slow
def test_torchrun_trains_with_two_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "dvp_fast.train", "--out", str(out), "--max-steps", "2", "--batch-size", "50", "--device", "cpu",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "last.pt").exists() and (out / "metrics.csv").exists()
    assert proc.stdout.count("dvp-train: done") == 1  # only rank 0 reports and writes
