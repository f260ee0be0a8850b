"""Many runs of 1,000: how often a sampler passes the issue's test of being within the teacher's spread.

    python bench/experiments/many_runs.py --checkpoint runs/mnist-full/distilled.pt --data-dir ../shared/data/mnist \
        [--students NAME=FILE ...] [--runs 100]

bench/distill_quality.py calls a student within the teacher's run-to-run spread on the energy distance to
held-out f(x) when the mean of its 10 runs of 1,000 (seeds 1 to 10) lies in the range of the 50-step teacher's
10 runs (seeds 1 to 10). That is one draw of a noisy test. This draws `--runs` runs of 1,000 (seeds 1 to R) of
the teacher (50 ancestral steps), the checkpoint's 4- and 8-step students and 4-step student networks saved by
four_step_objectives.py --save-dir (state dicts, NAME=FILE), scores each run as distill_quality.py does
(V-statistic energy distance to all validation and to all test f(x)), and estimates the test's pass rate: the
share of 10,000 pairs of a random 10 of the sampler's runs and a random 10 of the teacher's (each without
replacement) where the sampler's mean lies within the teacher's range (for the teacher itself, two disjoint
random sets of 10 of its runs: the rate at which a sampler exactly as good passes). `--reuse` takes the runs of
an earlier call's samplers of the same name (the same seeds draw the same runs) where its teacher's weights are
the same. Also four_step_tail.py's distances of 10,000 samples (torch.manual_seed(7)) to their nearest validation
f(x). With `--confidence`, each run's pseudo-inputs are also decoded (after them, under the same seed, as
distill_quality.py's `measure` does, so that seeds 1 to 10 give its runs) and scored on the fixed classifier's
confidence, with its pass rate beside the distances'.
"""
import json
import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_quality import CLASSIFIER, classify, experiment_args, experiment_parser, load_experiment  # noqa: E402

from four_step_tail import tail  # noqa: E402

from dvp_fast.distill import student_sample  # noqa: E402

PAIRS = 10000
GROUP = 10
MEASURES = {"val": "to val f(x)", "test": "to test f(x)", "confidence": "confidence"}


def scored_runs(sample, seeds, references, decode=None, classifier=None, n: int = 1000) -> dict:
    """Per seed, after torch.manual_seed(seed): n pseudo-inputs u = sample(n), their energy distances to each
    reference and, with `decode` (then after u, under the same seed), the classifier's confidence on decode(u)."""
    scores = {split: [] for split in references}
    if decode is not None:
        scores["confidence"] = []
    for seed in seeds:
        torch.manual_seed(seed)
        u = sample(n)
        for split, reference in references.items():
            scores[split].append(reference.energy_distance(u))
        if decode is not None:
            scores["confidence"].append(classify(classifier, decode(u))["confidence"])
    return scores


def pass_rate(runs: list[float], teacher: list[float], same: bool, rng: random.Random) -> float:
    hits = 0
    for _ in range(PAIRS):
        if same:
            picked = rng.sample(range(len(teacher)), 2 * GROUP)
            mine, theirs = [teacher[i] for i in picked[:GROUP]], [teacher[i] for i in picked[GROUP:]]
        else:
            mine, theirs = rng.sample(runs, GROUP), rng.sample(teacher, GROUP)
        hits += min(theirs) <= statistics.mean(mine) <= max(theirs)
    return hits / PAIRS


def summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=20)
    return dict(mean=statistics.mean(values), sd=statistics.stdev(values), q05=q[0], median=statistics.median(values),
                q95=q[-1], lo=min(values), hi=max(values))


