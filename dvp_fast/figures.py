"""The paper's figures from any trained DVP-VAE: each function draws one PNG and writes the numbers behind it
as a CSV beside it (same name, .csv), and returns those numbers. `dvp-figures` (figures_cli.py) runs them all.

    pseudo_input_figure(model, 10, "out/pseudo_inputs.png")                  # Figures 3, 6 and 10
    generative_reconstructions(model, val_images[:5], out="out/generative_reconstructions.png")  # Figure 4
    latent_use({"run": (model, val_images)}, "out/latent_use.png")           # Table 4, as bars
    training_curves("runs/mnist/metrics.csv", "out/training_curves.png")     # Figures 7 and 8

Images are drawn with nearest-neighbour scaling at DISPLAY_PIXELS screen pixels per image (a 28x28 digit
at about 3x), every panel titled and every row labelled. `out=None` computes the numbers and writes nothing.
"""
from __future__ import annotations

import csv
import io
import math
import os
from typing import TYPE_CHECKING

import torch

from . import checks
from .atomic import atomic_write, atomic_write_bytes
from .diffusion import DiffusionPrior
from .learning_curve import _float

if TYPE_CHECKING:
    from .model import DVPVAE

DPI = 100
CELL_INCHES = 0.9  # one image: 90 screen pixels, 3.2x a 28x28 digit, 2.8x a 32x32 CIFAR image
MIN_WIDTH = 6.5  # inches: room for a two-line title above a few images
CURVE_FIELDS = ("step", "epoch", "grad_norm", "skipped", "loss", "val_loss")  # training_curves.csv: metrics.csv's


# --- shared pieces ----------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latent_names(model: DVPVAE) -> list[str]:
    """z_L, ..., z_1 as "z8", ..., "z1": the order of `encode(x).z` and of `decode`'s `top`."""
    count = len(model.blocks)
    return [f"z{count - i}" for i in range(count)]


def _as_model_images(model: DVPVAE, images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """uint8 images (N, C, D, D) in [0, 255] or floats in [-1, 1] -> floats in [-1, 1] on the model's device."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, D, D), got {type(images).__name__}")
    if images.dtype == torch.uint8:
        checks.uint8_images(images, model.config, name)
        return images.to(model.device).float() / 127.5 - 1.0
    x = images.to(model.device, torch.float32)
    checks.model_input(model, x, name)
    return x


def _pixels(image: torch.Tensor):
    """(C, H, W) in [-1, 1] -> a numpy array imshow draws: (H, W) grey or (H, W, 3) colour, in [0, 1]."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1.0) * 0.5).numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def _show(ax, image: torch.Tensor | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        for spine in ax.spines.values():
            spine.set_visible(False)
        return
    ax.imshow(_pixels(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")


def _row_label(ax, text: str) -> None:
    ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=10)


def _save_png(fig, path: str) -> None:
    plt = _pyplot()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI), tmp=f"{path}.tmp{os.getpid()}")
    plt.close(fig)


def _write_csv(path: str, fields, rows) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode(), tmp=f"{path}.tmp{os.getpid()}")


def csv_path(png: str) -> str:
    """The CSV written beside a figure: the PNG's path with .csv."""
    return os.path.splitext(png)[0] + ".csv"


def _pixel_rows(key: tuple, image: torch.Tensor):
    """Rows (*key, channel, row, col, value) of one (C, H, W) tensor, values as float32 reprs."""
    values = image.detach().float().cpu()
    c, h, w = values.shape
    flat = values.flatten().tolist()
    i = 0
    for ch in range(c):
        for r in range(h):
            for col in range(w):
                yield (*key, ch, r, col, repr(flat[i]))
                i += 1


