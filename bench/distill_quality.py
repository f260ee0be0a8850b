"""Few-step sampling, measured: the teacher's ancestral and DDIM samplers and the distilled students.

    python bench/distill_quality.py --checkpoint runs/mnist-full/distilled.pt --data-dir ../shared/data/mnist

For 1, 2, 4, 8 and 50 steps of each sampler (the students where the checkpoint has one), n samples:
  (a) energy distance of the pseudo-inputs u to held-out real ones f(x) of the test split
      (Euclidean, V-statistic), with two 50-step teacher runs of other draws as the noise floor;
  (b) the teacher's own bound -log r_hat(u) on the samples (nats, a grid of `--grid` times);
  (c) on the decoded images, the confidence (mean max probability) and class balance (largest
      class share, classes above 2 %) of a fixed MNIST classifier, a softmax regression trained once
      on 20,000 training images and kept beside this script (bench/mnist_classifier.pt; see
      `train_classifier`);
  (d) seconds per 1000 images (u and the decoder) on this machine.
Results: bench/results/distill-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler_quality import energy_distance, prior_nll  # noqa: E402

from dvp_fast import DVPVAE  # noqa: E402
from dvp_fast import data as datasets  # noqa: E402
from dvp_fast.checkpoint import load_checkpoint, resolve_checkpoint  # noqa: E402

CLASSIFIER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist_classifier.pt")


def train_classifier(data_dir: str, path: str = CLASSIFIER) -> dict:
    """Softmax regression on 20,000 MNIST training images (Adam, 300 full-batch steps); saved once."""
    images, labels = datasets.load_dataset("mnist", "train", root=data_dir)
    x, y = images[:20000].flatten(1).float() / 255.0, labels[:20000]
    torch.manual_seed(0)
    w, b = torch.zeros(784, 10, requires_grad=True), torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        (F.cross_entropy(x @ w + b, y) + 1e-4 * w.pow(2).sum()).backward()
        opt.step()
    test, test_labels = datasets.load_dataset("mnist", "test", root=data_dir)
    accuracy = ((test.flatten(1).float() / 255.0 @ w + b).argmax(1) == test_labels).double().mean().item()
    state = dict(w=w.detach(), b=b.detach(), test_accuracy=accuracy)
    torch.save(state, path)
    return state


def classify(state: dict, images: torch.Tensor) -> dict:
    """Confidence and class balance of the fixed classifier on images in [-1, 1]."""
    x = ((images.float().cpu() + 1.0) / 2.0).flatten(1)
    probs = torch.softmax(x @ state["w"] + state["b"], dim=1)
    shares = torch.bincount(probs.argmax(1), minlength=10).double() / probs.shape[0]
    return dict(confidence=probs.max(1).values.mean().item(), largest_class_share=shares.max().item(),
                classes_above_2pct=int((shares > 0.02).sum()))


def spread_table(rows: list[dict], repeated: list[tuple[str, int]]) -> list[str]:
    """Markdown: the range over seeds of (a) and (c) per repeated sampler, and whether each student's
    range lies within the 50-step teacher's."""
    def span(sampler, steps, key):
        values = [r[key] for r in rows if r["sampler"] == sampler and r["steps"] == steps]
        return min(values), max(values), len(values)

    teacher = {key: span("ancestral", 50, key) for key in ("energy_distance", "confidence")}
    lines = ["", "Run-to-run spread (min to max over the seeds) and whether a student's whole range lies within "
             "the 50-step teacher's:", "",
             "| sampler | steps | runs | energy distance | within the teacher's | confidence | within the teacher's |",
             "|---|---|---|---|---|---|---|"]
    for sampler, steps in repeated:
        cells = []
        for key in ("energy_distance", "confidence"):
            lo, hi, n = span(sampler, steps, key)
            inside = teacher[key][0] <= lo and hi <= teacher[key][1]
            cells += [f"{lo:.4f} to {hi:.4f}" if key == "energy_distance" else f"{lo:.3f} to {hi:.3f}",
                      "" if sampler == "ancestral" else ("yes" if inside else "no")]
        lines.append(f"| {sampler} | {steps} | {n} | " + " | ".join(cells) + " |")
    return lines