def table(results: dict, scores: dict) -> list[str]:
    """Markdown: per sampler and split, the mean of the runs, the central 90 % of them, the mean of seeds 1 to 10
    (distill_quality.py's runs) and the pass rate; then the nearest-neighbour tail."""
    measured = [key for key in MEASURES if all(key in r for r in results.values())]
    header = "| sampler | " + " | ".join(f"{MEASURES[key]}: mean (sd) | 5 to 95 % of runs | seeds 1-10 | passes"
                                        for key in measured)
    lines = [header + " | nearest val f(x): 99.9 % | max | beyond 1.5, of 10,000 |",
             "|---|" + "---|---|---|---|" * len(measured) + "---|---|---|"]
    for name, r in results.items():
        cells = []
        for key in measured:
            got, d = r[key], 3 if key == "confidence" else 4
            cells += [f"{got['mean']:.{d + 1}f} ({got['sd']:.{d + 1}f})", f"{got['q05']:.{d}f} to {got['q95']:.{d}f}",
                      f"{statistics.mean(scores[name][key][:GROUP]):.{d}f}", f"{100 * got['pass_rate']:.0f} %"]
        t = r["tail"]
        cells += [f"{t['nn_quantiles'][-1]:.2f}", f"{t['nn_max']:.2f}", str(t["beyond_1_5"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_table(paths: list[str], out: str) -> None:
    results, scores, lines = {}, {}, []
    for path in paths:
        with open(path) as f:
            got = json.load(f)
        lines.append(f"- `{os.path.basename(path)}`: checkpoint `{got['checkpoint']}`, {got['runs']} runs, "
                     f"torch {got['torch']}")
        for name, r in got["results"].items():
            if name.startswith("teacher") and name in results:
                continue  # the same teacher runs, reused
            label = name if name.startswith("teacher") else f"{os.path.basename(got['checkpoint'])}: {name}"
            results[label], scores[label] = r, got["scores"][name]
    with open(out, "w") as f:
        f.write("\n".join(lines + [""] + table(results, scores)) + "\n")


def main():
    p = experiment_parser(__doc__, write_table)
    p.add_argument("--students", nargs="*", default=[], metavar="NAME=FILE")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--out", default="bench/results/distill-many-runs.json")
    p.add_argument("--reuse", default=None, metavar="JSON",
                   help="an earlier output of this script: its runs of samplers of the same name are taken, not drawn "
                        "again (the same seeds give the same runs)")
    p.add_argument("--confidence", action="store_true",
                   help="also decode each run and score the fixed classifier's confidence (slower)")
    args = experiment_args(p)
    if args.runs < 2 * GROUP:
        p.error(f"--runs must be at least {2 * GROUP} (the teacher's pass rate draws two disjoint groups of {GROUP}), "
                f"got {args.runs}")
    model, references = load_experiment(args)
    prior = model.u_prior
    samplers = {"teacher, 50 steps": lambda n: model.sample_pseudoinputs(n, steps=50, sampler="ancestral"),
                "checkpoint's 4-step student": lambda n: model.sample_pseudoinputs(n, steps=4, sampler="student"),
                "checkpoint's 8-step student": lambda n: model.sample_pseudoinputs(n, steps=8, sampler="student")}
    for spec in args.students:
        name, path = spec.split("=", 1)
        net = prior.new_unet().eval()
        net.load_state_dict(torch.load(path))
        samplers[name] = lambda n, net=net: student_sample(prior, net, n, 4)
    fingerprint = float(sum(p.detach().double().sum() for p in prior.unet.parameters()))  # the teacher, in a number
    scores = {}
    if args.reuse:
        with open(args.reuse) as f:
            earlier = json.load(f)
        if earlier.get("teacher_fingerprint") != fingerprint or earlier["runs"] != args.runs:
            raise SystemExit(f"--reuse {args.reuse}: made with another teacher or another number of runs")
        # The checkpoint's own student is the same only for the same checkpoint file (and its decoder too, with
        # --confidence); an earlier call without --confidence has no confidences to give.
        scores = {name: got for name, got in earlier["scores"].items() if name in samplers and (
            earlier["checkpoint"] == args.checkpoint or not (name.startswith("checkpoint's") or args.confidence))
            and ("confidence" in got or not args.confidence)}
    classifier = torch.load(CLASSIFIER, weights_only=True) if args.confidence else None
    decode = (lambda u: model._decode(u, 1.0, u.shape[0])) if args.confidence else None
    with torch.no_grad():
        for name, sample in samplers.items():
            if name in scores:
                continue
            scores[name] = scored_runs(sample, range(1, args.runs + 1), references, decode, classifier)
            print(name, "done", flush=True)
    teacher = scores["teacher, 50 steps"]
    val = references["val"].u.flatten(1).double()
    results = {}
    for name, got in scores.items():
        results[name] = {split: dict(summary(v), pass_rate=pass_rate(v, teacher[split], name == "teacher, 50 steps",
                                                                     random.Random(0)))
                         for split, v in got.items()}
        with torch.no_grad():
            torch.manual_seed(7)
            results[name]["tail"] = tail(samplers[name](10000), val)
        print(name, json.dumps(results[name]), flush=True)
    print("\n".join(table(results, scores)))
    with open(args.out, "w") as f:
        json.dump(dict(checkpoint=args.checkpoint, runs=args.runs, teacher_fingerprint=fingerprint,
                       torch=torch.__version__, results=results,
                       scores=scores), f, indent=1)


if __name__ == "__main__":
    main()
