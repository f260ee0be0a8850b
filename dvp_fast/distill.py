"""Few-step samplers for the diffusion prior over u, distilled from a trained model (beyond the paper).

    from dvp_fast.distill import distill
    report = distill(model, steps=(1, 2, 4))    # adds model.u_students["1"], ["2"], ["4"]
    images = model.sample(1000, steps=4)        # uses the 4-step student (model.sampler_for(4) == "student")

The method, and why (bench/results/distill-*.md has the measurements). Progressive distillation,
consistency distillation and ECT all compress the teacher's deterministic probability-flow path
(its DDIM sampler). On the first mnist prior trained here (461 steps) that path ended away from the data: DDIM's
samples sit at energy distance 0.17 to 0.19 from held-out pseudo-inputs from 4 steps on, with
a per-dimension spread 1.7 times the data's, where the 50-step ancestral sampler is at 0.048, as
close as real pseudo-inputs are (bench/results/sampler-quality-2026-12-01.md; on the 1,100-step
teacher of distill-2026-12-01.md DDIM is at 0.013 to 0.025 from validation pseudo-inputs, ancestral at
0.0054 to 0.0073). A student that
reproduced the deterministic path faithfully would inherit that gap. So the student is fitted to
the teacher's *output distribution* instead: a k-step ancestral sampler whose eps-network starts
as a copy of the teacher's and is trained, through its k steps (noise reparameterised), to
minimise the energy distance (Székely & Rizzo; kernel-free, zero only for equal distributions)
between its samples and samples of the teacher's 50-step ancestral sampler, drawn once, plus a
term matching their mean and covariance (MOMENT_WEIGHT, TEACHER_SAMPLES below), and, from 4 steps on, the reverse-KL
gradient of distribution matching distillation (FakeScore, REVERSE_KL_WEIGHT), which pulls in the rare samples far
from the teacher's that the energy distance leaves alone (for 4-step students with a larger weight and several
fake-score updates per step, REVERSE_KL_WEIGHT_BY_STEPS, which brings their decoded digits' confidence to the
teacher's); with `candidates`, several seeds are fitted and the one closest to a further teacher draw is kept.
The one-step student's network predicts x itself rather than eps (X_PREDICTION_STEPS, below).

The student is a sampler only: the likelihood (ELBO, `nll`, training) always uses the full prior.
"""
from __future__ import annotations

import copy
import math
import sys
import time

import torch

from .diffusion import DiffusionPrior, _sigmoid

