"""Objectives and samplers checked against closed-form oracles.

For data x ~ N(mu, s^2) (independent per dimension) and noise eps ~ N(0, 1), every quantity the
networks are trained to predict has a closed form, so the exact minimiser can stand in for a model:
  rectified flow, z_t = t x + (1 - t) eps:      v*(z, t) = E[x - eps | z_t = z]
  Gaussian diffusion, x_t = a x + b eps:         eps*(x_t) = E[eps | x_t]
(a = sqrt(abar_t), b = sqrt(1 - abar_t) or a = t, b = 1 - t). With z_t ~ N(a mu, a^2 s^2 + b^2):
  E[x | z] = mu + a s^2 (z - a mu) / var,   E[eps | z] = b (z - a mu) / var.
For a Gaussian mixture each component contributes these terms, weighted by its posterior p(k | z).
Sampler tolerances are 4 standard errors of the statistic; step counts are chosen so that the
discretisation bias (measured with 200k samples) stays well under one standard error.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from diffusion import (
    GaussianDiffusion,
    RectifiedFlow,
    classifier_free_guidance,
    create_diffusion,
    space_timesteps,
)
from diffusion.gaussian_diffusion import get_named_beta_schedule

N = 4000
MU = torch.tensor([-1.0, 0.5, 1.0])
STD = torch.tensor([0.5, 1.0, 1.5])
# Two-component 1-D mixture.
WEIGHTS = torch.tensor([0.3, 0.7])
MODE_MU = torch.tensor([-2.0, 2.0])
MODE_STD = torch.tensor([0.5, 0.5])

ABAR_1000 = torch.from_numpy(np.cumprod(1 - get_named_beta_schedule("linear", 1000))).float()


def posterior_means(z, a, b, mu, std):
    """E[x | z] and E[eps | z] for z = a x + b eps, x ~ N(mu, std^2); a, b broadcast over z."""
    var = a**2 * std**2 + b**2
    return mu + a * std**2 * (z - a * mu) / var, b * (z - a * mu) / var


def mixture_weights(z, a, b):
    """Posterior p(k | z) of the mixture components, shape (B, 2) for z of shape (B, 1)."""
    var = a**2 * MODE_STD**2 + b**2
    log_p = torch.log(WEIGHTS) - 0.5 * (z - a * MODE_MU) ** 2 / var - 0.5 * torch.log(var)
    return torch.softmax(log_p, dim=1)


def rf_coefs(t):
    t = t.view(-1, 1)
    return t, 1 - t


def gd_coefs(t):
    # The diffusion calls the model with original_timestep / 1000; the oracle inverts that.
    abar = ABAR_1000[torch.round(t * 1000).long()].view(-1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


def rf_oracle(z, t):
    x, eps = posterior_means(z, *rf_coefs(t), MU, STD)
    return x - eps


def eps_oracle(z, t):
    return posterior_means(z, *gd_coefs(t), MU, STD)[1]


def xstart_oracle(z, t):
    return posterior_means(z, *gd_coefs(t), MU, STD)[0]


def rf_mixture_oracle(z, t):
    a, b = rf_coefs(t)
    x, eps = posterior_means(z, a, b, MODE_MU, MODE_STD)
    return (mixture_weights(z, a, b) * (x - eps)).sum(1, keepdim=True)


def eps_mixture_oracle(z, t):
    a, b = gd_coefs(t)
    eps = posterior_means(z, a, b, MODE_MU, MODE_STD)[1]
    return (mixture_weights(z, a, b) * eps).sum(1, keepdim=True)


def assert_matches_gaussian(x):
    se_mean = STD / math.sqrt(N)
    se_std = STD / math.sqrt(2 * N)
    assert ((x.mean(0) - MU).abs() < 4 * se_mean).all(), (x.mean(0), MU)
    assert ((x.std(0) - STD).abs() < 4 * se_std).all(), (x.std(0), STD)


def assert_matches_mixture(x):
    frac = (x > 0).float().mean().item()
    assert abs(frac - WEIGHTS[1].item()) < 4 * math.sqrt(0.3 * 0.7 / N), frac
    for mode, mask in ((0, x < 0), (1, x > 0)):
        se = MODE_STD[mode].item() / math.sqrt(2 * mask.sum().item())
        assert abs(x[mask].std().item() - MODE_STD[mode].item()) < 4 * se


def assert_oracle_loss_is_minimal(objective, oracle, x, delta=0.2):
    """The oracle is the conditional mean of the regression target, so adding delta to it raises
    the expected per-sample MSE by exactly delta^2 (same timesteps and noise for both)."""
    torch.manual_seed(0)
    best = objective.training_losses(oracle, x)["loss"]
    torch.manual_seed(0)
    worse = objective.training_losses(lambda z, t: oracle(z, t) + delta, x)["loss"]
    assert best.shape == (N,)
    gap = worse - best
    se = gap.std().item() / math.sqrt(N)
    assert delta**2 > 6 * se  # the check below can tell the oracle from its perturbation
    assert abs(gap.mean().item() - delta**2) < 4 * se


def noise(dims, seed=0):
    return torch.randn(N, dims, generator=torch.Generator().manual_seed(seed))


# Rectified flow.


def test_uniform_timesteps_cover_unit_interval():
    torch.manual_seed(0)
    t = RectifiedFlow(sampling="uniform").sample_timesteps(20000, "cpu")
    assert t.min() < 1e-3 and t.max() > 1 - 1e-3
    assert stats.kstest(t.numpy(), "uniform").pvalue > 1e-3


def test_log_timesteps_are_logit_normal():
    torch.manual_seed(0)
    t = RectifiedFlow(sampling="log").sample_timesteps(20000, "cpu").double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 4 / math.sqrt(20000)
    assert abs(logit.std().item() - 1) < 4 / math.sqrt(2 * 20000)
    assert stats.kstest(logit.numpy(), "norm").pvalue > 1e-3


@pytest.mark.parametrize("sampler,steps", [("euler", 200), ("heun", 25)])
def test_rf_sampling_matches_gaussian(sampler, steps):
    x = RectifiedFlow(sampler=sampler).sample(rf_oracle, noise(3), steps=steps)
    assert_matches_gaussian(x)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_rf_sampling_matches_mixture(sampler):
    assert_matches_mixture(RectifiedFlow().sample(rf_mixture_oracle, noise(1), sampler=sampler))


def rf_oracle_64(x, t):
    """rf_oracle in float64, for the solver-accuracy tests."""
    t = t.view(-1, 1).double()
    x_mean, eps_mean = posterior_means(x, t, 1 - t, MU.double(), STD.double())
    return x_mean - eps_mean


def exact_flow() -> tuple[torch.Tensor, torch.Tensor]:
    """(noise z, where the flow carries it): the Gaussian's probability-flow ODE is affine, and it
    carries z to mu + s z exactly."""
    z = noise(3)[:256].double()
    return z, MU.double() + STD.double() * z


def test_heun_converges_faster_than_euler():
    z, exact = exact_flow()
    rf = RectifiedFlow()
    err = {
        (sampler, steps): (rf.sample(rf_oracle_64, z, steps=steps, sampler=sampler) - exact)
        .abs().max()
        for sampler in ("euler", "heun")
        for steps in (10, 20)
    }
    assert err["heun", 20] < err["euler", 20] / 10
    # Observed order of accuracy: halving the step divides the error by 2^order.
    assert 0.8 < math.log2(err["euler", 10] / err["euler", 20]) < 1.2
    assert 1.8 < math.log2(err["heun", 10] / err["heun", 20]) < 2.4


def test_dopri5_reaches_the_exact_flow_map_within_its_tolerance():
    # dopri5 keeps each step's local error estimate, RMS over the batch, within atol + rtol |x|;
    # summed over its steps, the error at t = 1 stays within a small multiple of that scale
    # (measured: 21, 17 and 0.35 of it), and shrinks with the tolerance, at more evaluations.
    z, exact = exact_flow()
    errors, evaluations = [], []
    for atol, rtol in ((1e-6, 1e-3), (1e-8, 1e-5), (1e-10, 1e-7)):
        calls = 0

        def oracle(x, t):
            nonlocal calls
            calls += 1
            return rf_oracle_64(x, t)

        x = RectifiedFlow(sampler="dopri5", atol=atol, rtol=rtol).sample(oracle, z)
        scale = atol + rtol * exact.abs()
        assert 0.1 < ((x - exact) / scale).pow(2).mean().sqrt() < 30, (atol, rtol)
        errors.append((x - exact).abs().max())
        evaluations.append(calls)
    assert errors[0] > 100 * errors[1] > 1e4 * errors[2]
    assert evaluations[0] < evaluations[1] < evaluations[2]
    # CompVis' tolerances are the defaults.
    default = RectifiedFlow(sampler="dopri5").sample(rf_oracle_64, z)
    assert (default - exact).abs().max() == errors[0]
    # Euler converges to the same endpoint at first order: twice the steps, half the error.
    euler = [(RectifiedFlow().sample(rf_oracle_64, z, steps=steps) - exact).abs().max()
             for steps in (25, 50, 100, 200)]
    for coarse, fine in zip(euler, euler[1:], strict=False):
        assert 1.9 < coarse / fine < 2.1


def test_rf_oracle_loss_is_minimal():
    rf, x = RectifiedFlow(), MU + STD * noise(3, seed=1)
    assert_oracle_loss_is_minimal(rf, rf_oracle, x)


def test_rf_training_feeds_model_the_interpolant():
    seen = {}

    def model(z, t, y):
        seen.update(z=z, t=t, y=y)
        return torch.zeros_like(z)

    x, eps, y = torch.randn(8, 2, 4, 4), torch.randn(8, 2, 4, 4), torch.arange(8)
    losses = RectifiedFlow(sampling="uniform").training_losses(model, x, {"y": y}, noise=eps)
    t = seen["t"].view(-1, 1, 1, 1)
    assert seen["t"].shape == (8,) and seen["y"] is y
    torch.testing.assert_close(seen["z"], t * x + (1 - t) * eps)
    torch.testing.assert_close(losses["loss"], ((x - eps) ** 2).mean(dim=(1, 2, 3)))


def test_rf_authors_time_grid():
    # The USM release queried t = 1 + 999 i / N (of 1..1000) and stepped by 1 / N.
    seen = []

    def model(z, t):
        seen.append(t[0].item())
        return torch.ones_like(z)

    z = torch.zeros(2, 1, 2, 2)
    out = RectifiedFlow(4, t_min=1e-3).sample(model, z)
    assert seen == pytest.approx([(1 + 999 * i / 4) / 1000 for i in range(4)])
    torch.testing.assert_close(out, torch.ones_like(z))  # four steps of 1/4 at velocity 1
    # dopri5 integrates the same ODE in t from 0 to 1, querying the model on the same scale (its
    # last step may end past t = 1, which torchdiffeq then interpolates back to).
    seen.clear()
    out = RectifiedFlow(t_min=1e-3, sampler="dopri5").sample(model, z)
    assert min(seen) == pytest.approx(1e-3) and max(seen) >= 1
    torch.testing.assert_close(out, torch.ones_like(z))


# Gaussian diffusion.


def test_beta_schedules():
    linear = get_named_beta_schedule("linear", 1000)
    assert linear[0] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(linear), np.diff(linear)[0])
    # Cosine: abar_t = f(t/T) / f(0), f(u) = cos^2((u + s) / (1 + s) * pi / 2), while unclipped.
    abar = np.cumprod(1 - get_named_beta_schedule("cosine", 1000))
    t = np.arange(1, 1001) / 1000
    f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    assert np.allclose(abar[:990], f[:990], rtol=1e-9)


def test_respacing_keeps_alphas_cumprod():
    base = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    for respacing in ("250", "ddim50", "10,15,20"):
        spaced = create_diffusion(respacing)
        kept = sorted(space_timesteps(1000, respacing))
        assert spaced.timestep_map == kept and spaced.num_timesteps == len(kept)
        np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    assert create_diffusion("ddim50").use_ddim and not create_diffusion("250").use_ddim
    # Comma lists split the steps into equal sections, each with both ends kept.
    sections = sorted(space_timesteps(300, "2,3,5"))
    assert sections == [0, 99, 100, 150, 199, 200, 225, 250, 274, 299]
    assert create_diffusion("").num_timesteps == 1000


def test_spaced_diffusion_calls_model_with_original_times():
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    create_diffusion("ddim50", learn_sigma=False).sample(model, torch.randn(2, 3))
    assert seen == pytest.approx([s / 1000 for s in range(980, -1, -20)])
    seen.clear()
    create_diffusion("2,3", learn_sigma=False).sample(model, torch.randn(2, 3))  # uneven
    assert seen == pytest.approx([0.999, 0.75, 0.5, 0.499, 0.0])


@pytest.mark.parametrize(
    "respacing,kwargs,oracle",
    [
        ("250", {}, eps_oracle),  # DDPM, fixed variance beta_t
        ("250", {"predict_xstart": True}, xstart_oracle),
        ("1000", {"sigma_small": True}, eps_oracle),  # posterior variance: needs all steps
        ("ddim250", {}, eps_oracle),
    ],
)
def test_gd_sampling_matches_gaussian(respacing, kwargs, oracle):
    torch.manual_seed(0)
    diffusion = create_diffusion(respacing, learn_sigma=False, **kwargs)
    assert_matches_gaussian(diffusion.sample(oracle, noise(3)))


@pytest.mark.parametrize("respacing", ["250", "ddim50"])
def test_gd_sampling_matches_mixture(respacing):
    torch.manual_seed(0)
    diffusion = create_diffusion(respacing, learn_sigma=False)
    assert_matches_mixture(diffusion.sample(eps_mixture_oracle, noise(1)))


def test_learned_sigma_at_upper_end_equals_fixed_large():
    # v = +1 selects log beta_t, the fixed "large" variance (at t = 0 no noise is added anyway).
    def learned(x, t):
        return torch.cat([eps_oracle(x, t), torch.ones_like(x)], dim=1)

    z = noise(3)[:64]
    torch.manual_seed(0)
    a = create_diffusion("50", learn_sigma=True).sample(learned, z)
    torch.manual_seed(0)
    b = create_diffusion("50", learn_sigma=False).sample(eps_oracle, z)
    torch.testing.assert_close(a, b)


def test_gd_oracle_loss_is_minimal():
    diffusion, x = create_diffusion("", learn_sigma=False), MU + STD * noise(3, seed=1)
    assert_oracle_loss_is_minimal(diffusion, eps_oracle, x)


def cheating_model(eps, log_variance_knob, record):
    """Knows the noise, so its x_0 and posterior mean are exact; v = -1 gives the true variance."""

    def model(x_t, t):
        record.append(t)
        return torch.cat([eps, torch.full_like(eps, log_variance_knob)], dim=1)

    return model


def test_vlb_vanishes_for_the_true_posterior_and_trains_only_the_variance():
    diffusion = create_diffusion("")
    x = torch.rand(64, 2, 4, 4) * 2 - 1
    eps = torch.randn_like(x)
    seen = []
    torch.manual_seed(0)
    losses = diffusion.training_losses(cheating_model(eps, -1.0, seen), x, noise=eps)
    assert set(losses) == {"loss", "mse", "vb"} and losses["loss"].shape == (64,)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert (seen[0] > 0).all()
    assert losses["vb"].abs().max() < 1e-4 and losses["mse"].abs().max() < 1e-12

    # The VLB's gradient reaches the variance channels only; the mean is the MSE's job.
    out = torch.cat([eps, torch.zeros_like(eps)], dim=1).requires_grad_()
    torch.manual_seed(0)
    losses = diffusion.training_losses(lambda x_t, t: out, x, noise=eps)
    assert (losses["vb"] > -1e-6).all()  # a KL divergence, up to float32 rounding
    (grad,) = torch.autograd.grad(losses["vb"].sum(), out)
    assert grad[:, :2].abs().max() == 0 and grad[:, 2:].abs().max() > 0


def test_kl_loss_and_rescaled_vb():
    x = torch.rand(16, 2, 4, 4) * 2 - 1
    eps, delta = torch.randn_like(x), 0.1
    kl = create_diffusion("", use_kl=True, learn_sigma=False, sigma_small=True)
    seen = []
    torch.manual_seed(0)
    losses = kl.training_losses(lambda x_t, t: seen.append(t) or eps + delta, x, noise=eps)
    assert set(losses) == {"loss"}
    # An eps error delta moves x_0 by sqrt(1/abar_t - 1) delta and the posterior mean by coef1
    # times that; with the variances equal, KL = (mean error)^2 / (2 var) nats per dimension,
    # and the loss is T times its mean in bits.
    t = torch.round(seen[0] * 1000).long()
    abar, abar_prev = ABAR_1000[t].double(), ABAR_1000[t - 1].double()
    beta = 1 - abar / abar_prev
    coef1 = beta * abar_prev.sqrt() / (1 - abar)
    posterior_var = beta * (1 - abar_prev) / (1 - abar)
    mean_error = coef1 * (1 / abar - 1).sqrt() * delta
    expected = 1000 * mean_error**2 / (2 * posterior_var) / math.log(2)
    assert (t > 0).all()
    torch.testing.assert_close(losses["loss"].double(), expected, rtol=1e-3, atol=1e-3)

    # RESCALED_MSE multiplies the VLB term by T / 1000.
    vbs = []
    for rescale in (False, True):
        diffusion = create_diffusion("250", rescale_learned_sigmas=rescale)
        torch.manual_seed(0)
        vbs.append(diffusion.training_losses(cheating_model(eps, 0.0, []), x, noise=eps)["vb"])
    torch.testing.assert_close(vbs[1], vbs[0] * 0.25)


# Classifier-free guidance.


def toy_model(x, t, y=None, context=None):
    """Four output channels that depend on every input, differently for cond and uncond."""
    out = x * (1 + y.view(-1, 1, 1, 1).float()) + t.view(-1, 1, 1, 1)
    if context is not None:
        out = out + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return torch.cat([out, out**2], dim=1)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_guidance_mixes_cond_and_uncond(scale):
    x, t = torch.randn(3, 2, 4, 4), torch.rand(3)
    cond = {"y": torch.tensor([0, 1, 2]), "context": torch.randn(3, 5, 8)}
    uncond = {"y": torch.full((3,), 10), "context": torch.zeros(3, 5, 8)}
    batches = []

    def counting_model(x, t, **kwargs):
        batches.append(x.shape[0])
        return toy_model(x, t, **kwargs)

    guided = classifier_free_guidance(counting_model, scale, cond, uncond, guide_channels=2)(x, t)
    assert batches == [6]
    out_c, out_u = toy_model(x, t, **cond), toy_model(x, t, **uncond)
    torch.testing.assert_close(guided[:, :2], out_u[:, :2] + scale * (out_c[:, :2] - out_u[:, :2]))
    torch.testing.assert_close(guided[:, 2:], out_c[:, 2:])
    if scale == 1.0:
        torch.testing.assert_close(guided, out_c)


def test_guidance_drives_both_samplers():
    cond = {"y": torch.tensor([1, 2]), "context": None}
    uncond = {"y": torch.zeros(2), "context": None}
    fn = classifier_free_guidance(toy_model, 1.5, cond, uncond, guide_channels=2)
    z = torch.randn(2, 2, 4, 4) * 0.1
    assert RectifiedFlow().sample(lambda x, t: fn(x, t)[:, :2], z, steps=3).shape == z.shape
    assert create_diffusion("ddim5").sample(fn, z).shape == z.shape
    with pytest.raises(ValueError):
        classifier_free_guidance(toy_model, 1.5, {"y": cond["y"]}, uncond)


def test_progress_bars(capsys):
    RectifiedFlow().sample(lambda x, t: x, torch.zeros(1, 1), steps=7, progress=True)
    zero_eps_and_variance = lambda x, t: torch.zeros(1, 2)  # noqa: E731
    create_diffusion("ddim5").sample(zero_eps_and_variance, torch.zeros(1, 1), progress=True)
    err = capsys.readouterr().err
    assert "7/7" in err and "5/5" in err
