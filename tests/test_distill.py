"""Distilled few-step samplers: a closed-form oracle, and the model and file plumbing around them.

The oracle: for Gaussian data x ~ N(mu, s^2) (per dimension) the exact eps-predictor of the VP
process is eps(z, t) = sigma_t (z - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2), written here from the
formulas (it shares no code with dvp_fast). A teacher with that network samples N(mu, s^2 + e^gamma_min)
in the limit of many steps (the last term is p(u | z_0)'s own variance); the students distilled
from its 1000-step samples must sample the same moments in 1 and 2 steps, where the teacher itself
is far off.
"""
import copy
import math
import os

import pytest
import torch
from torch import nn

from dvp_fast import DVPVAE
from dvp_fast.diffusion import DiffusionPrior
from dvp_fast.distill import (RECIPES, FakeScore, StudentRecipe, distill, distill_one, energy_distance,
                              moment_mismatch, recipe_for, student_sample, teacher_samples)

MU, S = 0.3, 0.2
GAMMA_MIN, GAMMA_MAX = -6.0, 7.0  # the mnist preset's schedule


class ExactGaussianEps(nn.Module):
    """The exact eps-predictor of N(mu, s^2) data (MU, S unless given), plus a learnable affine correction
    a(t) z + b(t) that starts at zero: a student family that holds the exact few-step maps."""

    def __init__(self, mu: float = MU, s: float = S):
        super().__init__()
        self.mu, self.s = mu, s
        self.correction = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 2))
        nn.init.zeros_(self.correction[2].weight)
        nn.init.zeros_(self.correction[2].bias)

    def forward(self, z, t):
        g = (GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t.double()).view(-1, 1, 1, 1)
        a2, s2 = torch.sigmoid(-g), torch.sigmoid(g)
        exact = (s2.sqrt() * (z.double() - a2.sqrt() * self.mu) / (a2 * self.s ** 2 + s2)).float()
        a, b = self.correction(t.float().view(-1, 1)).unbind(1)
        return exact + a.view(-1, 1, 1, 1) * z + b.view(-1, 1, 1, 1)


def oracle_prior() -> DiffusionPrior:
    prior = DiffusionPrior(1, 2, 16, 1, 0.0, 16, GAMMA_MIN, GAMMA_MAX)
    prior.unet = ExactGaussianEps()
    return prior


def moments(u: torch.Tensor) -> tuple[float, float]:
    return float(u.mean()), float(u.std())


@pytest.mark.slow
def test_energy_distance_is_zero_only_for_equal_distributions():
    torch.manual_seed(0)
    a, b = torch.randn(4000, 3), torch.randn(4000, 3)
    assert abs(float(energy_distance(a, b))) < 0.01
    # Closed form in one dimension for N(0,1) against N(d,1): 2 E|X-Y| - 2 E|X-X'|, E|N(m, v)| known.
    d = 1.0
    e_abs = lambda m, v: math.sqrt(2 * v / math.pi) * math.exp(-m * m / (2 * v)) + m * math.erf(m / math.sqrt(2 * v))
    expected = 2 * e_abs(d, 2.0) - 2 * e_abs(0.0, 2.0)
    got = float(energy_distance(torch.randn(20000, 1), torch.randn(20000, 1) + d))
    assert got == pytest.approx(expected, abs=0.02)


def test_the_moment_term_estimates_the_squared_moment_gaps_without_bias():
    # Batches of 64 rows of N(m, C) against a target (m0, C0): the estimates average to
    # ||m - m0||^2 + ||C - C0||_F^2, written here in float64; a plain squared norm of the batch's
    # deviations would average about (tr(C)^2 + tr(C^2) + tr(C)) / 64 = 0.23 above that for C = I.
    generator = torch.Generator().manual_seed(0)
    m, chol = torch.tensor([0.0, 0.5, -0.2]), torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.8, 0.0], [0.0, -0.4, 0.6]])
    cov = chol @ chol.T
    for m0, c0 in ((m, cov), (m + torch.tensor([0.5, 0.0, 0.0]), cov + torch.diag(torch.tensor([1.0, 0.0, 0.5])))):
        expected = float((m.double() - m0.double()).pow(2).sum() + (cov.double() - c0.double()).pow(2).sum())
        draws = [float(moment_mismatch(m + torch.randn(64, 3, generator=generator) @ chol.T, m0, c0))
                 for _ in range(3000)]
        assert sum(draws) / len(draws) == pytest.approx(expected, abs=0.02), expected
    with pytest.raises(ValueError, match="at least 4 rows"):
        moment_mismatch(torch.zeros(3, 2), torch.zeros(2), torch.eye(2))