TEACHER_STEPS = 50
# Step counts whose student predicts x instead of eps, and each parameterisation's learning rate.
# Measured (bench/results/distill-parameterisation-2026-12-01.md): one step from z_1 ~ N(0, I) reads
# x_hat = (z - sigma_1 eps) / alpha_1, 33 times eps's error, and half the teacher's x_hat sits on
# the clamp; an eps student barely moves from there (energy distance 1.99 -> 1.50 in 150
# iterations), an x student reaches the teacher's own spread (0.006). From two steps on, eps does
# as well or better (0.005 against x's 0.007 at two steps) and starts from the teacher's network.
X_PREDICTION_STEPS = (1,)
LEARNING_RATES = {"eps": 3e-4, "x": 1e-3}
# The pool of teacher samples, and the weight of the mean-and-covariance term beside the energy distance.
# Measured on 4-step students (bench/results/distill-four-steps-2026-12-01.md): fitted to 4,096 teacher
# samples a student ends at energy distance 0.0006 from fresh teacher samples; fitted to 16,384 at 0.0002;
# with the moment term besides at 0.00007, its covariance (the Frechet distance's covariance term) 1.8
# times closer. A batch of 1024 for a quarter of the iterations does no better than 256. A second
# teacher draw is at 0.00002. One run each: three later 4-step students with this pool and term ended at 0.0003
# to 0.00035 (bench/results/distill-2026-12-01*-report.json), so a distillation's own run-to-run
# spread is as large as these differences.
TEACHER_SAMPLES = 16384
MOMENT_WEIGHT = 1.0
SCORE_SAMPLES = 4096  # each of the fresh teacher draws a student is scored (or chosen) against
# Candidate c of a step count is fitted with seed + k + CANDIDATE_SEED_STRIDE * c (candidate 0: as without candidates).
# Candidates exist because a distillation's seed matters as much as its recipe (above): three 4-step students of
# one recipe and pool ended at 0.00037, 0.00018 and 0.00041 from a fresh teacher draw
# (bench/results/distill-2026-12-01-candidates-report.json).
CANDIDATE_SEED_STRIDE = 1000
# The weight of the reverse-KL term (FakeScore) beside the energy distance, its noise levels and its fake network's
# learning rate. Measured on 4-step students (bench/results/distill-2026-12-02-four-step-objectives.md): the energy
# distance barely moves a sample far from both sample sets (its pull to the targets and its push from the student's
# others point the same way), and about 1 % of a 4-step student's samples lay further from real pseudo-inputs than any
# of the teacher's; with this term at 0.1 the student has fewer such samples than the teacher (102 of 10,000 beyond
# 1.5 from every validation f(x), the teacher 155, without the term 253); at 0.03 it removes less than half as many
# (68 against 151); at 0.3 and 1 the fit collapses (energy distance 0.15 to validation f(x)); over 100 runs of 1,000
# the recipe's 4-step student passes the 10-run test of bench/distill_quality.py 97 % of the time, without the term
# 95 % (distill-2026-12-02-many-runs.md). Only students of REVERSE_KL_MIN_STEPS steps or more get it: in the full
# recipe with it at every step count (distill-2026-12-02-reverse-kl-report.json) the 2-step
# student kept was at 0.051 from a teacher draw, against 0.0013 without it from the same start and seeds
# (distill-2026-12-02-report.json), and the 1-step one at 0.0034 against 0.0028. Nor do they start from a student
# fitted with it (distill() says why).
REVERSE_KL_WEIGHT = 0.1
REVERSE_KL_MIN_STEPS = 4
# The 4-step student's weight and fake-score updates per student step (others: REVERSE_KL_WEIGHT, FAKE_UPDATES). On the
# teacher trained for 3,300 steps every 4-step student fitted with the term at 0.1 and one fake update a step sat about
# 0.01 below the 50-step teacher's mean classifier confidence (0.782 to 0.797 against 0.804 over 10 runs), from
# whatever seed, iterations (400 to 3200), pool, whitened energy distance or extra Gaussian-kernel MMD term; a weight
# of 0.3 (which collapsed at 400 iterations with one fake update a step) with the fake network taking 5 Adam steps per
# student step (DMD2's two time-scale rule, Yin et al. 2024: the fake score tracks the student) brings it to 0.804,
# 0.803 and 0.801 in three fits (seeds 1004, 4 and 2004), each within on both distances too
# (bench/results/distill-2026-12-03-four-step-objectives.md, -four-step-recipe-10-runs.md). 5 fake updates with the
# weight at 0.1 do not (0.793): it is the larger weight, made stable, that does it.
REVERSE_KL_WEIGHT_BY_STEPS = {4: 0.3}
FAKE_UPDATES_BY_STEPS = {4: 5}
REVERSE_KL_TIMES = (0.02, 0.98)
FAKE_LR = 3e-4
FAKE_UPDATES = 1
# Optimisation steps per student, by step count (others: ITERATIONS). On the teacher trained for 3,300 steps the 4-step
# student of 400 iterations is below the 50-step teacher's run-to-run spread on classifier confidence (mean 0.786
# against 0.792 to 0.815), at 800 still (0.790); at 1600 it is within on confidence (0.795) and both distances to
# held-out f(x); without the reverse-KL term 1600 iterations do not help (0.783), and at 400 neither a weight of 0.03
# nor a start from the teacher's network does (bench/results/distill-2026-12-03-four-step-confidence.md; one fit,
# seed 1004, each). Not by every seed: the candidate dvp-distill --candidates 3 keeps at 1600 (seed 2004) is 0.0003
# below on confidence, and at 3200 seed 2004 misses test f(x) by 0.00003 (distill-2026-12-03-four-step-3200.md);
# hence the 4-step reverse-KL recipe above (REVERSE_KL_WEIGHT_BY_STEPS), measured at 1600.
# The 8-step student is within at 400.
ITERATIONS = 400
ITERATIONS_BY_STEPS = {4: 1600}
# Off by default, kept as options of distill_one because they were measured: on that teacher's 4-step student
# (1600 iterations, reverse-KL weight 0.1) the energy distance and moment term in whitened coordinates made all three
# measures worse (confidence 0.782), and a Gaussian-kernel MMD term at MMD_BANDWIDTHS times the targets' median
# distance, weight 10, the confidence too (0.787; distill-2026-12-03-four-step-objectives.md).
WHITEN = False
MMD_WEIGHT = 0.0
MMD_BANDWIDTHS = (0.25, 0.5)


