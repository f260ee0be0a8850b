"""Turning a run's rows into files a reader can check: JSON (everything), markdown (tables), PNG plots."""
from __future__ import annotations

import json
import math
import os

try:
    from . import common
except ImportError:
    import common


# --- file names ------------------------------------------------------------------------------------------
def stem(env: dict, partial: bool) -> str:
    name = common.slug(env["device_name"])
    return f"{name}-{env['date']}" + ("-quick" if env["quick"] else "") + ("-partial" if partial else "")


def all_rows(result: dict) -> list[dict]:
    return [r for sec in result["sections"].values() for r in sec["rows"]]


# --- formatting ------------------------------------------------------------------------------------------
def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}g}"
    return str(v)


def fmt_ratio(r: dict) -> str:
    if r.get("ratio") is None:
        return ""
    kind = r.get("ratio_kind") or ""
    if kind.startswith("speed-up"):
        return f"{r['ratio']:.2f}x vs {r['baseline']}"
    return f"{r['ratio']:.2f} {kind}"


def _gbps(r: dict) -> str:
    if r.get("gbps") is None:
        return ""
    return f"{r['gbps']:.3g} ({r['pct_copy_bw']:.0f}%)" if r.get("pct_copy_bw") is not None else f"{r['gbps']:.3g}"


def _mem(r: dict) -> str:
    if r.get("peak_mem_mib") is not None:
        return f"{r['peak_mem_mib']:.1f}"
    return ""


def _metric(r: dict) -> str:
    return f"{r['metric']} ({r['passname']})" if r.get("passname") else r["metric"]


def _value(r: dict) -> str:
    s = fmt(r["value"])
    if r.get("spread") is not None:
        s += f" ± {fmt(r['spread'], 2)}"
    return s


COLUMNS = ("group", "case", "variant", "metric", "median ± IQR", "unit", "n", "ratio (same run)", "GB/s (% copy)",
           "peak MiB", "note")


def _cells(r: dict) -> list[str]:
    note = r.get("note") or ""
    if r["metric"] == "peak memory" and r.get("peak_total_mib") is not None:
        note = (note + "; " if note else "") + f"absolute peak {r['peak_total_mib']:.0f} MiB"
    if r.get("dispatch"):
        note = (note + "; " if note else "") + f"ops ran: {r['dispatch']}"
    return [r["group"], r["case"], r["variant"], _metric(r), _value(r), r["unit"], fmt(r.get("n")),
            fmt_ratio(r), _gbps(r), _mem(r), note]


def _drop_empty(header: list[str], rows: list[list[str]], keep: int) -> tuple[list[str], list[list[str]]]:
    """Leave out columns (after the first `keep`) that are empty in every row."""
    used = [i for i in range(len(header)) if i < keep or any(r[i] for r in rows)]
    return [header[i] for i in used], [[r[i] for i in used] for r in rows]


def text_table(result: dict, width: int = 60) -> str:
    """The stdout table: one block per section, columns padded, long cells cut, empty columns left out."""
    lines = []
    for name, sec in result["sections"].items():
        header, rows = _drop_empty(list(COLUMNS[:-1]), [[c[:width] for c in _cells(r)[:-1]] for r in sec["rows"]],
                                   keep=6)
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines.append(f"\n== {name} ({sec['seconds']:.0f} s)")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    lines.append("")
    lines += ["note: " + n for n in result["notes"]]
    lines += ["headline: " + h for h in headlines(result)]
    return "\n".join(lines)


# --- headlines: the figures the issues ask for, each traced to its rows -------------------------------
def _find(rows, **kw):
    out = [r for r in rows if all((r.get(k) == v) if not callable(v) else v(r.get(k)) for k, v in kw.items())]
    return out


def _fused(rows):
    """The fastest non-reference variant among rows (triton / cpp), or None."""
    cands = [r for r in rows if r["variant"] in ("triton", "cpp") and r["value"] and math.isfinite(r["value"])]
    return min(cands, key=lambda r: r["value"]) if cands else None


