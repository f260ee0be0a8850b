"""Few-step sampling, measured: the teacher's ancestral and DDIM samplers and the distilled students.

    python bench/distill_quality.py --checkpoint runs/mnist-full/distilled.pt --data-dir ../shared/data/mnist

For 1, 2, 4, 8 and 50 steps of each sampler (the students where the checkpoint has one), n samples:
  (a) energy distance of the pseudo-inputs u to held-out real ones f(x) (Euclidean, V-statistic):
      to the validation split's (5,000 training-file images never trained on: the distribution the
      prior was fitted to) and, second, to the whole test split's (10,000). Not to a part of the test
      split: its two halves come from different writers, and each half's f(x) alone sits 0.017 to
      0.023 (U-statistic) from the validation ones, its first 2,000 images' 0.025, against 0.001 for
      the whole; this script used to take those first 2,000, a shift larger than any sampler's gap,
      which it amplified;
  (b) the teacher's own bound -log r_hat(u) on the samples (nats, a grid of `--grid` times);
  (c) on the decoded images, the confidence (mean max probability) and class balance (largest
      class share, classes above 2 %) of a fixed MNIST classifier, a softmax regression trained once
      on 20,000 training images and kept beside this script (bench/mnist_classifier.pt; see
      `train_classifier`);
  (d) seconds per 1000 images (u and the decoder) on this machine.
The 50-step teacher and each student run `--repeats` times (seeds 1..R); the teacher runs R more
times (seeds R+1..2R) as a control: a sampler exactly as good as the teacher. A student is within
the teacher's run-to-run spread on a measure when its mean over the R runs lies in the range of
the teacher's R runs; the control shows how often a sampler as good as the teacher passes that.
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
from sampler_quality import energy_distance, mean_distance, prior_nll  # noqa: E402

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


MEASURES = ("energy_distance", "energy_distance_test", "confidence")


def spread_table(rows: list[dict], repeats: int, student_steps: list[int]) -> list[str]:
    """Markdown: the range of (a) and (c) over the runs of the 50-step teacher (seeds 1..R), of its
    control (seeds R+1..2R) and of each student (seeds 1..R), and whether each one's mean lies
    within the teacher's range."""
    def values(sampler, steps, seeds, key):
        return [r[key] for r in rows if r["sampler"] == sampler and r["steps"] == steps and r["seed"] in seeds]

    first, second = range(1, repeats + 1), range(repeats + 1, 2 * repeats + 1)
    teacher = {key: values("ancestral", 50, first, key) for key in MEASURES}
    lines = ["", f"Run-to-run spread (min to max over {repeats} runs) and whether a sampler's mean lies within the "
             f"range of the 50-step teacher's runs (seeds 1 to {repeats}):", "",
             "| sampler | steps | seeds | energy distance to val u | mean within | energy distance to test u | "
             "mean within | confidence | mean within |", "|---|---|---|---|---|---|---|---|---|"]
    samplers = [("teacher", "ancestral", 50, first), ("teacher again (control)", "ancestral", 50, second)] + \
        [("student", "student", k, first) for k in student_steps]
    for label, sampler, steps, seeds in samplers:
        cells = []
        for key in MEASURES:
            got, digits = values(sampler, steps, seeds, key), 3 if key == "confidence" else 4
            mean, (lo, hi) = sum(got) / len(got), (min(teacher[key]), max(teacher[key]))
            cells += [f"{min(got):.{digits}f} to {max(got):.{digits}f}",
                      "" if label == "teacher" else ("yes" if lo <= mean <= hi else "no")]
        lines.append(f"| {label} | {steps} | {seeds.start} to {seeds.stop - 1} | " + " | ".join(cells) + " |")
    return lines


@torch.no_grad()
def measure(model, classifier, references, n, steps, sampler, seed, grid) -> dict:
    torch.manual_seed(seed)
    start = time.perf_counter()
    u = model.sample_pseudoinputs(n, steps=steps, sampler=sampler)
    images = model._decode(u, 1.0, n)
    seconds = time.perf_counter() - start
    return dict(sampler=sampler, steps=steps, seed=seed, seconds_per_1000=seconds * 1000 / n,
                **scores(model, classifier, references, u, images, grid))


def scores(model, classifier, references, u, images, grid) -> dict:
    """(a) to both references, (b) and (c) of pseudo-inputs u and their images."""
    return dict(energy_distance=references["val"].energy_distance(u),
                energy_distance_test=references["test"].energy_distance(u), prior_nll=prior_nll(model, u, grid),
                **classify(classifier, images))


