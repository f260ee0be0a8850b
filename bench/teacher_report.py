"""The distillation teacher, reported: its steps, its learning curve and its test NLL.

    python bench/teacher_report.py --run runs/mnist-full [--name teacher-<date>]

Reads the run's config.json, metrics.csv and the dvp-eval records in evaluations.json (those of the
run's best.pt, matched by SHA-256), and writes bench/results/<name>.{md,csv,png} (default teacher-<date>): the
learning curve as logged (train ELBO per logged step, validation ELBO at each evaluation) and the
test figures of the checkpoint the students were distilled from.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dvp_fast.cli import file_sha256, read_evaluations  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ("step", "epoch", "lr", "loss", "elbo", "recon", "kl", "val_elbo", "active_units", "time_s")


def learning_curve(run: str) -> list[dict]:
    """metrics.csv's rows, the columns of COLUMNS, numbers as floats (blank where not logged)."""
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        return [{k: (float(r[k]) if r.get(k) else None) for k in COLUMNS} for r in csv.DictReader(f)]


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    train = [(r["step"], -r["elbo"]) for r in rows if r["elbo"] is not None]
    val = [(r["step"], -r["val_elbo"]) for r in rows if r["val_elbo"] is not None]
    ax.plot(*zip(*train), "-", lw=1, label="train batch, -ELBO (raw weights)")
    if val:
        ax.plot(*zip(*val), "o-", label="validation, -ELBO (EMA weights)")
    ax.set_yscale("log")  # from ~700 nats at the start to ~100
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("nats per image")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the teacher's run folder")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--name", default=None, help="the files' stem (default: teacher-<date>)")
    args = p.parse_args()
    with open(os.path.join(args.run, "config.json")) as f:
        config = json.load(f)
    rows = learning_curve(args.run)
    best = os.path.join(args.run, "best.pt")
    digest = file_sha256(best)
    evaluations = [e for e in read_evaluations(args.run) if e.get("checkpoint_sha256") == digest]
    date = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    name = args.name or f"teacher-{date}"
    stem = os.path.join(args.out, name)
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    run, train = config["run"], config["train"]
    plot(rows, stem + ".png", f"{run['preset']} preset on {run['data']}: learning curve")
    last = rows[-1]
    evals = [(r["step"], r["epoch"], r["val_elbo"]) for r in rows if r["val_elbo"] is not None]
    lines = [f"# The distillation teacher: `{args.run}`", "",
             f"The {run['preset']} preset trained on {run['data']} (the full training split less the validation "
             f"images), batch {train['batch_size']}, learning rate {train['lr']} after {train['warmup_epochs']} "
             f"warm-up epochs (the cosine schedule spans {train['cosine_epochs']} epochs, so it is still near its "
             f"peak), EMA {train['ema_decay']}, on the CPU (2 cores). {int(last['step'])} optimisation steps, "
             f"{last['epoch']:.2f} epochs. `best.pt` (SHA-256 `{digest[:12]}`) is the EMA weights at the best "
             f"validation ELBO, the checkpoint the students were distilled from.", "",
             f"Learning curve: `{name}.csv` (metrics.csv as logged: every row a train batch, "
             f"`val_elbo` at each evaluation), plotted in `{name}.png`.", "",
             "| evaluation at step | epoch | validation ELBO (nats) |", "|---|---|---|"]
    lines += [f"| {int(s)} | {e:.2f} | {v:.2f} |" for s, e, v in evals]
    lines += ["", "Test figures of `best.pt` (`dvp-eval`, EMA weights):", "",
              "| step | split | images | importance samples K | negative ELBO | IWAE NLL (± s.e. over images) "
              "| bits/dim | active units | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for e in evaluations:
        se = f" ± {e['nll_stderr']:.2f}" if e.get("nll_stderr") is not None else ""
        lines.append(f"| {e['step']} | {e['split']} | {e['images']} | {e['num_samples']} | {e['neg_elbo']:.2f} "
                     f"| {e['nll']:.2f}{se} | {e['bits_per_dim']:.4f} | {e['active_units']:.1%} "
                     f"| {e['seconds']:.0f} |")
    if not evaluations:
        lines.append("| (none: run dvp-eval on best.pt) | | | | | | | | |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.md, .csv and .png")


if __name__ == "__main__":
    main()
