"""Which quantity a few-step student should predict: eps or x (bench/results/distill-parameterisation-*.md).

    python bench/experiments/distill_parameterisation.py --checkpoint runs/mnist-full --steps 1 --predicts x --lr 1e-3

Fits one student to the teacher's 50-step ancestral samples by energy distance and prints its
distance to held-out teacher samples every 25 iterations, with the share of x_hat on the clamp.
"""
import argparse
import copy
import time

import torch

from dvp_fast import DVPVAE
from dvp_fast.distill import energy_distance, student_sample, teacher_samples


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--predicts", choices=("eps", "x"), default="eps")
    p.add_argument("--straight-through", action="store_true", help="pass x_hat's gradient through its clamp")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--iterations", type=int, default=150)
    args = p.parse_args()
    torch.set_num_threads(1)
    prior = DVPVAE.from_checkpoint(args.checkpoint).eval().u_prior
    torch.manual_seed(0)
    start = time.time()
    targets, held_out = teacher_samples(prior, 2048), teacher_samples(prior, 1024)
    student = copy.deepcopy(prior.unet).train().requires_grad_(True)

    def score():
        with torch.no_grad():
            u = student_sample(prior, student.eval(), 1024, args.steps, None, args.predicts)
        student.train()
        return float(energy_distance(u, held_out)), float((u.abs() > 0.99).float().mean())

    print("start: energy distance %.4f, share on the clamp %.4f" % score(), flush=True)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.iterations)
    generator = torch.Generator().manual_seed(1)
    for i in range(args.iterations):
        rows = torch.randint(0, targets.shape[0], (256,), generator=generator)
        u = student_sample(prior, student, 256, args.steps, generator, args.predicts, args.straight_through)
        loss = energy_distance(u, targets[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (i + 1) % 25 == 0:
            print("%d: energy distance %.4f, share on the clamp %.4f, %.0f s" % (i + 1, *score(), time.time() - start),
                  flush=True)
    print("noise floor (a second teacher draw): %.4f" % float(energy_distance(teacher_samples(prior, 1024), held_out)))


if __name__ == "__main__":
    main()
