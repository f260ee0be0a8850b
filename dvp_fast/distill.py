"""Few-step samplers for the diffusion prior over u, distilled from a trained model (beyond the paper).

    from dvp_fast.distill import distill
    report = distill(model, steps=(1, 2, 4))    # adds model.u_students["1"], ["2"], ["4"]
    images = model.sample(1000, steps=4)        # uses the 4-step student (model.sampler_for(4) == "student")

Each student is a copy of the teacher's UNet run as a k-step ancestral sampler, fitted to the teacher's
output distribution rather than to its deterministic path: through its k steps (noise reparameterised) it
minimises the energy distance between its samples and samples of the teacher's 50-step sampler, plus a
mean-and-covariance term and, from REVERSE_KL_MIN_STEPS steps on, the reverse-KL gradient of distribution
matching distillation (FakeScore). RECIPES says how each step count is fitted. Why this method, and the
measurements behind every number of the recipe: docs/distillation.md.

The student is a sampler only: the likelihood (ELBO, `nll`, training) always uses the full prior.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass

import torch

from .diffusion import DiffusionPrior, _sigmoid

TEACHER_STEPS = 50
TEACHER_SAMPLES = 16384  # the pool of teacher samples the students are fitted to
MOMENT_WEIGHT = 1.0  # the mean-and-covariance term beside the energy distance
SCORE_SAMPLES = 4096  # each of the fresh teacher draws a student is scored (or chosen) against
CANDIDATE_SEED_STRIDE = 1000  # candidate c of a k-step student is fitted with seed + k + stride * c
REVERSE_KL_MIN_STEPS = 4  # fewer steps: no reverse-KL term (with it their fits collapse)
REVERSE_KL_TIMES = (0.02, 0.98)  # the noise levels t ~ U(times) of the reverse-KL term
FAKE_LR = 3e-4  # the reverse-KL term's fake network's learning rate
LEARNING_RATES = {"eps": 3e-4, "x": 1e-3}  # a student's Adam learning rate (decayed to zero on a cosine), by what it predicts


@dataclass(frozen=True)
class StudentRecipe:
    """How a k-step student is fitted (docs/distillation.md: the measurement behind each entry)."""

    predicts: str = "eps"  # what its network predicts: "eps", or "x" (from one step, 1 / alpha_1 = 33 amplifies eps)
    iterations: int = 400
    reverse_kl_weight: float = 0.1  # the reverse-KL term's weight (0: none)
    fake_updates: int = 1  # the fake network's Adam steps per student step (DMD2's two time-scale rule)


# The recipe by step count; any other count gets default_recipe's.
RECIPES = {
    1: StudentRecipe(predicts="x", reverse_kl_weight=0.0),
    2: StudentRecipe(reverse_kl_weight=0.0),
    4: StudentRecipe(iterations=1600, reverse_kl_weight=0.3, fake_updates=5),
}


def default_recipe(steps: int) -> StudentRecipe:
    """The recipe of a step count RECIPES does not list: eps, 400 iterations, the reverse-KL term at 0.1
    from REVERSE_KL_MIN_STEPS steps on."""
    return StudentRecipe(reverse_kl_weight=0.1 if steps >= REVERSE_KL_MIN_STEPS else 0.0)


def recipe_for(steps: int) -> StudentRecipe:
    """The recipe distill() fits a `steps`-step student with, before any explicit override."""
    return RECIPES.get(steps) or default_recipe(steps)


def iterations_for(steps: int) -> int:
    """The optimisation steps distill() gives a `steps`-step student by default."""
    return recipe_for(steps).iterations


def reverse_kl_for(steps: int, weight: float | None = None, fake_updates: int | None = None) -> tuple[float, int]:
    """The reverse-KL weight and fake-score updates per step distill() gives a `steps`-step student: none below
    REVERSE_KL_MIN_STEPS; else `weight` and `fake_updates` where given, the recipe's where not."""
    recipe = recipe_for(steps)
    if steps < REVERSE_KL_MIN_STEPS:
        return 0.0, recipe.fake_updates
    return (recipe.reverse_kl_weight if weight is None else weight,
            recipe.fake_updates if fake_updates is None else fake_updates)


def predicts_for(steps: int, x_prediction_steps=None) -> str:
    """What the `steps`-step student's network predicts: the recipe's, or "x" exactly for `x_prediction_steps`."""
    if x_prediction_steps is None:
        return recipe_for(steps).predicts
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
    has little, which the energy distance hardly sees (docs/distillation.md).
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


def distill_one(prior: DiffusionPrior, steps: int, targets: torch.Tensor, iterations: int = StudentRecipe.iterations,
                batch_size: int = 256, lr: float = LEARNING_RATES["eps"], init: torch.nn.Module | None = None,
                progress: bool = False, seed: int = 0, predicts: str = "eps",
                moment_weight: float = MOMENT_WEIGHT, reverse_kl_weight: float = StudentRecipe.reverse_kl_weight,
                fake_updates: int = StudentRecipe.fake_updates) -> tuple[torch.nn.Module, list[float]]:
    """A `steps`-step student network (predicting eps or x) fitted to `targets` (teacher samples);
    returns it and its losses.

    Adam (learning rate decayed to zero on a cosine) on the energy distance between a batch of student
    samples and a batch of targets, plus `moment_weight` times `moment_mismatch` against the mean and
    covariance of all the targets, plus `reverse_kl_weight` times FakeScore's reverse-KL term (its draws from
    their own generator, so that the rest draws as without it; the losses returned leave it out: its value is
    zero); the student initialised from `init` (default: the teacher's eps-network). The fake network of the
    reverse-KL term takes `fake_updates` Adam steps per student step, each on
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
    flat = targets.flatten(1).float()
    target_mean, target_cov = flat.mean(0), torch.cov(flat.T)
    fake = FakeScore(prior, torch.Generator(device=targets.device).manual_seed(seed + 1)) if reverse_kl_weight else None
    losses = []
    from tqdm import tqdm

    with tqdm(total=iterations, desc=f"dvp-distill {steps}-step", unit="it", disable=not progress,
              file=sys.stderr, mininterval=1.0) as bar:
        for _ in range(iterations):
            rows = torch.randint(0, targets.shape[0], (batch_size,), device=targets.device, generator=generator)
            u = student_sample(prior, student, batch_size, steps, generator, predicts)
            loss = energy_distance(u, flat[rows])
            if moment_weight:
                loss = loss + moment_weight * moment_mismatch(u, target_mean, target_cov)
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
            x_prediction_steps=None, moment_weight: float = MOMENT_WEIGHT, candidates: int = 1,
            reverse_kl_weight: float | None = None, fake_updates: int | None = None) -> dict:
    """Distil `model`'s diffusion prior into students for each of `steps`, added to the model in place.

    Draws `teacher_n` samples of the teacher's 50-step ancestral sampler, fits one student per step
    count to them with its recipe (recipe_for; `iterations`, `lr`, `reverse_kl_weight` and `fake_updates` override
    it where given, the latter two only for students of REVERSE_KL_MIN_STEPS steps or more, the others get no
    reverse-KL term; `moment_weight`: see distill_one), and scores each against min(teacher_n / 2,
    SCORE_SAMPLES) fresh teacher samples (energy distance; the same score for a second fresh teacher
    draw is the noise floor). Returns the report. Students that predict x (the recipe's, or exactly
    `x_prediction_steps` where given) start from the teacher's network; the others
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
        # A student without the reverse-KL term does not start from one fitted with it (such starts collapsed).
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
