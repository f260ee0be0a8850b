"""Why the 3,300-step teacher's 4-step students lose classifier confidence, and what sees it without a classifier.

    python bench/experiments/four_step_diagnosis.py --checkpoint runs/mnist-long/distilled.pt \
        --data-dir ../shared/data/mnist --arms-dir runs/mnist-long/confidence-arms \
        [--confidence bench/results/distill-2026-12-03-four-step-confidence.json ...] [--out FILE.md]

Every 4-step student fitted to this teacher (four_step_confidence.py's arms, saved with --save-dir) has a mean
classifier confidence on its decoded images about 0.01 below the 50-step teacher's, while its energy distance
to the teacher's samples in u is small. This measures, on 5,000 samples of the teacher and of the checkpoint's
4-step student (seeds 1 to 5, 1,000 each, decoded as distill_quality.py's `measure` does), how the confidence
gap splits into a change of class shares and a change of confidence within a class, and the per-coordinate
standard deviations of u; then, for every saved arm (4,096 samples, torch.manual_seed(7)) against 4,096 teacher
samples (torch.manual_seed(12345); a second 4,096 of the teacher as the noise floor), measures that need no
decoding: the energy distance in u and in whitened u (distill.Whitening of the teacher samples), the variance
along the teacher's 10 smallest and 10 largest principal directions (over the teacher's), the Gaussian-kernel MMD
(distill.gaussian_mmd) at 1/8, 1/4, 1/2 and 1 times the teacher's median distance, and the mean confidence of a
softmax regression on u (f(x) of 20,000 labelled training images, 300 Adam steps: a classifier of pseudo-inputs,
not the benchmark's). Each arm's measured image confidence (mean of 10 runs) comes from the --confidence files.
"""
import copy
import glob
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distill_quality import CLASSIFIER, experiment_args, experiment_parser  # noqa: E402

from dvp_fast import DVPVAE  # noqa: E402
from dvp_fast import data as datasets  # noqa: E402
from dvp_fast.distill import Whitening, energy_distance, gaussian_mmd, median_distance, student_sample  # noqa: E402
from dvp_fast.distill import teacher_samples  # noqa: E402

N = 4096
MMD_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def class_split(model, classifier, sampler, steps):
    """Class shares and per-class confidence of 5 runs of 1,000 (seeds 1 to 5)."""
    probs = []
    for seed in range(1, 6):
        torch.manual_seed(seed)
        u = model.sample_pseudoinputs(1000, steps=steps, sampler=sampler)
        images = model._decode(u, 1.0, 1000)
        x = ((images.float() + 1) / 2).flatten(1)
        probs.append(torch.softmax(x @ classifier["w"] + classifier["b"], 1))
    p = torch.cat(probs).double()
    cls, conf = p.argmax(1), p.max(1).values
    shares = torch.bincount(cls, minlength=10).double() / len(cls)
    per_class = torch.stack([conf[cls == c].mean() for c in range(10)])
    return dict(confidence=float(conf.mean()), shares=shares.tolist(), per_class=per_class.tolist(),
                below_half=float((conf < 0.5).double().mean()))


def u_classifier(model, data_dir):
    images, labels = datasets.load_dataset("mnist", "train", root=data_dir)
    u = model.pseudo.mean(images[:20000].float() / 127.5 - 1).flatten(1)
    torch.manual_seed(0)
    w, b = torch.zeros(u.shape[1], 10, requires_grad=True), torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(300):
            opt.zero_grad()
            (F.cross_entropy(u @ w + b, labels[:20000]) + 1e-4 * w.pow(2).sum()).backward()
            opt.step()
    return w.detach(), b.detach()


def u_measures(u, ref, whitening, eigen, bandwidths, uclf) -> dict:
    flat = u.flatten(1).double()
    values, vectors = eigen
    along = torch.einsum("ij,jk,ki->i", vectors.T, torch.cov(flat.T), vectors) / values
    w, b = uclf
    return dict(energy_distance=float(energy_distance(u, ref)),
                whitened_energy_distance=float(energy_distance(whitening(u), whitening(ref))),
                variance_smallest_10=float(along[:10].mean()), variance_largest_10=float(along[-10:].mean()),
                mmd_1e4=[1e4 * float(gaussian_mmd(u, ref, (h,))) for h in bandwidths],
                u_classifier_confidence=float(torch.softmax(u.flatten(1) @ w + b, 1).max(1).values.mean()))