def iterations_for(steps: int) -> int:
    """The optimisation steps distill() gives a `steps`-step student by default."""
    return ITERATIONS_BY_STEPS.get(steps, ITERATIONS)


def reverse_kl_for(steps: int, weight: float | None = None, fake_updates: int | None = None) -> tuple[float, int]:
    """The reverse-KL weight and fake-score updates per step distill() gives a `steps`-step student: none below
    REVERSE_KL_MIN_STEPS; else `weight` and `fake_updates` where given, the step count's own defaults where not."""
    if steps < REVERSE_KL_MIN_STEPS:
        return 0.0, FAKE_UPDATES
    return (REVERSE_KL_WEIGHT_BY_STEPS.get(steps, REVERSE_KL_WEIGHT) if weight is None else weight,
            FAKE_UPDATES_BY_STEPS.get(steps, FAKE_UPDATES) if fake_updates is None else fake_updates)


def predicts_for(steps: int, x_prediction_steps=X_PREDICTION_STEPS) -> str:
    """What the `steps`-step student's network predicts: "x" for `x_prediction_steps`, else "eps"."""
    return "x" if steps in x_prediction_steps else "eps"


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between the rows of x and y (flattened),
    with the unbiased within-sample means (diagonals left out); differentiable."""
    x, y = x.flatten(1).float(), y.flatten(1).float()
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"energy_distance needs at least 2 rows per sample, got {n} and {m}")
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return 2 * xy - xx - yy


def moment_mismatch(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of ||E x - mean||^2 + ||Cov x - cov||_F^2 from the rows of x (flattened):
    the inner product of two independent halves' deviations, so that a batch's sampling noise does
    not push the estimate up (a plain ||Cov_batch - cov||^2 would, by about tr(C)^2 / n, and so
    reward shrinking the covariance)."""
    x = x.flatten(1).float()
    if x.shape[0] < 4:
        raise ValueError(f"moment_mismatch needs at least 4 rows, got {x.shape[0]}")
    a, b = x[: x.shape[0] // 2], x[x.shape[0] // 2: 2 * (x.shape[0] // 2)]
    mean_a, mean_b = a.mean(0) - mean, b.mean(0) - mean
    cov_a, cov_b = torch.cov(a.T) - cov, torch.cov(b.T) - cov
    return (mean_a * mean_b).sum() + (cov_a * cov_b).sum()


class Whitening:
    """The affine map u -> (u - mean) C^{-1/2} (ZCA) of a sample set's mean and covariance C, eigenvalues floored at
    `floor` times the largest: in its coordinates every direction of the targets has unit variance, so that the
    energy distance and the moment term weigh a low-variance direction as much as a high-variance one (in u the
    leading directions dominate both)."""

    def __init__(self, targets: torch.Tensor, floor: float = 1e-6):
        flat = targets.flatten(1).double()
        values, vectors = torch.linalg.eigh(torch.cov(flat.T))
        values = values.clamp_min(floor * values.max())
        self.mean, self.matrix = flat.mean(0).float(), ((vectors * values.rsqrt()) @ vectors.T).float()

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return (u.flatten(1).float() - self.mean) @ self.matrix


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths) -> torch.Tensor:
    """Unbiased squared MMD between the rows of x and y (flattened) for the sum of Gaussian kernels
    exp(-|a - b|^2 / (2 h^2)), h in `bandwidths`; differentiable. Narrow kernels see what the energy distance,
    whose |a - b| grows without bound, barely weighs: how tightly samples gather where the targets do."""
    x, y = x.flatten(1).float(), y.flatten(1).float()
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"gaussian_mmd needs at least 2 rows per sample, got {n} and {m}")
    dxx, dyy, dxy = torch.cdist(x, x).pow(2), torch.cdist(y, y).pow(2), torch.cdist(x, y).pow(2)
    total = x.new_zeros(())
    for h in bandwidths:
        k = lambda d: torch.exp(-d / (2 * h * h))  # noqa: E731
        total = total + (k(dxx).sum() - n) / (n * (n - 1)) + (k(dyy).sum() - m) / (m * (m - 1)) - 2 * k(dxy).mean()
    return total