def headlines(result: dict) -> list[str]:
    rows = all_rows(result)
    dev = result["environment"]["device"]
    gpu = dev.startswith("cuda")
    tgt = (lambda s: f" (target on an H100: {s})") if gpu else (lambda s: f" (GPU target, not applicable here: {s})")
    out = []
    cifar = lambda c: isinstance(c, str) and c.startswith("cifar10")

    dml = _find(rows, section="ops", group="dml_log_prob", passname="fwd+bwd", metric="time", case=cifar)
    best = _fused(dml)
    if best:
        out.append(f"DML fwd+bwd, {best['case']}: {best['variant']} {best['ratio']:.2f}x the torch fallback, "
                   f"{best['pct_copy_bw']:.0f}% of copy bandwidth" + tgt(">= 10x and >= 60%"))
    eager_kl = _find(rows, section="ops", group="gaussian_sample_kl", variant="torch", passname="fwd+bwd",
                     metric="time", case=cifar)
    grouped = _fused(_find(rows, section="ops", group="gaussian_sample_kl_grouped", passname="fwd+bwd",
                           metric="time", case=cifar))
    if eager_kl and grouped:
        out.append(f"KL over all cifar10 layers, fwd+bwd: grouped {grouped['variant']} {grouped['value']:.3g} ms vs "
                   f"{eager_kl[0]['value']:.3g} ms for the eager per-layer fallback = "
                   f"{eager_kl[0]['value'] / grouped['value']:.2f}x" + tgt(">= 5x"))
    pair = _fused(_find(rows, section="ops", group="dct_pair", metric="time", case=cifar))
    if pair:
        out.append(f"DCT pair (cifar10): {pair['variant']} {pair['ratio']:.2f}x the authors' full-DCT approach"
                   + tgt(">= 5x"))
    train = _find(rows, section="model", group="train", variant="fast", metric="throughput",
                  case=lambda c: c.startswith("cifar10"))
    if train:
        t = max(train, key=lambda r: r.get("batch") or 0)
        mem = _find(rows, section="model", group="train", variant="fast", metric="peak memory", case=t["case"])
        m = f", peak memory {mem[0]['ratio']:.2f}x eager" if mem and mem[0].get("ratio") else ""
        out.append(f"cifar10 training step ({t['case']}): fast path {t['ratio']:.2f}x the images/s of eager fp32{m}"
                   + tgt(">= 3x images/s at <= 0.6x memory, batch 128"))
    epoch = _find(rows, section="model", group="table6", variant="DVP", metric="train time per epoch",
                  case=lambda c: c.startswith("mnist (32 ch)"))
    if epoch and "reduced" not in epoch[0]["note"]:
        out.append(f"mnist epoch (fast path, {epoch[0]['case']}): {epoch[0]['value']:.3g} s, {epoch[0]['note']}"
                   + tgt("<= 3 s at batch 250; paper 45 s on an A100"))
    for r in _find(rows, section="sampling", group="sample1000", variant="compile=True", metric="time"):
        target = {"mnist": "<= 0.1 s and >= 5x eager", "cifar10": "<= 0.3 s and >= 5x eager"}.get(r.get("preset"))
        out.append(f"{r['case']}: compile=True {r['value']:.3g} s, {r['ratio']:.2f}x eager"
                   + (f" ({r['note']})" if r["note"] else "") + (tgt(target) if target else ""))
    for r in _find(rows, section="model", group="table6", metric="peak memory",
                   variant=lambda v: isinstance(v, str) and v.startswith("VampPrior")):
        if r.get("ratio") is not None:
            out.append(f"Table 6, {r['case']}: {r['variant']} peak memory {r['ratio']:.2f}x DVP's")
    return out