@torch.no_grad()
def measure(model, classifier, held_out, n, steps, sampler, seed, grid) -> dict:
    torch.manual_seed(seed)
    start = time.perf_counter()
    u = model.sample_pseudoinputs(n, steps=steps, sampler=sampler)
    images = model._decode(u, 1.0, n)
    seconds = time.perf_counter() - start
    return dict(sampler=sampler, steps=steps, seed=seed, energy_distance=energy_distance(u, held_out),
                prior_nll=prior_nll(model, u, grid), seconds_per_1000=seconds * 1000 / n,
                **classify(classifier, images))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint with students (dvp-distill's output)")
    p.add_argument("--data-dir", required=True, help="the MNIST IDX files (held-out f(x), the classifier)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 50])
    p.add_argument("--grid", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3,
                   help="runs (seeds 1..R) of the 50-step teacher and of each student: their spread")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_checkpoint(args.checkpoint)
    payload = load_checkpoint(path)
    model = DVPVAE.from_checkpoint(path).eval()
    classifier = torch.load(CLASSIFIER, weights_only=True) if os.path.exists(CLASSIFIER) else \
        train_classifier(args.data_dir)
    test = datasets.load_images("mnist", "test", root=args.data_dir)[:2 * args.n].float() / 127.5 - 1
    with torch.no_grad():
        held_out = model.pseudo.mean(test)
        real_images = test[:args.n]
        torch.manual_seed(0)
        u_real = model.pseudo.sample(model.pseudo.mean(
            datasets.load_images("mnist", "val", root=args.data_dir)[:args.n].float() / 127.5 - 1))[0]
    rows = [dict(sampler="data: u ~ r(u|x) of val images", steps=None, seed=0,
                 energy_distance=energy_distance(u_real, held_out), prior_nll=prior_nll(model, u_real, args.grid),
                 seconds_per_1000=None, **classify(classifier, real_images))]
    print(rows[-1], flush=True)
    for sampler in ("ancestral", "ddim", "student"):
        for steps in args.steps:
            if sampler == "student" and str(steps) not in model.u_students:
                continue
            rows.append(measure(model, classifier, held_out, args.n, steps, sampler, 1, args.grid))
            print(rows[-1], flush=True)
    # Run-to-run spreads: the 50-step teacher and every student again, with other draws.
    repeated = [("ancestral", 50)] + [("student", k) for k in args.steps if str(k) in model.u_students]
    for seed in range(2, args.repeats + 1):
        for sampler, steps in repeated:
            rows.append(measure(model, classifier, held_out, args.n, steps, sampler, seed, args.grid))
            print(rows[-1], flush=True)
    meta = dict(checkpoint=path, step=payload.get("step"), distill=payload.get("distill"), n=args.n, grid=args.grid,
                classifier_test_accuracy=classifier["test_accuracy"],
                device=f"CPU ({platform.processor() or 'x86_64'}, {os.cpu_count()} cores, "
                       f"{torch.get_num_threads()} threads)", torch=torch.__version__,
                date=datetime.date.today().isoformat())
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"distill-{meta['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    lines = ["# Few-step sampling: teacher samplers and distilled students", "",
             f"Checkpoint `{path}` (teacher step {meta['step']}), {args.n} samples per row, prior NLL on a "
             f"{args.grid}-point grid; classifier test accuracy {meta['classifier_test_accuracy']:.3f}; "
             f"{meta['device']}, torch {meta['torch']}, {meta['date']}.", "",
             "| sampler | steps | seed | energy distance to held-out u | prior NLL (nats) | classifier confidence | "
             "largest class share | classes > 2 % | s / 1000 images |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        secs = "" if r["seconds_per_1000"] is None else f"{r['seconds_per_1000']:.2f}"
        lines.append(f"| {r['sampler']} | {r['steps'] or ''} | {r['seed']} | {r['energy_distance']:.4f} | "
                     f"{r['prior_nll']:.2f} | {r['confidence']:.3f} | {r['largest_class_share']:.3f} | "
                     f"{r['classes_above_2pct']} | {secs} |")
    lines += spread_table(rows, repeated)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