def read_pixel_csv(path: str) -> dict[tuple, torch.Tensor]:
    """A figure's pixel CSV back as tensors: {(key columns...): (C, H, W) float32}, e.g. for
    generative_reconstructions.csv {(image, what, draw): tensor}."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        keys = len(header) - 4
        cells: dict[tuple, list] = {}
        for row in reader:
            cells.setdefault(tuple(row[:keys]), []).append((int(row[keys]), int(row[keys + 1]), int(row[keys + 2]),
                                                            float(row[keys + 3])))
    out = {}
    for key, items in cells.items():
        shape = [max(item[i] for item in items) + 1 for i in range(3)]
        t = torch.empty(shape)
        for ch, r, col, v in items:
            t[ch, r, col] = v
        out[key] = t
    return out


# --- Figures 3, 6 and 10: pseudo-inputs from r_hat(u) and what the model makes of them ----------------------------
@torch.no_grad()
def pseudo_input_figure(model: DVPVAE, n: int = 10, out: str | None = None, draws: int = 2,
                        temperature: float = 1.0, steps: int | None = None) -> dict:
    """n pseudo-inputs u ~ r_hat(u) from the model's prior over u, shown as images (f^dagger(u): the inverse DCT,
    or the upsampling, at the image size, as the paper shows them), above `draws` images decoded from each
    (every z drawn from the prior given u, at `temperature`; u itself is drawn at temperature 1).

    Returns dict(u=(n, C, d, d), u_image=(n, C, D, D), decoded=(draws, n, C, D, D)), all in [-1, 1] but u; with
    `out`, writes the PNG and a CSV (sample, what, draw, channel, row, col, value) for u, u_image and decoded.
    """
    n, draws = checks.positive_int("n", n), checks.positive_int("draws", draws)
    temperature = checks.temperature(temperature)
    if model.pseudo is None or model.u_prior is None:
        raise ValueError("this model has no pseudo-inputs (pseudoinputs=False): there is no prior over u to draw")
    if isinstance(model.u_prior, DiffusionPrior):
        u = model.sample_pseudoinputs(n, steps=steps)
    else:  # the mixture-of-Gaussians ablation draws exactly
        u = model.u_prior.sample(n, device=model.device)
    u_image = model.pseudo.image(u)
    decoded = torch.stack([model.decode(u, temperature=temperature) for _ in range(draws)])
    result = dict(u=u.cpu(), u_image=u_image.cpu(), decoded=decoded.cpu())
    if out is None:
        return result
    plt = _pyplot()
    fig, axes = plt.subplots(1 + draws, n, figsize=(max(CELL_INCHES * n + 1.6, MIN_WIDTH),
                                                     CELL_INCHES * (1 + draws) + 0.9), squeeze=False)
    for j in range(n):
        _show(axes[0, j], u_image[j])
        for d in range(draws):
            _show(axes[1 + d, j], decoded[d, j])
    _row_label(axes[0, 0], "u ~ r\u0302(u)\n(as an image)")
    for d in range(draws):
        _row_label(axes[1 + d, 0], "decoded" if draws == 1 else f"decoded,\ndraw {d + 1}")
    fig.suptitle(f"Pseudo-inputs from the prior r\u0302(u) and images decoded from them\n(every z from the prior "
                 f"given u, T = {temperature:g})", fontsize=11)
    fig.subplots_adjust(left=1.5 / fig.get_figwidth(), right=1 - 0.1 / fig.get_figwidth(),
                        top=1 - 0.7 / fig.get_figheight(), bottom=0.02, wspace=0.06, hspace=0.06)
    _save_png(fig, out)

    def rows():
        for j in range(n):
            yield from _pixel_rows((j, "u", 0), u[j])
            yield from _pixel_rows((j, "u_image", 0), u_image[j])
            for d in range(draws):
                yield from _pixel_rows((j, "decoded", d), decoded[d, j])

    _write_csv(csv_path(out), ("sample", "what", "draw", "channel", "row", "col", "value"), rows())
    return result


# --- Figure 4: generative reconstructions --------------------------------------------------------------------------
def fixed_label(model: DVPVAE, levels: int) -> str:
    """The row label of `levels` top latents fixed: "u fixed", "u, z8 fixed", ... ("z8 fixed" without u)."""
    parts = (["u"] if model.pseudo is not None else []) + latent_names(model)[:levels]
    return (", ".join(parts) + " fixed") if parts else "nothing fixed"


@torch.no_grad()
def generative_reconstructions(model: DVPVAE, images: torch.Tensor, draws: int = 6, levels=(0, 1),
                               temperature: float = 1.0, out: str | None = None) -> dict:
    """Figure 4: for each image x, one posterior draw u ~ r(u|x), z ~ q(z|x, u) held fixed, then `draws` images
    decoded with u and the top k latents of that draw kept and every other z drawn from the prior, for each k in
    `levels` (0: u alone; 1: u and z_L; ...). Shows what u carries (the global structure) and what each level adds.

    At temperature 0 every z below the kept ones is its prior mean, so the draws of one row are the same image.
    Returns dict(inputs=(N, C, D, D), rows={k: (N, draws, C, D, D)}, labels={k: row label},
    spread={k: (N,) mean over pixels of the standard deviation across draws}); with `out`, the PNG and a CSV
    (image, what, draw, channel, row, col, value) with what = "input", "u_image" (f^dagger(u) of the kept u, also
    returned as u_image; None without pseudo-inputs) or "fixed_top_k".
    """
    draws = checks.positive_int("draws", draws)
    temperature = checks.temperature(temperature)
    levels = tuple(levels)
    if not levels or any(not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= len(model.blocks)
                         for k in levels):
        raise ValueError(f"levels must be integers 0..{len(model.blocks)} (the number of top latents kept), "
                         f"got {levels!r}")
    x = _as_model_images(model, images)
    n = x.shape[0]
    enc = model.encode(x)
    rows, spread = {}, {}
    for k in levels:
        rep = lambda t: t.repeat_interleave(draws, dim=0)  # noqa: E731  rows i*draws..: image i
        u = rep(enc.u) if enc.u is not None else None
        top = [rep(z) for z in enc.z[:k]] or None
        decoded = model.decode(u, temperature=temperature, n=n * draws, top=top)
        decoded = decoded.view(n, draws, *decoded.shape[1:]).cpu()
        rows[k] = decoded
        spread[k] = decoded.float().std(dim=1, unbiased=False).flatten(1).mean(1) if draws > 1 else torch.zeros(n)
    labels = {k: fixed_label(model, k) for k in levels}
    u_image = model.pseudo.image(enc.u).cpu() if enc.u is not None else None
    result = dict(inputs=x.cpu(), u_image=u_image, rows=rows, labels=labels, spread=spread)
    if out is None:
        return result
    plt = _pyplot()
    total_rows = n * len(levels)
    # Columns: the input, its u as an image (with pseudo-inputs), a blank one for the row labels, the draws.
    heads = ["input"] + (["u ~ r(u|x)"] if u_image is not None else [])
    first = len(heads) + 1
    fig, axes = plt.subplots(total_rows, first + draws, squeeze=False,
                             figsize=(max(CELL_INCHES * (len(heads) + draws) + 1.7, MIN_WIDTH),
                                      CELL_INCHES * total_rows + 1.0),
                             gridspec_kw=dict(width_ratios=[1] * len(heads) + [1.7 / CELL_INCHES] + [1] * draws))
    for i in range(n):
        for r, k in enumerate(levels):
            row = i * len(levels) + r
            _show(axes[row, 0], x[i] if r == 0 else None)
            if u_image is not None:
                _show(axes[row, 1], u_image[i] if r == 0 else None)
            label_ax = axes[row, first - 1]
            label_ax.set_axis_off()
            label_ax.text(0.97, 0.5, labels[k], ha="right", va="center", fontsize=10, transform=label_ax.transAxes)
            for d in range(draws):
                _show(axes[row, first + d], rows[k][i, d])
    for col, head in enumerate(heads):
        axes[0, col].set_title(head, fontsize=10)
    for d in range(draws):
        axes[0, first + d].set_title(f"draw {d + 1}", fontsize=10)
    fig.suptitle(f"Generative reconstructions: a posterior draw's u (and top latents) kept,\nevery other z from "
                 f"the prior (T = {temperature:g})", fontsize=11)
    fig.subplots_adjust(left=0.1 / fig.get_figwidth(), right=1 - 0.1 / fig.get_figwidth(),
                        top=1 - 0.8 / fig.get_figheight(), bottom=0.02, wspace=0.06, hspace=0.1)
    _save_png(fig, out)

    def csv_rows():
        for i in range(n):
            yield from _pixel_rows((i, "input", 0), x[i])
            if u_image is not None:
                yield from _pixel_rows((i, "u_image", 0), u_image[i])
            for k in levels:
                for d in range(draws):
                    yield from _pixel_rows((i, f"fixed_top_{k}", d), rows[k][i, d])

    _write_csv(csv_path(out), ("image", "what", "draw", "channel", "row", "col", "value"), csv_rows())
    return result


# --- Table 4: latent use ----------------------------------------------------------------------------------------------
@torch.no_grad()
def latent_use(runs: dict, out: str | None = None, threshold: float = 0.01, batch_size: int = 500) -> dict:
    """Active units per latent layer (Eq. 23-24: Cov_x(E_q[z_u]) > threshold, the paper's 0.01) of one or more
    models, as grouped bars. `runs`: {label: (model, images)}, each model on its own images (uint8 or [-1, 1]),
    so runs of different image shapes compare. Layers are matched by name (z1 is the bottom layer in every run).

    Returns {label: {layer: fraction}} (z_L first, the numbers of `model.active_units(images, threshold,
    per_layer=True)` under the same random state); with `out`, the PNG and a CSV
    (run, layer, units, active_units, fraction, threshold).
    """
    if not isinstance(runs, dict) or not runs:
        raise ValueError(f"runs must be a non-empty dict {{label: (model, images)}}, got {runs!r:.80}")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    result, counts = {}, {}
    for label, (model, images) in runs.items():
        masks = model.active_unit_masks(_as_model_images(model, images), threshold, batch_size)
        names = latent_names(model)
        result[label] = {name: m.double().mean().item() for name, m in zip(names, masks)}
        counts[label] = {name: (int(m.numel()), int(m.sum().item())) for name, m in zip(names, masks)}
    if out is None:
        return result
    layers = sorted({name for r in result.values() for name in r}, key=lambda s: -int(s[1:]))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(layers) * max(1, len(runs)) ** 0.5 + 2.0), 4.0))
    width = 0.8 / len(runs)
    for r, (label, per_layer) in enumerate(result.items()):
        xs = [i - 0.4 + width * (r + 0.5) for i, name in enumerate(layers) if name in per_layer]
        ys = [100 * per_layer[name] for name in layers if name in per_layer]
        bars = ax.bar(xs, ys, width * 0.95, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=1)
    ax.set_xticks(range(len(layers)), layers)
    ax.set(xlabel="latent layer (top to bottom)", ylabel="active units, %", ylim=(0, 128),
           yticks=range(0, 101, 20), title=f"Latent use: units with Cov_x(E_q[z]) > {threshold:g}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=len(runs), fontsize=9, frameon=False)
    fig.tight_layout()
    _save_png(fig, out)
    _write_csv(csv_path(out), ("run", "layer", "units", "active_units", "fraction", "threshold"),
               [(label, name, *counts[label][name], repr(frac), repr(float(threshold)))
                for label, per_layer in result.items() for name, frac in per_layer.items()])
    return result


# --- Figures 7 and 8: training curves -----------------------------------------------------------------------------------
def training_curves(metrics_csv: str, out: str | None = None) -> list[dict]:
    """The gradient norm at each logged step and the negative ELBO per pixel (bits/dim) on training batches and
    on validation data, from a run's metrics.csv. Returns its rows restricted to CURVE_FIELDS (strings, as in
    the file); with `out`, the PNG and those rows as a CSV."""
    if not os.path.isfile(metrics_csv):
        raise FileNotFoundError(f"no metrics.csv at {metrics_csv}: expected a dvp-train run folder")
    with open(metrics_csv, newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in CURVE_FIELDS if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{metrics_csv}: expected the columns {list(CURVE_FIELDS)}, missing {missing}")
        rows = [{k: r.get(k) or "" for k in CURVE_FIELDS} for r in reader]
    if out is None:
        return rows
    plt = _pyplot()
    fig, (gn, elbo) = plt.subplots(1, 2, figsize=(11, 4))
    grad = [(int(r["step"]), _float(r["grad_norm"])) for r in rows if r["grad_norm"]]
    if grad:
        gn.plot(*zip(*grad), lw=1, color="tab:purple", marker="." if len(grad) < 50 else None)  # a point alone shows
        if all(v > 0 for _, v in grad if math.isfinite(v)):
            from matplotlib.ticker import ScalarFormatter

            gn.set_yscale("log")
            for axis in (gn.yaxis.set_major_formatter, gn.yaxis.set_minor_formatter):
                axis(ScalarFormatter())
    skips = [int(r["step"]) for prev, r in zip([None] + rows[:-1], rows)
             if r["skipped"] and prev and prev["skipped"] and _float(r["skipped"]) > _float(prev["skipped"])]
    for step in skips:
        gn.axvline(step, color="tab:red", lw=0.8, alpha=0.6)
    gn.set(xlabel="step", ylabel="gradient norm (before clipping)",
           title="Gradient norm" + (f" ({len(skips)} skipped-step marks in red)" if skips else ""))
    gn.grid(alpha=0.3)
    train = [(int(r["step"]), _float(r["loss"])) for r in rows if r["loss"]]
    val = [(int(r["step"]), _float(r["val_loss"])) for r in rows if r["val_loss"]]
    if train:
        elbo.plot(*zip(*train), lw=1, label="training batches", marker="." if len(train) < 50 else None)
    if val:
        elbo.plot(*zip(*val), "o-", lw=1.5, label="validation")
    finite = sorted(v for _, v in train + val if math.isfinite(v))
    if len(finite) >= 20:  # the first steps are far above the rest: show from the lowest value to the 95th percentile
        low, high = finite[0], finite[int(0.95 * (len(finite) - 1))]
        elbo.set_ylim(low - 0.05 * (high - low) - 1e-3, high + 0.05 * (high - low) + 1e-3)
    elbo.set(xlabel="step", ylabel="negative ELBO, bits/dim", title="Negative ELBO per pixel")
    elbo.grid(alpha=0.3)
    if train or val:
        elbo.legend()
    fig.tight_layout()
    _save_png(fig, out)
    _write_csv(csv_path(out), CURVE_FIELDS, [[r[k] for k in CURVE_FIELDS] for r in rows])
    return rows