def test_the_reverse_kl_term_descends_the_closed_form_kl_and_vanishes_at_the_teacher():
    # Student samples u = m + s xi, xi ~ N(0, I), against the Gaussian teacher N(MU, S^2), the fake network the
    # exact eps-predictor of N(m, s^2). KL(N(m, s^2) || N(MU, S^2)) per dimension has the gradient
    # ((m - MU) / S^2, s / S^2 - 1 / s), written here from the formula. The term's gradient is the KL's,
    # weighted per sample and noise level (positively), so it must be a descent direction of the KL (a positive
    # inner product with its gradient), have the KL's sign where one parameter alone is off, and be exactly zero
    # at m, s = MU, S, where the fake is the teacher's network. Swapping the fake and the teacher flips every sign.
    prior = oracle_prior()
    for m, s, off in ((MU, 1.5 * S, 1), (MU, 0.6 * S, 1), (MU, 1.1 * S, 1), (MU + 0.1, S, 0),
                      (MU - 0.15, 1.3 * S, None), (MU, S, None)):
        fake = FakeScore(prior, torch.Generator().manual_seed(3))
        fake.fake = ExactGaussianEps(m, s)
        params = torch.tensor([m, s], dtype=torch.float32, requires_grad=True)
        xi = torch.randn(20000, 1, 2, 2, generator=torch.Generator().manual_seed(4))
        fake.term(params[0] + params[1] * xi).backward()
        kl_gradient = torch.tensor([(m - MU) / S ** 2, s / S ** 2 - 1 / s])
        if (m, s) == (MU, S):
            assert params.grad.tolist() == [0.0, 0.0]
            continue
        assert float(params.grad @ kl_gradient) > 0, (m, s, params.grad)
        if off is not None:
            assert params.grad[off] * kl_gradient[off] > 0, (m, s, params.grad)
        with torch.no_grad():
            assert float(fake.term(params[0] + params[1] * xi)) == 0.0  # zero in value: losses leave it out


def test_the_fake_network_is_fitted_to_the_students_samples():
    # Fitted on samples of N(-0.2, 0.35^2), the fake (starting as the teacher's N(MU, S^2) predictor) must come
    # closer to that distribution's exact eps-predictor on its noised samples; fitted on the teacher's own
    # samples, or with a wrong noising, it would not.
    torch.manual_seed(0)
    prior = oracle_prior()
    fake = FakeScore(prior, torch.Generator().manual_seed(1), lr=3e-3)
    student_law = ExactGaussianEps(-0.2, 0.35)

    def gap():
        generator = torch.Generator().manual_seed(2)
        u = -0.2 + 0.35 * torch.randn(4096, 1, 2, 2, generator=generator)
        t = torch.rand(4096, generator=generator)
        g = prior.gamma(t)[:, None, None, None]
        z = torch.sigmoid(-g).sqrt() * u + torch.sigmoid(g).sqrt() * torch.randn(u.shape, generator=generator)
        with torch.no_grad():
            return float((fake.fake(z, t) - student_law(z, t)).pow(2).mean())

    before = gap()
    for _ in range(300):
        fake.fit(-0.2 + 0.35 * torch.randn(256, 1, 2, 2))
    assert gap() < 0.3 * before, (before, gap())


@pytest.mark.slow
def test_students_of_the_exact_gaussian_prior_reproduce_its_moments_in_one_and_two_steps():
    torch.manual_seed(0)
    prior = oracle_prior()
    target_std = math.sqrt(S ** 2 + math.exp(GAMMA_MIN))
    teacher = teacher_samples(prior, 8192, steps=1000)  # the many-step limit (50 steps shrink the spread 6 %)
    t_mean, t_std = moments(teacher)
    assert t_mean == pytest.approx(MU, abs=0.005) and t_std == pytest.approx(target_std, rel=0.02)
    for steps, predicts in ((2, "eps"), (1, "x")):  # dvp_fast.distill's choice: x for one step
        student, losses = distill_one(prior, steps, teacher, iterations=200, batch_size=256, lr=3e-3,
                                      seed=steps, predicts=predicts)
        with torch.no_grad():
            before = moments(prior.sample(10000, steps=steps, sampler="ancestral"))
            after = moments(prior.sample(10000, steps=steps, sampler="ancestral", unet=student, predicts=predicts))
        # The teacher itself is off in so few steps; the student is not (stated tolerances: the mean
        # within 0.01, the standard deviation within 5 %, over 10,000 samples).
        assert abs(before[0] - MU) > 0.02 or abs(before[1] / target_std - 1) > 0.1, before
        assert after[0] == pytest.approx(MU, abs=0.01), (steps, after)
        assert after[1] == pytest.approx(target_std, rel=0.05), (steps, after)
        assert losses[-1] < losses[0]


