"""Gaussian diffusion as in DiT: DDPM training and sampling, DDIM sampling, learned variances.

Forward process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),    abar_t = prod_{s<=t} (1 - beta_s),
and the network predicts the noise eps in x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (or x_0
itself with predict_xstart). The reverse step p(x_{t-1} | x_t) is Gaussian with the posterior mean
    mu(x_t, x_0) = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0
                   + (1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t) x_t
evaluated at the predicted x_0, and a variance that is fixed (beta_t, or the posterior variance
beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)) or learned.

Improved DDPM (Nichol & Dhariwal 2021) adds the cosine schedule and the learned variance
Sigma = exp(v log beta_t + (1 - v) log beta~_t) (the network outputs v in [-1, 1] mapped to [0, 1])
trained by the hybrid loss L_simple + L_vlb, where the VLB term only trains the variance (the mean
it sees is detached). DiT uses exactly this, with the linear schedule.

DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models") with eta = 0 is the deterministic
update x_{t-1} = sqrt(abar_{t-1}) x_0_pred + sqrt(1 - abar_{t-1}) eps_pred.

Our backbones take t as a float in [0, 1] and scale it by 1000 inside their timestep embedding (the
same models train with rectified flow). So the model is called with t / num_timesteps: with the
usual 1000 steps the embedding then sees DiT's integer timesteps exactly. Respaced diffusions
(respace.py) pass the original timestep, so one trained model samples with any respacing.
"""

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .utils import append_dims, mean_flat