def median_distance(u: torch.Tensor, rows: int = 1000) -> float:
    """The median Euclidean distance between two of the first `rows` rows of u (flattened), distinct rows."""
    x = u[:rows].flatten(1).float()
    d = torch.cdist(x, x)
    return float(d[~torch.eye(x.shape[0], dtype=torch.bool, device=d.device)].median())


def student_sample(prior: DiffusionPrior, unet: torch.nn.Module, n: int, steps: int,
                   generator: torch.Generator | None = None, predicts: str = "eps",
                   straight_through: bool = True) -> torch.Tensor:
    """u from the k-step ancestral sampler with `unet` as the network (predicting eps or x),
    differentiable in its weights: the update of DiffusionPrior.sample(sampler="ancestral", unet=unet,
    predicts=predicts), with the gradient passed straight through the clamp of x_hat (unless
    `straight_through` is False: then none where x_hat is clamped)."""
    device = next(unet.parameters()).device
    table = prior.sampler_coefficients(steps, "ancestral", device)
    z = torch.randn(n, *prior.shape, device=device, generator=generator)
    for k in range(steps):
        noise = torch.randn(z.shape, device=device, generator=generator)
        z = prior.denoise_step(z, table[k], noise, unet, predicts, straight_through)
    return z / math.sqrt(_sigmoid(-prior.gamma_min))