def main():
    p = experiment_parser(__doc__)
    p.add_argument("--arms-dir", required=True)
    p.add_argument("--confidence", nargs="*", default=[], help="four_step_confidence.py outputs (JSON)")
    p.add_argument("--out", default="bench/results/distill-four-step-diagnosis.md")
    args = experiment_args(p)
    torch.set_num_threads(args.threads)
    model = DVPVAE.from_checkpoint(args.checkpoint).eval()
    prior, classifier = model.u_prior, torch.load(CLASSIFIER, weights_only=True)
    measured = {}
    for path in args.confidence:
        with open(path) as f:
            for name, r in json.load(f)["results"].items():
                measured[name.removeprefix("4-step student, ").replace(" ", "_").replace(",", "")] = \
                    r["summary"]["confidence"]["mean"]
    with torch.no_grad():
        teacher = class_split(model, classifier, "ancestral", 50)
        student = class_split(model, classifier, "student", 4)
        mix = sum((s - t) * c for s, t, c in zip(student["shares"], teacher["shares"], teacher["per_class"]))
        within = sum(s * (c - d) for s, c, d in zip(student["shares"], student["per_class"], teacher["per_class"]))
        torch.manual_seed(12345)
        ref, second = teacher_samples(prior, N), teacher_samples(prior, N)
        flat = ref.flatten(1).double()
        eigen = torch.linalg.eigh(torch.cov(flat.T))
        whitening, median = Whitening(ref), median_distance(ref)
        bandwidths = [f * median for f in MMD_FRACTIONS]
        uclf = u_classifier(model, args.data_dir)
        rows = {"teacher, a second draw": u_measures(second, ref, whitening, eigen, bandwidths, uclf)}
        paths = sorted(glob.glob(os.path.join(args.arms_dir, "*.pt")))
        for path in paths:
            net = copy.deepcopy(model.u_students["4"])
            net.load_state_dict(torch.load(path, weights_only=True))
            torch.manual_seed(7)
            name = os.path.basename(path)[:-3]
            rows[name] = u_measures(student_sample(prior, net, N, 4), ref, whitening, eigen, bandwidths, uclf)
            print(name, rows[name], flush=True)
        torch.manual_seed(7)
        rows["the checkpoint's 4-step student"] = u_measures(student_sample(prior, model.u_students["4"], N, 4), ref,
                                                             whitening, eigen, bandwidths, uclf)
    lines = [f"Checkpoint `{args.checkpoint}`; torch {torch.__version__}.", "",
             f"Decoded images, 5 runs of 1,000: teacher confidence {teacher['confidence']:.4f} (below 0.5: "
             f"{teacher['below_half']:.3f}), the checkpoint's 4-step student {student['confidence']:.4f} "
             f"({student['below_half']:.3f}); of the gap, {mix:+.4f} from the class shares and {within:+.4f} from "
             "the confidence within a class.", "",
             "| class | " + " | ".join(str(c) for c in range(10)) + " |", "|---" * 11 + "|",
             "| teacher share | " + " | ".join(f"{v:.3f}" for v in teacher["shares"]) + " |",
             "| student share | " + " | ".join(f"{v:.3f}" for v in student["shares"]) + " |",
             "| teacher confidence | " + " | ".join(f"{v:.3f}" for v in teacher["per_class"]) + " |",
             "| student confidence | " + " | ".join(f"{v:.3f}" for v in student["per_class"]) + " |", "",
             f"Against 4,096 teacher samples (median distance {median:.3f}); MMD x 1e4 at "
             + ", ".join(f"{f:g}" for f in MMD_FRACTIONS) + " times it:", "",
             "| sampler | image confidence (10 runs) | energy distance | whitened | variance, 10 smallest / 10 largest "
             "directions | MMD x 1e4 | u-classifier confidence |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        conf = measured.get(name, "")
        lines.append(f"| {name} | {conf if conf == '' else f'{conf:.4f}'} | {r['energy_distance']:.5f} | "
                     f"{r['whitened_energy_distance']:.4f} | {r['variance_smallest_10']:.2f} / "
                     f"{r['variance_largest_10']:.2f} | " + ", ".join(f"{v:.2f}" for v in r["mmd_1e4"]) +
                     f" | {r['u_classifier_confidence']:.4f} |")
    known = [(measured[n], r) for n, r in rows.items() if n in measured]
    if len(known) > 2:
        lines += ["", "Rank correlation (Spearman) with the image confidence over the arms measured: " + ", ".join(
            f"{key} {spearman([c for c, _ in known], [f(r) for _, r in known]):+.2f}" for key, f in (
                ("energy distance", lambda r: r["energy_distance"]),
                ("whitened", lambda r: r["whitened_energy_distance"]),
                ("MMD at 1/4", lambda r: r["mmd_1e4"][1]),
                ("u-classifier confidence", lambda r: r["u_classifier_confidence"])))]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out[:-3] + ".json", "w") as f:
        json.dump(dict(teacher=teacher, student=student, mix=mix, within=within, median=median, rows=rows,
                       measured=measured), f, indent=1)
    print("\n".join(lines))


def spearman(a, b):
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r
    ra, rb = ranks(a), ranks(b)
    return statistics.correlation(ra, rb)


if __name__ == "__main__":
    main()
