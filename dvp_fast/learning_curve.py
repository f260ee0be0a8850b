"""What a run folder shows at each evaluation: the KL and active units of every latent layer (layers.csv)
and a learning-curve figure (learning_curve.png) drawn from metrics.csv and layers.csv.

The figure has the panels the paper draws for its runs: training and validation loss in bits/dim
against the step (Figures 7 and 8), and the KL of each latent layer with its share of active units
at the latest evaluation (Table 4).
"""
from __future__ import annotations

import csv
import io
import math
import os

from .atomic import atomic_write, atomic_write_bytes

LAYERS_CSV = "layers.csv"
FIGURE = "learning_curve.png"
LAYER_FIELDS = ("step", "layer", "kl_nats", "active_units")


def layer_names(count: int) -> list[str]:
    """Names of out.kl's columns: u, then z_L down to z_1 (count - 1 latent layers)."""
    return ["u"] + [f"z{i}" for i in range(count - 1, 0, -1)]


class LayerLog:
    """layers.csv: one row per latent layer and evaluation; on resume, rows past the resumed step are dropped.
    Rewritten whole (atomically) at each evaluation: a run has few evaluations."""

    def __init__(self, folder: str, resume_step: int | None):
        self.path = os.path.join(folder, LAYERS_CSV)
        self.rows: list[dict] = []
        if resume_step is not None and os.path.exists(self.path):
            try:
                with open(self.path, newline="") as f:
                    self.rows = [r for r in csv.DictReader(f)
                                 if (r.get("step") or "").isdigit() and int(r["step"]) <= resume_step]
            except (csv.Error, UnicodeDecodeError, ValueError):
                self.rows = []  # a damaged file is only a figure's input: start it again

    def add(self, step: int, kl: list[float], active_units: list[float]) -> None:
        """kl: nats per image for u, z_L, ..., z_1; active_units: fractions for z_L, ..., z_1 (none for u)."""
        for i, (name, value) in enumerate(zip(layer_names(len(kl)), kl)):
            au = active_units[i - 1] if i > 0 else None
            self.rows.append(dict(step=step, layer=name, kl_nats=f"{value:.6g}",
                                  active_units="" if au is None else f"{au:.4f}"))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, LAYER_FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.path, text.getvalue().encode(), tmp=self.path + ".tmp")


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def plot_learning_curve(folder: str) -> str:
    """Draw learning_curve.png from the folder's metrics.csv and layers.csv; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _read(os.path.join(folder, "metrics.csv"))
    layers = _read(os.path.join(folder, LAYERS_CSV))
    fig, (curve, bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=(3, 2)))
    train = [(int(r["step"]), _float(r["loss"])) for r in metrics if r.get("loss")]
    val = [(int(r["step"]), _float(r["val_loss"])) for r in metrics if r.get("val_loss")]
    if train:
        curve.plot(*zip(*train), lw=1, label="training (batch means)")
    if val:
        curve.plot(*zip(*val), "o-", lw=1.5, label="validation (EMA weights)")
    curve.set(xlabel="step", ylabel="negative ELBO, bits/dim", title="Learning curve")
    finite = [v for _, v in train + val if math.isfinite(v)]
    if finite:  # the first steps' losses are orders of magnitude above the rest: show from the 5th percentile up
        finite.sort()
        low, high = finite[0], finite[int(0.95 * (len(finite) - 1))]
        curve.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low) + 1e-9)
    curve.grid(alpha=0.3)
    curve.legend()
    if layers:
        last = max(int(r["step"]) for r in layers)
        rows = [r for r in layers if int(r["step"]) == last]
        names = [r["layer"] for r in rows]
        kl = [_float(r["kl_nats"]) for r in rows]
        bars.bar(names, kl, color="tab:blue")
        bars.set(ylabel="KL, nats per image", title=f"Latent layers at step {last}")
        share = bars.twinx()
        au = [_float(r["active_units"]) for r in rows]
        share.plot(names, [100 * a for a in au], "o", color="tab:red")
        share.set(ylim=(0, 105), ylabel="active units, %")
        share.tick_params(axis="y", colors="tab:red")
        bars.tick_params(axis="x", rotation=90 if len(names) > 12 else 0)
    else:
        bars.set_axis_off()
    fig.tight_layout()
    path = os.path.join(folder, FIGURE)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), tmp=path + ".tmp.png")
    plt.close(fig)
    return path
