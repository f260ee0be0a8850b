"""Time this checkout against another commit, side by side in one run: bench/run.py in both trees,
in alternating order over --rounds rounds, then each case's median time before and after.

    python bench/compare.py --against HEAD~1 [--rounds 2] [--out FILE.md] [-- RUN.PY OPTIONS]
    python bench/compare.py --against b844d93 -- --quick --only ops model.train --no-compile

The other commit is checked out in a temporary git worktree and imported from there (its own
dvp_fast, kernels and C++ sources); this checkout runs as installed. Rows are bench/run.py's
"time" rows; a ratio above 1 means this checkout is slower.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, metavar="REF", help="the commit to compare with (git revision)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each tree, alternating which goes first")
    p.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="options for bench/run.py, after --")
    args = p.parse_args(argv)
    args.run_args = [a for a in args.run_args if a != "--"] or ["--quick"]
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def git(*argv: str) -> str:
    return subprocess.run(["git", "-C", REPO, *argv], check=True, capture_output=True, text=True).stdout.strip()


def checkout(ref: str, folder: str) -> str:
    """`ref` in a detached worktree at `folder`, laid out as the installed package (kernels and C++ sources
    inside dvp_fast/, as setup.py's package_dir maps them)."""
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    git("worktree", "add", "--detach", folder, commit)
    for name in ("kernels", "csrc"):
        link = os.path.join(folder, "dvp_fast", name)
        if not os.path.exists(link):
            os.symlink(os.path.join("..", name), link)
    return commit


def run_bench(tree: str, out: str, run_args: list[str]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, os.path.join(tree, "bench", "run.py"), *run_args, "--no-plots", "--out", out]
    print(f"compare: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=tree)
    rows = []
    for path in glob.glob(os.path.join(out, "*.json")):
        with open(path) as f:
            for section in json.load(f)["sections"].values():
                rows += [r for r in section["rows"] if r["metric"] in ("time", "throughput")]
    return rows


def key(row: dict) -> tuple:
    return row["section"], row["group"], row["case"], row["variant"], row["passname"]


def slowdown(before: float, after: float, unit: str) -> float:
    """After's time over before's: above 1 is slower (a throughput's ratio is inverted to mean the same)."""
    return before / after if unit.endswith("/s") else after / before


def table(before: dict[tuple, list[float]], after: dict[tuple, list[float]], units: dict) -> list[str]:
    lines = ["| section.group | case | variant | pass | before | after | slowdown |", "|---|---|---|---|---|---|---|"]
    for k in sorted(set(before) & set(after)):
        b, a = statistics.median(before[k]), statistics.median(after[k])
        lines.append(f"| {k[0]}.{k[1]} | {k[2]} | {k[3]} | {k[4]} | {b:.4g} {units[k]} | {a:.4g} {units[k]} | "
                     f"{slowdown(b, a, units[k]):.3f} |")
    return lines


def summary(before: dict[tuple, list[float]], after: dict[tuple, list[float]], units: dict) -> list[str]:
    ratios = sorted(slowdown(statistics.median(before[k]), statistics.median(after[k]), units[k])
                    for k in set(before) & set(after))
    if not ratios:
        return ["- no case ran in both trees"]
    return [f"- {len(ratios)} cases; slowdown (after's time over before's): median {statistics.median(ratios):.3f}, "
            f"range {ratios[0]:.3f} to {ratios[-1]:.3f}; {sum(r > 1.1 for r in ratios)} above 1.1, "
            f"{sum(r < 1 / 1.1 for r in ratios)} below 1/1.1"]


def main(argv=None) -> int:
    args = parse_args(argv)
    before: dict[tuple, list[float]] = {}
    after: dict[tuple, list[float]] = {}
    units: dict[tuple, str] = {}
    with tempfile.TemporaryDirectory(prefix="dvp-compare-") as tmp:
        old_tree = os.path.join(tmp, "before")
        commit = checkout(args.against, old_tree)
        try:
            for r in range(args.rounds):
                trees = [("before", old_tree), ("after", REPO)]
                for name, tree in trees if r % 2 == 0 else trees[::-1]:
                    for row in run_bench(tree, os.path.join(tmp, f"{name}{r}"), args.run_args):
                        (before if name == "before" else after).setdefault(key(row), []).append(row["value"])
                        units[key(row)] = row["unit"]
        finally:
            git("worktree", "remove", "--force", old_tree)
    head = git("rev-parse", "HEAD")
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    lines = [f"# This checkout against {args.against}", "",
             f"- before: {commit}; after: {head}{dirty}; {time.strftime('%Y-%m-%d')}",
             f"- command: `python bench/compare.py --against {args.against} --rounds {args.rounds} -- "
             f"{' '.join(args.run_args)}`",
             f"- each cell: the median over {args.rounds} run(s) of bench/run.py's median time; the trees ran in "
             f"alternating order; throughputs are compared as times (slowdown = before's / after's)",
             *summary(before, after, units), "", *table(before, after, units)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:  # every run's value, for a second look
            json.dump([dict(case=list(k), unit=units[k], before=before.get(k), after=after.get(k))
                       for k in sorted(units)], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