class FakeScore:
    """The reverse-KL term of distribution matching distillation (Yin et al., DMD, 2024).

    KL(student || teacher) has the gradient E[score_student(u) - score_teacher(u)] in the student's samples u; on
    noised samples z_t = alpha_t u + sigma_t eps both scores are known through denoisers: the teacher's network, and
    a "fake" one fitted to the student's own samples as they change (it starts as the teacher's and takes an Adam
    step of the diffusion loss on each batch of the student's samples, `fit`). `term(u)` is zero in value and has the
    gradient (x_fake - x_real) / mean|u - x_real| in each sample u (DMD's per-sample normalisation), x_real and x_fake
    the two denoisers' estimates of u from z_t, t ~ U(REVERSE_KL_TIMES): sigma_t^2 / alpha_t times the difference of
    the scores, so a positive weighting of the KL's gradient. It is large where the student puts mass and the teacher
    has little, which the energy distance hardly sees (REVERSE_KL_WEIGHT).
    """

    def __init__(self, prior: DiffusionPrior, generator: torch.Generator, lr: float = FAKE_LR):
        self.prior, self.generator = prior, generator
        self.fake = copy.deepcopy(prior.unet).eval()
        for p in self.fake.parameters():
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.fake.parameters(), lr=lr)

    def _noised(self, u: torch.Tensor, times: tuple[float, float]):
        lo, hi = times
        t = lo + (hi - lo) * torch.rand(u.shape[0], device=u.device, generator=self.generator)
        g = self.prior.gamma(t)[:, None, None, None]
        eps = torch.randn(u.shape, device=u.device, generator=self.generator)
        alpha, sigma = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
        return alpha * u + sigma * eps, t, eps, alpha, sigma

    def term(self, u: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z, t, _, alpha, sigma = self._noised(u.detach().float(), REVERSE_KL_TIMES)
            x_real = (z - sigma * self.prior.unet(z, t).float()) / alpha
            x_fake = (z - sigma * self.fake(z, t).float()) / alpha
            scale = (u.detach() - x_real).abs().flatten(1).mean(1).clamp_min(1e-6)
            g = (x_fake - x_real) / scale[:, None, None, None]
        return (g * (u - u.detach())).flatten(1).sum(1).mean()

    def fit(self, u: torch.Tensor) -> None:
        z, t, eps, _, _ = self._noised(u.detach().float(), (0.0, 1.0))
        loss = (self.fake(z, t).float() - eps).pow(2).flatten(1).sum(1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


@torch.no_grad()
def teacher_samples(prior: DiffusionPrior, n: int, steps: int = TEACHER_STEPS, batch: int = 1000) -> torch.Tensor:
    """n samples of the teacher's own `steps`-step ancestral sampler (what the students are fitted to)."""
    return torch.cat([prior.sample(min(batch, n - i), steps=steps, sampler="ancestral")
                      for i in range(0, n, batch)])


def distill_one(prior: DiffusionPrior, steps: int, targets: torch.Tensor, iterations: int = ITERATIONS,
                batch_size: int = 256, lr: float = 3e-4, init: torch.nn.Module | None = None,
                progress: bool = False, seed: int = 0, predicts: str = "eps",
                moment_weight: float = MOMENT_WEIGHT, reverse_kl_weight: float = REVERSE_KL_WEIGHT,
                whiten: bool = WHITEN, mmd_weight: float = MMD_WEIGHT,
                fake_updates: int = FAKE_UPDATES) -> tuple[torch.nn.Module, list[float]]:
    """A `steps`-step student network (predicting eps or x) fitted to `targets` (teacher samples);
    returns it and its losses.

    Adam (learning rate decayed to zero on a cosine) on the energy distance between a batch of student
    samples and a batch of targets, plus `moment_weight` times `moment_mismatch` against the mean and
    covariance of all the targets, plus `reverse_kl_weight` times FakeScore's reverse-KL term (its draws from
    their own generator, so that the rest draws as without it; the losses returned leave it out: its value is
    zero); the student initialised from `init` (default: the teacher's eps-network). With `whiten`, the energy
    distance and the moment term are taken in the targets' whitened coordinates (Whitening); the reverse-KL term
    stays in u. `mmd_weight` adds that times gaussian_mmd (in u) at MMD_BANDWIDTHS times the targets' median
    distance. The fake network of the reverse-KL term takes `fake_updates` Adam steps per student step, each on
    the batch of student samples with fresh noise (more than one: DMD2's two time-scale rule, so that it tracks the
    student).
    """
    if targets.shape[0] < 2 * batch_size:
        raise ValueError(f"distillation needs at least {2 * batch_size} teacher samples for batch {batch_size}, "
                         f"got {targets.shape[0]}")
    # Fitted in eval mode: the student samples with dropout off (DiffusionPrior.sample), so it is fitted so.
    student = copy.deepcopy(init if init is not None else prior.unet).eval()
    for p in student.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    # Cosine decay to zero: the energy-distance gradient of a batch is noisy, the last iterate settles.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations)
    generator = torch.Generator(device=targets.device).manual_seed(seed)
    coordinates = Whitening(targets) if whiten else (lambda u: u.flatten(1).float())
    flat = coordinates(targets)
    target_mean, target_cov = flat.mean(0), torch.cov(flat.T)
    if mmd_weight:
        median = median_distance(targets)
        bandwidths = [f * median for f in MMD_BANDWIDTHS]
    fake = FakeScore(prior, torch.Generator(device=targets.device).manual_seed(seed + 1)) if reverse_kl_weight else None
    losses = []
    from tqdm import tqdm

    with tqdm(total=iterations, desc=f"dvp-distill {steps}-step", unit="it", disable=not progress,
              file=sys.stderr, mininterval=1.0) as bar:
        for _ in range(iterations):
            rows = torch.randint(0, targets.shape[0], (batch_size,), device=targets.device, generator=generator)
            u = student_sample(prior, student, batch_size, steps, generator, predicts)
            v = coordinates(u)
            loss = energy_distance(v, flat[rows])
            if moment_weight:
                loss = loss + moment_weight * moment_mismatch(v, target_mean, target_cov)
            if mmd_weight:
                loss = loss + mmd_weight * gaussian_mmd(u, targets[rows], bandwidths)
            losses.append(float(loss.detach()))
            if fake is not None:
                loss = loss + reverse_kl_weight * fake.term(u)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if fake is not None:
                for _ in range(fake_updates):
                    fake.fit(u)
            bar.update(1)
            bar.set_postfix(energy=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", refresh=False)
    return student, losses


def _eps_student_above(model, steps: int, below: int | None = None) -> int | None:
    """The fewest-step eps student of `model` with more than `steps` steps (and fewer than `below`; None: there
    is none), which a new `steps`-step eps student starts from: progressively, each from the next longer sampler."""
    above = [int(k) for k in model.u_students if int(k) > steps and model.student_predicts(int(k)) == "eps"
             and (below is None or int(k) < below)]
    return min(above) if above else None


def distill(model, steps=(1, 2, 4), iterations: int | None = None, batch_size: int = 256, lr: float | None = None,
            teacher_n: int = TEACHER_SAMPLES, progress: bool = True, seed: int = 0,
            x_prediction_steps=X_PREDICTION_STEPS, moment_weight: float = MOMENT_WEIGHT, candidates: int = 1,
            reverse_kl_weight: float | None = None, fake_updates: int | None = None) -> dict:
    """Distil `model`'s diffusion prior into students for each of `steps`, added to the model in place.

    Draws `teacher_n` samples of the teacher's 50-step ancestral sampler, fits one student per step
    count to them (`moment_weight`, `reverse_kl_weight`, `fake_updates`: see distill_one; the latter two only for
    students of REVERSE_KL_MIN_STEPS steps or more, the others get no reverse-KL term; None: each step count's
    default, reverse_kl_for), and scores each against min(teacher_n / 2,
    SCORE_SAMPLES) fresh teacher samples (energy distance; the same score for a second fresh teacher
    draw is the noise floor). Returns the report. `iterations` per student defaults to iterations_for(k).
    Students for `x_prediction_steps` predict x and start from the teacher's network; the others
    predict eps and start from the model's eps student with the next larger step count (one of this
    call's, or one the model already has: distilling an already distilled model again refines its
    students), else from the teacher's; a student fitted without the reverse-KL term (below
    REVERSE_KL_MIN_STEPS) only starts from another fitted without it. A student the model has for a step
    count in `steps` is replaced. `lr` defaults to LEARNING_RATES of each one's parameterisation.
    With `candidates` > 1, each step count is fitted that many times (different seeds) and the
    candidate closest (energy distance) to one more fresh teacher draw, used for nothing else, is kept:
    the reported score, on the held-out draw, is then not the one it was chosen by.
    """
    prior = model.u_prior
    if not isinstance(prior, DiffusionPrior):
        raise ValueError("distillation needs a model with the diffusion prior over pseudo-inputs")
    steps = sorted({int(k) for k in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"steps must be positive step counts, got {steps}")
    if fake_updates is not None and fake_updates < 1:
        raise ValueError(f"fake_updates must be at least 1, got {fake_updates}")
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    if (reverse_kl_weight is not None and reverse_kl_weight < 0) or moment_weight < 0:
        raise ValueError(f"the loss weights must be >= 0, got moment_weight={moment_weight}, "
                         f"reverse_kl_weight={reverse_kl_weight}")
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    targets = teacher_samples(prior, teacher_n)
    score_n = min(teacher_n // 2, SCORE_SAMPLES)
    held_out, second = teacher_samples(prior, score_n), teacher_samples(prior, score_n)
    # Drawn after the others, so that one candidate reproduces a distillation without candidates.
    selection = teacher_samples(prior, score_n) if candidates > 1 else None
    report = dict(teacher_steps=TEACHER_STEPS, teacher_samples=teacher_n, iterations=iterations,
                  batch_size=batch_size, moment_weight=moment_weight, reverse_kl_weight=reverse_kl_weight,
                  fake_updates=fake_updates, seed=seed,
                  candidates=candidates, students={},
                  teacher_noise_floor=float(energy_distance(second, held_out)))
    for k in sorted(steps, reverse=True):
        predicts = predicts_for(k, x_prediction_steps)
        k_lr = LEARNING_RATES[predicts] if lr is None else lr
        # A student without the reverse-KL term does not start from one fitted with it: from this recipe's 4-step
        # student two of three 2-step candidates collapsed (0.21, 0.24); the candidate-0 seed from the teacher's
        # network ended at 0.0021, from the 8-step student at 0.0019 (one fit each, 2026-12-02).
        below = REVERSE_KL_MIN_STEPS if reverse_kl_weight != 0 and k < REVERSE_KL_MIN_STEPS else None
        above = _eps_student_above(model, k, below) if predicts == "eps" else None
        k_reverse_kl, k_fake_updates = reverse_kl_for(k, reverse_kl_weight, fake_updates)
        k_iterations = iterations_for(k) if iterations is None else iterations
        fit_start = time.perf_counter()
        init = None if above is None else model.u_students[str(above)]
        fits = [distill_one(prior, k, targets, k_iterations, batch_size, k_lr, init, progress,
                            seed + k + CANDIDATE_SEED_STRIDE * c, predicts, moment_weight, k_reverse_kl,
                            fake_updates=k_fake_updates)
                for c in range(candidates)]
        chosen, selection_scores = 0, None
        if selection is not None:
            with torch.no_grad():
                selection_scores = [float(energy_distance(student_sample(prior, candidate, score_n, k, None, predicts),
                                                          selection)) for candidate, _ in fits]
            chosen = min(range(candidates), key=selection_scores.__getitem__)
        student, losses = fits[chosen]
        del fits
        with torch.no_grad():
            before = float(energy_distance(student_sample(prior, prior.unet, score_n, k), held_out))
            after = float(energy_distance(student_sample(prior, student, score_n, k, None, predicts), held_out))
        model.add_student(k, student, predicts)
        report["students"][str(k)] = dict(
            energy_distance=after, teacher_at_these_steps=before, predicts=predicts, lr=k_lr,
            started_from="teacher" if above is None else f"{above}-step student", iterations=k_iterations,
            teacher_samples=teacher_n, moment_weight=moment_weight, reverse_kl_weight=k_reverse_kl,
            fake_updates=k_fake_updates,
            candidates=candidates,
            final_loss=sum(losses[-20:]) / len(losses[-20:]), seconds=round(time.perf_counter() - fit_start, 1))
        if selection_scores is not None:
            report["students"][str(k)].update(chosen_candidate=chosen, candidate_energy_distances=selection_scores)
    report["seconds"] = round(time.perf_counter() - start, 1)
    model.train(was_training)
    return report