# --- files -----------------------------------------------------------------------------------------------
def _clean(obj):
    """JSON-safe copy: non-finite floats become null (a note says why where it matters)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


METHOD = """How to read this: each row is one variant of one case. Times are medians over repeats with the
inter-quartile range (IQR) as spread; the variants of a case ran interleaved (one call of each per
repeat) so machine load hits them alike. "ratio (same run)" compares against the named baseline of
the same case measured in this run: "Nx vs B" is a speed-up over B (B's time / this time, or this
throughput / B's), "N x B" a plain ratio of values (memory, size, time). GB/s counts compulsory
traffic (inputs read once, outputs written once, float32); the percentage is of the copy bandwidth
measured in this run. Peak memory: {mem}. Rows marked "reduced" ran at smaller sizes than the paper's
and are labelled with what changed."""


def markdown(result: dict, plots: list[str]) -> str:
    env, bw = result["environment"], result["copy_bandwidth"]
    lines = [f"# dvp_fast benchmarks: {env['device_name']}", ""]
    facts = [
        ("device", f"{env['device_name']} (`{env['device']}`)"),
        ("date", env["time_utc"]),
        ("command", f"`{env['command']}`"),
        ("git commit", f"{env['git_commit']}" + (" (working tree dirty: " + ", ".join(env["git_dirty_files"][:8])
                                                 + ("…" if len(env["git_dirty_files"]) > 8 else "") + ")"
                                                 if env["git_dirty"] else " (clean)")),
        ("torch / triton / python", f"{env['torch']} / {env['triton']} / {env['python']}"),
        ("CPUs / torch threads", f"{env['cpu_count']} / {env['torch_threads']} (CPU capability "
                                 f"{env['cpu_capability']})"),
        ("load average at start", ", ".join(f"{v:.1f}" for v in env["load_average"] or [])),
        ("backends timed", ", ".join(env.get("backends_timed", []))),
        ("copy bandwidth", f"{bw['median_gbps']:.1f} GB/s (IQR {bw['iqr_gbps']:.1f}; {bw['method']})"),
        ("mode", "--quick (small sizes, few repeats)" if env["quick"] else "full"),
        ("total time", f"{env['total_seconds']:.0f} s"),
    ]
    if not result.get("complete", True):
        facts.append(("state", "**incomplete**: written after each group; not run (yet): "
                               + (", ".join(result.get("not_yet_run", [])) or "none")))
    if env.get("cuda"):
        facts.insert(5, ("CUDA / GPU memory / capability", f"{env['cuda']} / {env['gpu_memory_gib']:.0f} GiB / "
                                                           f"{env['compute_capability']}"))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts] + [""]
    mem = common.CUDA_MEM_METHOD if env["device"].startswith("cuda") else common.CPU_MEM_METHOD
    lines += [METHOD.format(mem=mem), ""]
    heads = headlines(result)
    if heads:
        lines += ["## Headlines", ""] + [f"- {h}" for h in heads] + [""]
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    for name, sec in result["sections"].items():
        lines += [f"## {name}", "", f"Groups: {', '.join(sec['groups'])}; {sec['seconds']:.0f} s.", ""]
        for group in sec["groups"]:
            rows = [r for r in sec["rows"] if r["group"] == group]
            if not rows:
                continue
            header, cells = _drop_empty(list(COLUMNS[1:]), [[c.replace("|", "/") for c in _cells(r)[1:]]
                                                             for r in rows], keep=5)
            lines += [f"### {name}.{group}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in cells]
            lines.append("")
        for p in plots:
            if _PLOT_SECTION.get(os.path.basename(p)) == name:
                lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    return "\n".join(lines)


_PLOT_SECTION: dict[str, str] = {}


def write(result: dict, out_dir: str, name: str, plots: bool = True) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    pngs = make_plots(result, out_dir, name) if plots else []
    if not plots and result.get("complete", True) and "plots skipped (--no-plots)" not in result["notes"]:
        result["notes"].append("plots skipped (--no-plots)")
    json_path = os.path.join(out_dir, name + ".json")
    with open(json_path, "w") as f:
        json.dump(_clean(result), f, indent=1)
    md_path = os.path.join(out_dir, name + ".md")
    with open(md_path, "w") as f:
        f.write(markdown(result, pngs))
    return [json_path, md_path, *pngs]


# --- plots -----------------------------------------------------------------------------------------------
def make_plots(result: dict, out_dir: str, name: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result["notes"].append("plots skipped: matplotlib is not installed")
        return []
    rows = all_rows(result)
    device = result["environment"]["device_name"]
    paths = []

    def save(fig, suffix, section):
        path = os.path.join(out_dir, f"{name}-{suffix}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        _PLOT_SECTION[os.path.basename(path)] = section
        paths.append(path)

    train = [r for r in rows if r["section"] == "model" and r["group"] == "train" and r["metric"] == "throughput"
             and r.get("batch") and r["value"] and math.isfinite(r["value"])]
    if train:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for preset in dict.fromkeys(r["preset"] for r in train):
            for variant, style in (("fast", "-o"), ("eager fp32", "--s")):
                pts = sorted((r["batch"], r["value"], r["spread"] or 0) for r in train
                             if r["preset"] == preset and r["variant"] == variant)
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] / 2 for p in pts], fmt=style,
                                label=f"{preset} {variant}", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("training images/s (median, IQR bars)")
        ax.set_title(f"Training step throughput\n{device}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "train-throughput", "model")

    mem = [r for r in rows if r["section"] == "model" and r["group"] == "table6" and r["metric"] == "peak memory"
           and r["value"] is not None and math.isfinite(r["value"])]
    if mem:
        total = all(r.get("peak_total_mib") is not None for r in mem)
        key = "peak_total_mib" if total else "value"
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, case in enumerate(dict.fromkeys(r["case"] for r in mem)):
            color = f"C{i}"
            vamp = sorted((r["k"], r[key]) for r in mem if r["case"] == case and r.get("k"))
            if vamp:
                ax.plot([v[0] for v in vamp], [v[1] for v in vamp], "-o", color=color, label=f"VampPrior, {case}")
            dvp = [r[key] for r in mem if r["case"] == case and r["variant"] == "DVP"]
            if dvp:
                ax.axhline(dvp[0], color=color, ls="--", label=f"DVP, {case}")
        ax.set_xlabel("K (VampPrior pseudo-images)")
        ax.set_ylabel("peak memory of a training step, MiB" + (" (absolute)" if total else "\n(growth over before the step)"))
        ax.set_title(f"Training-step memory against K (paper Table 6)\n{device}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "memory-vs-k", "model")

    steps = [r for r in rows if r["section"] == "sampling" and r["group"] == "steps" and r.get("steps")]
    if steps:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for case in dict.fromkeys(r["case"] for r in steps):
            pts = sorted((r["steps"], r["value"]) for r in steps if r["case"] == case)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=case)
        ax.set_xscale("log")
        ax.set_xlabel("diffusion steps")
        ax.set_ylabel("seconds per call (median)")
        ax.set_title(f"Sampling time against steps\n{device}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "sampling-steps", "sampling")
    return paths