def test_a_student_is_fitted_with_dropout_off_as_it_samples():
    # The omniglot preset's prior has dropout; a student fitted with it on would be fitted to a
    # sampler other than the one it samples with. With a learning rate of 0, the first loss must be
    # the energy distance of the dropout-free network's samples, replayed from the same generator.
    torch.manual_seed(0)
    prior = DiffusionPrior(1, 4, 16, 1, 0.5, 8, GAMMA_MIN, GAMMA_MAX)
    with torch.no_grad():
        for p in prior.unet.parameters():
            p.add_(0.3 * torch.randn_like(p))  # the zero-initialised output convs would hide dropout
    targets = torch.randn(64, 1, 4, 4)
    _, losses = distill_one(prior, 2, targets, iterations=1, batch_size=32, lr=0.0, seed=5, moment_weight=0.0)
    generator = torch.Generator().manual_seed(5)
    rows = torch.randint(0, 64, (32,), generator=generator)
    with torch.no_grad():
        u = student_sample(prior, copy.deepcopy(prior.unet).eval(), 32, 2, generator)
    assert losses[0] == pytest.approx(float(energy_distance(u, targets[rows])), rel=1e-5, abs=1e-7)


def test_an_x_predicting_step_uses_the_network_output_as_x_and_passes_the_clamp_gradient_on_request():
    prior = oracle_prior()
    torch.manual_seed(0)
    table = prior.sampler_coefficients(1, "ancestral", torch.device("cpu"))
    t, inv_alpha, sigma, coef_z, coef_x, std = table[0].double()
    z = torch.randn(5, 1, 2, 2)
    x = (torch.rand(5, 1, 2, 2) * 3 - 1.5).requires_grad_(True)  # a third of it beyond [-1, 1]

    class Constant(nn.Module):
        def forward(self, z, t):
            return x

    step = prior.denoise_step(z, table[0], None, Constant(), predicts="x", straight_through=True)
    expected = coef_z * z.double() + coef_x * x.detach().double().clamp(-1, 1)  # written from the update
    torch.testing.assert_close(step.double(), expected, rtol=1e-6, atol=1e-6)
    step.sum().backward()
    torch.testing.assert_close(x.grad.double(), torch.full_like(x, float(coef_x)).double())
    x.grad = None
    prior.denoise_step(z, table[0], None, Constant(), predicts="x").sum().backward()
    assert (x.grad[x.detach().abs() > 1] == 0).all() and (x.grad[x.detach().abs() < 1] != 0).all()
    with pytest.raises(ValueError, match="predicts must be one of"):
        prior.sample(2, steps=1, predicts="v")
    import dataclasses

    config = DVPVAE.from_preset("mnist", num_ch=8).config
    with pytest.raises(ValueError, match=r"distilled_x_prediction \(1,\) must be among distilled_steps \(2,\)"):
        dataclasses.replace(config, distilled_steps=(2,), distilled_x_prediction=(1,))