ModelFn = Callable[..., Tensor]


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Beta schedule (float64) by name: "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal)."""
    if name == "linear":
        # Ho et al.'s 1e-4 .. 0.02 for 1000 steps, rescaled so that other step counts span the
        # same process.
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        # abar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008; betas clipped at 0.999 to avoid
        # the singularity at t = 1.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(num_timesteps) / num_timesteps
        betas = [1 - alpha_bar(s + 1 / num_timesteps) / alpha_bar(s) for s in steps]
        return np.minimum(np.array(betas, dtype=np.float64), 0.999)
    raise ValueError(f"unknown beta schedule {name!r}")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) of data quantised to 8 bits in [-1, 1] under N(mean, exp(log_scale)^2).

    Each value owns a bin of width 2/255; the two extreme bins extend to -inf and +inf
    (Ho et al. 2020, section 3.3).
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1 / 255)
    lower = inv_std * (x - mean - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


class GaussianDiffusion:
    """DDPM/DDIM over the timesteps 0..T-1 defined by `betas`.

    learn_sigma: the model outputs 2C channels, eps (or x_0) then the variance interpolation v.
    sigma_small: with fixed variance, use the posterior variance beta~_t instead of beta_t.
    use_kl: train on the VLB alone (rescaled by T) instead of MSE (+ VLB when learn_sigma).
    rescale_learned_sigmas: scale the hybrid loss's VLB term by T / 1000.
    use_ddim: sample() runs DDIM (eta = 0) instead of ancestral DDPM sampling.
    """

    def __init__(
        self,
        betas: np.ndarray,
        predict_xstart: bool = False,
        learn_sigma: bool = True,
        sigma_small: bool = False,
        use_kl: bool = False,
        rescale_learned_sigmas: bool = False,
        use_ddim: bool = False,
    ):
        self.predict_xstart = predict_xstart
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.use_kl = use_kl
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.use_ddim = use_ddim

        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.num_timesteps = len(betas)
        self.betas = betas
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.sqrt_alphas_cumprod = np.sqrt(abar)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - abar)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / abar)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / abar - 1)

        # Posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so the log is clipped to
        # the t = 1 value there (the t = 0 step adds no noise anyway).
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
        self.log_betas = np.log(betas)
        # Fixed "large" variance: beta_t, except at t = 0 where the posterior variance keeps the
        # decoder NLL finite.
        self.large_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))

    @staticmethod
    def _extract(arr: np.ndarray, t: Tensor, x: Tensor) -> Tensor:
        """arr[t] as a float tensor on x's device, shaped to broadcast over x."""
        values = torch.from_numpy(arr)[t.cpu()].to(device=x.device, dtype=torch.float32)
        return append_dims(values, x.ndim)

    def model_time(self, t: Tensor) -> Tensor:
        """The float time in [0, 1) the model sees for step indices t (see the module docstring)."""
        return t.float() / self.num_timesteps

    def _run_model(self, model, x, t, model_kwargs) -> Tensor:
        return model(x, self.model_time(t), **(model_kwargs or {}))

    # Forward process and posterior.

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given noise."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # Reverse process.

    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Mean, log variance and predicted x_0 of p(x_{t-1} | x_t) from the raw model output."""
        if self.learn_sigma:
            model_output, v = model_output.chunk(2, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._extract(self.log_betas, t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif self.sigma_small:
            log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        else:
            log_variance = self._extract(self.large_log_variance, t, x_t)
        if self.predict_xstart:
            pred_xstart = model_output
        else:
            pred_xstart = self.predict_xstart_from_eps(x_t, t, model_output)
        mean = self.q_posterior_mean(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _vb_terms_bpd(self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor):
        """One term of the variational bound, in bits per dimension, per sample.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL -log p(x_0 | x_1)
        at t = 0.
        """
        true_mean = self.q_posterior_mean(x_start, x_t, t)
        true_log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        )
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def training_losses(
        self,
        model: ModelFn,
        x: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss at uniformly drawn timesteps; returns per-sample (B,) "loss" (+ "mse", "vb")."""
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device)
        if noise is None:
            noise = torch.randn_like(x)
        x_t = self.q_sample(x, t, noise)
        model_output = self._run_model(model, x_t, t, model_kwargs)

        if self.use_kl:
            # The VLB summed over all T terms is T times the expected single term.
            loss = self._vb_terms_bpd(model_output, x, x_t, t) * self.num_timesteps
            return {"loss": loss}

        terms = {}
        prediction = model_output
        if self.learn_sigma:
            prediction, v = model_output.chunk(2, dim=1)
            # The VLB term trains only the variance: the mean it sees carries no gradient, so the
            # mean is learned by the MSE term alone (Nichol & Dhariwal 2021, section 3.1).
            frozen = torch.cat([prediction.detach(), v], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x, x_t, t)
            if self.rescale_learned_sigmas:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x if self.predict_xstart else noise
        terms["mse"] = mean_flat((target - prediction) ** 2)
        terms["loss"] = terms["mse"] + terms.get("vb", 0.0)
        return terms

    def p_sample(
        self, model: ModelFn, x: Tensor, t: Tensor, model_kwargs: dict | None = None
    ) -> Tensor:
        """One ancestral step x_t -> x_{t-1} (no noise at t = 0)."""
        out = self.p_mean_variance(self._run_model(model, x, t, model_kwargs), x, t)
        nonzero = append_dims((t != 0).float(), x.ndim)
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * torch.randn_like(x)

    def ddim_sample(
        self, model: ModelFn, x: Tensor, t: Tensor, model_kwargs: dict | None = None
    ) -> Tensor:
        """One deterministic DDIM step (eta = 0) x_t -> x_{t-1}."""
        out = self.p_mean_variance(self._run_model(model, x, t, model_kwargs), x, t)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        return torch.sqrt(abar_prev) * out["pred_xstart"] + torch.sqrt(1 - abar_prev) * eps

    def _sample_loop(self, step, model, z, model_kwargs, progress):
        x = z
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress):
            t = torch.full((z.shape[0],), i, device=z.device, dtype=torch.long)
            x = step(model, x, t, model_kwargs)
        return x

    @torch.no_grad()
    def p_sample_loop(
        self, model: ModelFn, z: Tensor, model_kwargs: dict | None = None, progress: bool = False
    ) -> Tensor:
        """Ancestral DDPM sampling from x_{T-1} = z down to x_0."""
        return self._sample_loop(self.p_sample, model, z, model_kwargs, progress)

    @torch.no_grad()
    def ddim_sample_loop(
        self, model: ModelFn, z: Tensor, model_kwargs: dict | None = None, progress: bool = False
    ) -> Tensor:
        """Deterministic DDIM sampling from x_{T-1} = z down to x_0."""
        return self._sample_loop(self.ddim_sample, model, z, model_kwargs, progress)

    def sample(
        self, model_fn: ModelFn, z: Tensor, model_kwargs: dict | None = None, progress: bool = False
    ) -> Tensor:
        """Turn noise z into data with DDIM if this diffusion was created for it, else DDPM."""
        loop = self.ddim_sample_loop if self.use_ddim else self.p_sample_loop
        return loop(model_fn, z, model_kwargs, progress)