class Reference:
    """Held-out real pseudo-inputs f(x) of one split, with their own mean distance computed once."""

    def __init__(self, model, split: str, data_dir: str):
        with torch.no_grad():
            self.u = model.pseudo.mean(datasets.load_images("mnist", split, root=data_dir).float() / 127.5 - 1)
        self.spread = mean_distance(self.u, self.u)

    def energy_distance(self, u: torch.Tensor) -> float:
        return energy_distance(u, self.u, self.spread)


def held_out_references(model, data_dir: str) -> dict:
    """f(x) of every validation and every test image: the real pseudo-inputs samples are compared with."""
    return {split: Reference(model, split, data_dir) for split in ("val", "test")}


def data_row(model, classifier, references, data_dir: str, n: int, grid: int) -> dict:
    """Real pseudo-inputs u ~ r(u|x) of n random training images, scored like a sampler (their images as
    they are)."""
    train = datasets.load_images("mnist", "train", root=data_dir)
    torch.manual_seed(0)
    images = train[torch.randperm(train.shape[0])[:n]].float() / 127.5 - 1
    with torch.no_grad():
        u = model.pseudo.sample(model.pseudo.mean(images))[0]
    return dict(sampler="data: u ~ r(u|x) of training images", steps=None, seed=0, seconds_per_1000=None,
                **scores(model, classifier, references, u, images, grid))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint with students (dvp-distill's output)")
    p.add_argument("--data-dir", required=True, help="the MNIST IDX files (held-out f(x), the classifier)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 50])
    p.add_argument("--grid", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5,
                   help="runs of each student and of the 50-step teacher (seeds 1..R), and of its control (R+1..2R)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default=None, help="the results' file stem (default: distill-<date>)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_checkpoint(args.checkpoint)
    payload = load_checkpoint(path)
    model = DVPVAE.from_checkpoint(path).eval()
    classifier = torch.load(CLASSIFIER, weights_only=True) if os.path.exists(CLASSIFIER) else \
        train_classifier(args.data_dir)
    references = held_out_references(model, args.data_dir)
    rows = [data_row(model, classifier, references, args.data_dir, args.n, args.grid)]
    print(rows[-1], flush=True)
    for sampler in ("ancestral", "ddim", "student"):
        for steps in args.steps:
            if sampler == "student" and str(steps) not in model.u_students:
                continue
            rows.append(measure(model, classifier, references, args.n, steps, sampler, 1, args.grid))
            print(rows[-1], flush=True)
    # Run-to-run spreads: every student and the 50-step teacher with other draws, then the teacher's control.
    students = [k for k in args.steps if str(k) in model.u_students]
    repeated = [(seed, "ancestral", 50) for seed in range(2, args.repeats + 1)] + \
        [(seed, "student", k) for seed in range(2, args.repeats + 1) for k in students] + \
        [(seed, "ancestral", 50) for seed in range(args.repeats + 1, 2 * args.repeats + 1)]
    for seed, sampler, steps in repeated:
        rows.append(measure(model, classifier, references, args.n, steps, sampler, seed, args.grid))
        print(rows[-1], flush=True)
    meta = dict(checkpoint=path, step=payload.get("step"), distill=payload.get("distill"), n=args.n, grid=args.grid,
                references={split: int(ref.u.shape[0]) for split, ref in references.items()}, repeats=args.repeats,
                classifier_test_accuracy=classifier["test_accuracy"],
                device=f"CPU ({platform.processor() or 'x86_64'}, {os.cpu_count()} cores, "
                       f"{torch.get_num_threads()} threads)", torch=torch.__version__,
                date=datetime.date.today().isoformat())
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"distill-{meta['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    lines = ["# Few-step sampling: teacher samplers and distilled students", "",
             f"Checkpoint `{path}` (teacher step {meta['step']}), {args.n} samples per row; energy distance "
             f"(V-statistic, Euclidean) to f(x) of all {meta['references']['val']} validation images (never trained "
             f"on) and of all {meta['references']['test']} test images; prior NLL on a {args.grid}-point grid; "
             f"classifier test accuracy {meta['classifier_test_accuracy']:.3f}; "
             f"{meta['device']}, torch {meta['torch']}, {meta['date']}.", "",
             "| sampler | steps | seed | energy distance to val u | to test u | prior NLL (nats) | "
             "classifier confidence | largest class share | classes > 2 % | s / 1000 images |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        secs = "" if r["seconds_per_1000"] is None else f"{r['seconds_per_1000']:.2f}"
        lines.append(f"| {r['sampler']} | {r['steps'] or ''} | {r['seed']} | {r['energy_distance']:.4f} | "
                     f"{r['energy_distance_test']:.4f} | {r['prior_nll']:.2f} | {r['confidence']:.3f} | "
                     f"{r['largest_class_share']:.3f} | {r['classes_above_2pct']} | {secs} |")
    lines += spread_table(rows, args.repeats, students)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