def small_model(**overrides) -> DVPVAE:
    torch.manual_seed(0)
    model = DVPVAE.from_preset("mnist", num_ch=8, diffusion_channels=16, diffusion_res_blocks=1, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.mark.slow
def test_a_distilled_model_samples_with_its_student_and_saves_it(tmp_path):
    model = small_model()
    report = distill(model, steps=(1, 2), iterations=3, batch_size=32, teacher_n=64, progress=False)
    assert set(report["students"]) == {"1", "2"} and model.config.distilled_steps == (1, 2)
    assert model.config.distilled_x_prediction == (1,) and model.student_predicts(1) == "x"
    assert report["students"]["1"]["predicts"] == "x" and report["students"]["2"]["predicts"] == "eps"
    # The reverse-KL term only from 4 steps on (distill.REVERSE_KL_MIN_STEPS), and a student without it never
    # starts from one with it.
    assert report["reverse_kl_weight"] is None and report["students"]["2"]["reverse_kl_weight"] == 0.0
    four = small_model()
    both = distill(four, steps=(2, 4), iterations=2, batch_size=32, teacher_n=64, progress=False)
    assert both["students"]["4"]["reverse_kl_weight"] == 0.3 and both["students"]["2"]["started_from"] == "teacher"
    assert model.sampler_for(2) == "student" and model.sampler_for(4) == "ancestral"
    assert model.sampler_for(2, "ddim") == "ddim"
    with pytest.raises(ValueError, match=r"no distilled student for 4 steps \(this model has students for \[1, 2\]"):
        model.sample(2, steps=4, sampler="student")
    assert model.sample(3, steps=2).shape == (3, 1, 28, 28)
    # The student is what samples: changing it changes the samples, the teacher's network stays out.
    torch.manual_seed(5)
    a = model.sample(4, steps=2)
    with torch.no_grad():
        for p in model.u_students["2"].parameters():
            p.add_(0.5)
    torch.manual_seed(5)
    assert not torch.equal(a, model.sample(4, steps=2))
    # Frozen: training never updates a student, and the likelihood never uses one.
    assert all(not p.requires_grad for p in model.u_students.parameters())
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    plain = small_model()  # the same weights without students: the same ELBO, draw for draw
    torch.manual_seed(1)
    plain_elbo = plain(x).elbo
    torch.manual_seed(1)
    assert torch.equal(model(x).elbo, plain_elbo)
    # Saved with the model, in both formats, and rebuilt from the configuration on load.
    model.save_pretrained(str(tmp_path / "shared"))
    loaded = DVPVAE.from_pretrained(str(tmp_path / "shared"))
    assert loaded.config.distilled_steps == (1, 2) and loaded.student_predicts(1) == "x"
    torch.manual_seed(2)
    u = model.sample_pseudoinputs(3, steps=1)
    torch.manual_seed(2)
    torch.testing.assert_close(loaded.sample_pseudoinputs(3, steps=1), u)
    saved, restored = model.u_students.state_dict(), loaded.u_students.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    # Distilled again, a student is replaced, and an eps one starts from the next longer eps student.
    again = distill(model, steps=(1,), iterations=2, batch_size=32, teacher_n=64, progress=False,
                    x_prediction_steps=())
    assert again["students"]["1"]["started_from"] == "2-step student" and report["students"]["2"]["started_from"] \
        == "teacher" and report["students"]["1"]["started_from"] == "teacher"  # x students start from the teacher
    assert sorted(model.config.distilled_steps) == [1, 2] and model.student_predicts(1) == "eps"
    assert sorted(model.u_students) == ["1", "2"]


def test_with_candidates_the_student_kept_is_the_one_closest_to_a_separate_teacher_draw(monkeypatch):
    import dvp_fast.distill as distill_module

    fitted, real_distill_one = {}, distill_module.distill_one

    def planted(prior, steps, targets, iterations, batch_size, lr, init, progress, seed, predicts, moment_weight,
                reverse_kl_weight, **options):
        student, losses = real_distill_one(prior, steps, targets, iterations, batch_size, lr, init, progress, seed,
                                           predicts, moment_weight, reverse_kl_weight, **options)
        candidate = (seed - steps) // distill_module.CANDIDATE_SEED_STRIDE
        if candidate != 1:  # planted far from the teacher: first and last, so neither "first" nor "last" passes
            with torch.no_grad():
                for p in student.parameters():
                    p.add_(0.5 * torch.randn_like(p))
        fitted[candidate] = student
        return student, losses

    monkeypatch.setattr(distill_module, "distill_one", planted)
    model = small_model()
    report = distill(model, steps=(2,), iterations=3, batch_size=32, teacher_n=64, progress=False, candidates=3)
    entry = report["students"]["2"]
    scores = entry["candidate_energy_distances"]
    assert sorted(fitted) == [0, 1, 2] and entry["candidates"] == 3 and report["candidates"] == 3
    assert entry["chosen_candidate"] == 1 and scores[1] < min(scores[0], scores[2]), scores
    assert model.u_students["2"] is fitted[1]
    # The reported score is on the held-out draw, not the one the candidate was chosen by.
    assert entry["energy_distance"] != scores[1]
    with pytest.raises(ValueError, match="candidates must be at least 1, got 0"):
        distill(model, steps=(2,), candidates=0)


def test_by_default_the_4_step_student_has_its_own_recipe_and_explicit_settings_apply_to_all(monkeypatch):
    import dvp_fast.distill as distill_module

    asked, real_distill_one = {}, distill_module.distill_one

    def recorded(prior, steps, targets, iterations, *rest, **options):
        asked[steps] = (iterations, rest[-1], options["fake_updates"])  # rest[-1]: the reverse-KL weight
        return real_distill_one(prior, steps, targets, 1, *rest, **options)  # one iteration: only what is asked

    monkeypatch.setattr(distill_module, "distill_one", recorded)
    report = distill(small_model(), steps=(2, 4, 8), batch_size=32, teacher_n=64, progress=False)
    # the 4-step student: longer, with the reverse-KL term at 0.3 and 5 fake-score updates a step
    assert asked == {8: (400, 0.1, 1), 4: (1600, 0.3, 5), 2: (400, 0.0, 1)}
    assert {k: (r["iterations"], r["reverse_kl_weight"], r["fake_updates"]) for k, r in report["students"].items()} \
        == {"8": (400, 0.1, 1), "4": (1600, 0.3, 5), "2": (400, 0.0, 1)}
    distill(small_model(), steps=(2, 4, 8), iterations=7, reverse_kl_weight=0.05, fake_updates=2, batch_size=32,
            teacher_n=64, progress=False)
    assert asked == {8: (7, 0.05, 2), 4: (7, 0.05, 2), 2: (7, 0.0, 1)}  # never a reverse-KL term below 4 steps


def test_the_recipe_table_gives_every_step_count_a_recipe():
    """The listed step counts keep their recipes; any other count gets the default, with the reverse-KL term
    only from 4 steps on."""
    assert recipe_for(1).predicts == "x" and recipe_for(1).reverse_kl_weight == 0.0
    assert recipe_for(4) == RECIPES[4] == StudentRecipe(iterations=1600, reverse_kl_weight=0.3, fake_updates=5)
    assert recipe_for(3) == StudentRecipe(reverse_kl_weight=0.0) and recipe_for(16) == StudentRecipe()
    with pytest.raises(Exception):
        RECIPES[4].iterations = 1  # frozen: a recipe is changed in the table, with its measurement


@pytest.mark.slow
def test_dvp_distill_writes_a_checkpoint_that_samples_with_the_student(tmp_path, capsys):
    from dvp_fast.cli import sample_main
    from dvp_fast.distill_cli import distill_main
    from dvp_fast.train_cli import main as train_main

    run = str(tmp_path / "run")
    assert train_main(["--out", run, "--max-steps", "1", "--batch-size", "10", "--no-progress"]) == 0
    out = str(tmp_path / "run" / "distilled.pt")
    assert distill_main(["--checkpoint", run, "--steps", "2", "--iterations", "2", "--batch-size", "16",
                         "--teacher-samples", "48", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2-step student" in printed and os.path.exists(out)
    distilled = DVPVAE.from_checkpoint(out)
    assert distilled.config.distilled_steps == (2,)
    assert torch.load(out, weights_only=True)["distill"]["students"]["2"]["energy_distance"] >= -1
    png = str(tmp_path / "s.png")
    assert sample_main(["--checkpoint", out, "--n", "4", "--steps", "2", "--out", png, "--no-progress"]) == 0
    assert "2-step distilled student" in capsys.readouterr().out
    # The run's own checkpoints are untouched, and a second distillation never overwrites the first.
    assert DVPVAE.from_checkpoint(run).config.distilled_steps == ()
    assert distill_main(["--checkpoint", run, "--steps", "2", "--iterations", "1", "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err
    # Distilling the distilled checkpoint adds to its students and keeps their report entries.
    more = str(tmp_path / "more.pt")
    assert distill_main(["--checkpoint", out, "--steps", "1", "--iterations", "2", "--batch-size", "16",
                         "--teacher-samples", "48", "--out", more, "--no-progress"]) == 0
    assert sorted(DVPVAE.from_checkpoint(more).config.distilled_steps) == [1, 2]
    kept = torch.load(more, weights_only=True)["distill"]["students"]
    assert sorted(kept) == ["1", "2"] and kept["2"]["iterations"] == 2 and kept["2"]["teacher_samples"] == 48
    assert kept["2"]["candidates"] == 1
    # Candidates: the run says which it kept and what each scored.
    chosen = str(tmp_path / "chosen.pt")
    assert distill_main(["--checkpoint", out, "--steps", "1", "--iterations", "1", "--batch-size", "16",
                         "--teacher-samples", "48", "--candidates", "2", "--out", chosen, "--no-progress"]) == 0
    assert "kept candidate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        distill_main(["--checkpoint", out, "--steps", "1", "--candidates", "0", "--out", chosen])
    assert refused.value.code == 2 and "--candidates: must be > 0, got 0" in capsys.readouterr().err
