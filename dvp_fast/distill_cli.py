"""dvp-distill: few-step students for a trained model's pseudo-input sampler (see dvp_fast.distill).

    dvp-distill --checkpoint runs/mnist-full --steps 1 2 4        # writes runs/mnist-full/distilled.pt
    dvp-sample --checkpoint runs/mnist-full/distilled.pt --steps 4 --out samples.png
"""
from __future__ import annotations

import os

from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .cli import OneLineParser, _device, _non_negative, _positive, _run
from .distill import MOMENT_WEIGHT, RECIPES, REVERSE_KL_MIN_STEPS, TEACHER_SAMPLES, default_recipe, distill
from .model import DVPVAE


def run_distill(args) -> None:
    path = resolve_checkpoint(args.checkpoint)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "distilled.pt")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists: pass another --out (nothing was overwritten)")
    source = load_checkpoint(path)
    model = DVPVAE.from_checkpoint_payload(source, path, ema=not args.raw_weights).to(_device(args.device))
    report = distill(model, steps=args.steps, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                     teacher_n=args.teacher_samples, progress=not args.no_progress, seed=args.seed,
                     moment_weight=args.moment_weight, candidates=args.candidates,
                     reverse_kl_weight=args.reverse_kl_weight, fake_updates=args.fake_updates)
    # A checkpoint like dvp-train's best.pt, with the students in its weights and configuration; the
    # report keeps the entries of the source's students that this run left as they were, each with the
    # settings it was fitted with (reports from before the moment term or the reverse-KL term had none:
    # weight 0; from before candidates, one).
    earlier = source.get("distill", {})
    settings = dict(iterations=earlier.get("iterations"), teacher_samples=earlier.get("teacher_samples"),
                    moment_weight=earlier.get("moment_weight", 0.0), candidates=earlier.get("candidates", 1),
                    reverse_kl_weight=earlier.get("reverse_kl_weight", 0.0))
    kept = {k: dict(settings, **r) for k, r in earlier.get("students", {}).items() if k not in report["students"]}
    payload = dict(model_config=model.config.to_dict(), model=model.cpu().state_dict(),
                   run=dict(source.get("run", {}), distilled_from=os.path.abspath(path)),
                   step=source.get("step"), distill=dict(report, students={**kept, **report["students"]}))
    if "train_config" in source:
        payload["train_config"] = source["train_config"]
    save_checkpoint(payload, out)
    floor = report["teacher_noise_floor"]
    for k, r in sorted(report["students"].items(), key=lambda kv: int(kv[0])):
        steps = f"{k} step{'s' if int(k) > 1 else ''}"
        print(f"dvp-distill: {k}-step student (predicts {r['predicts']}): energy distance to the "
              f"{report['teacher_steps']}-step teacher "
              f"{r['energy_distance']:.4f} (the teacher itself in {steps}: {r['teacher_at_these_steps']:.4f}; "
              f"teacher against itself: {floor:.4f}), {r['seconds']:.0f} s{_chosen(r)}")
    print(f"dvp-distill: wrote {out}; sample with: dvp-sample --checkpoint {out} --steps {max(args.steps)} ...")


def _chosen(entry: dict) -> str:
    if "candidate_energy_distances" not in entry:
        return ""
    scores = ", ".join(f"{d:.5f}" for d in entry["candidate_energy_distances"])
    return f"; kept candidate {entry['chosen_candidate']} of {len(entry['candidate_energy_distances'])} ({scores})"


def _recipe_default(field: str) -> str:
    """A recipe field's default as help text: the value of most step counts, then the listed ones that differ."""
    usual = getattr(default_recipe(REVERSE_KL_MIN_STEPS), field)
    listed = {k: getattr(r, field) for k, r in sorted(RECIPES.items()) if k >= REVERSE_KL_MIN_STEPS or
              field == "iterations"}
    return ", ".join([str(usual)] + [f"{k}-step students {v}" for k, v in listed.items() if v != usual])


def distill_main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="dvp-distill", description="Distil a trained model's diffusion prior into few-step "
                                                      "samplers (1, 2 or 4 steps, say).")
    p.add_argument("--checkpoint", required=True, help="run folder (uses best.pt) or a .pt file")
    p.add_argument("--steps", type=_positive(int), nargs="+", default=[1, 2, 4], help="step counts to distil")
    p.add_argument("--out", default=None, help="checkpoint to write (default: distilled.pt beside the source)")
    p.add_argument("--iterations", type=_positive(int), default=None,
                   help=f"optimisation steps per student (default: {_recipe_default('iterations')})")
    p.add_argument("--batch-size", type=_positive(int), default=256)
    p.add_argument("--lr", type=_positive(float), default=None,
                   help="learning rate (default: 3e-4 for students predicting eps, 1e-3 for x)")
    p.add_argument("--teacher-samples", type=_positive(int), default=TEACHER_SAMPLES,
                   help="samples of the 50-step teacher to fit the students to")
    p.add_argument("--moment-weight", type=_non_negative(float), default=MOMENT_WEIGHT,
                   help="weight of the mean-and-covariance term beside the energy distance (0: none)")
    p.add_argument("--reverse-kl-weight", type=_non_negative(float), default=None,
                   help="weight of the reverse-KL (distribution matching) term beside the energy distance, for "
                        f"students of {REVERSE_KL_MIN_STEPS} steps or more (0: none; default: "
                        f"{_recipe_default('reverse_kl_weight')})")
    p.add_argument("--fake-updates", type=_positive(int), default=None,
                   help=f"Adam steps of the reverse-KL term's fake score per student step (default: "
                        f"{_recipe_default('fake_updates')})")
    p.add_argument("--candidates", type=_positive(int), default=1,
                   help="students fitted per step count (other seeds); the one closest to a further teacher "
                        "draw is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw-weights", action="store_true", help="distil the training weights, not their EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return _run("dvp-distill", run_distill, p.parse_args(argv))
