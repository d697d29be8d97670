"""Rectified flow, the training objective and sampler of the USM paper.

Rectified flow (Liu et al. 2022, "Flow Straight and Fast"; used by USM, Ergasti et al. 2025) joins
noise and data with the straight line

    z_t = t x + (1 - t) eps,    t in [0, 1], t = 0 pure noise, t = 1 data,

and trains a network v(z_t, t) to regress the constant velocity dz_t/dt = x - eps with an MSE loss.
The minimiser is v*(z, t) = E[x - eps | z_t = z], whose ODE dz/dt = v*(z, t) carries the noise
distribution at t = 0 onto the data distribution at t = 1; sampling integrates it numerically.

Timesteps are drawn logit-normal, t = sigmoid(n) with n ~ N(0, 1) ("log", the paper's default), or
uniform over all of [0, 1] ("uniform"). The released code's "uniform" option drew t in [0, 1)
without scaling it to its 1000-step range (docs/upstream.md#known-defects); here both options give
t in [0, 1] directly, the range the models expect.

Samplers: Euler (the USM paper's, 25 steps), Heun, and dopri5, the adaptive Dormand-Prince 5(4)
solver of torchdiffeq with which CompVis evaluated ZigMa (through SiT's transport code, whose linear
path and velocity ODE are this one, integrated from t = 0 to t = 1).
"""

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .utils import append_dims, mean_flat

SAMPLINGS = ("log", "uniform")
SAMPLERS = ("euler", "heun", "dopri5")
# dopri5's tolerances in CompVis' ZigMa config (config/ode/ode.yaml).
DOPRI5_ATOL, DOPRI5_RTOL = 1e-6, 1e-3


class RectifiedFlow:
    """t_min: the sampler queries the model at t_min + (1 - t_min) t while stepping on the uniform
    grid of t. 0 is ours; the USM release queried t = 1 + 999 i / N of its 1..1000 scale with
    steps of 1 / N, which is t_min = 0.001 here (docs/upstream.md#time-convention). atol, rtol:
    dopri5's error tolerances."""

    def __init__(self, num_timesteps: int = 25, sampling: str = "log", sampler: str = "euler",
                 t_min: float = 0.0, atol: float = DOPRI5_ATOL, rtol: float = DOPRI5_RTOL):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.num_timesteps = num_timesteps  # number of ODE steps used by sample()
        self.sampling = sampling
        self.sampler = sampler
        self.t_min = t_min
        self.atol, self.rtol = atol, rtol

    def sample_timesteps(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """Training times t, shape (B,), in [0, 1]."""
        if self.sampling == "log":
            # Logit-normal: concentrates training on intermediate t, where the velocity is hardest.
            return torch.sigmoid(torch.randn(batch_size, device=device))
        return torch.rand(batch_size, device=device)

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Velocity-matching loss; returns {"loss": (B,)} with the MSE averaged per sample."""
        t = self.sample_timesteps(x.shape[0], x.device)
        if noise is None:
            noise = torch.randn_like(x)
        t_x = append_dims(t, x.ndim).to(x.dtype)
        z_t = t_x * x + (1 - t_x) * noise
        velocity = model(z_t, t, **(model_kwargs or {}))
        return {"loss": mean_flat((x - noise - velocity) ** 2)}

    @torch.no_grad()
    def sample(
        self,
        model_fn: Callable[..., torch.Tensor],
        z: torch.Tensor,
        model_kwargs: dict | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Integrate dz/dt = model_fn(z, t) from t = 0 (the noise z) to t = 1.

        Euler is first order (the paper's sampler, 25 steps). Heun averages the slope at both ends
        of a step (second order, two model calls per step); its last step is a plain Euler step so
        the model is never queried at t = 1, which logit-normal training almost never visits.
        Both step on a uniform grid of `steps` steps. dopri5 chooses its own steps (`steps` does
        not apply) and, as CompVis ran it, queries the model up to t = 1 and a little past it.
        """
        steps = steps or self.num_timesteps
        sampler = sampler or self.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        model_kwargs = model_kwargs or {}
        times = torch.linspace(0, 1, steps + 1, device=z.device)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = self.t_min + (1 - self.t_min) * t
            return model_fn(x, t.expand(x.shape[0]), **model_kwargs)

        if sampler == "dopri5":
            return self._dopri5(velocity, z)
        x = z
        for i in tqdm(range(steps), disable=not progress):
            t, t_next = times[i], times[i + 1]
            dt = t_next - t
            v = velocity(x, t)
            if sampler == "heun" and i < steps - 1:
                v = (v + velocity(x + dt * v, t_next)) / 2
            x = x + dt * v
        return x

    def _dopri5(self, velocity: Callable, z: torch.Tensor) -> torch.Tensor:
        """torchdiffeq's dopri5 from t = 0 to 1. A step is kept when its local error estimate, RMS
        over the whole batch, is within atol + rtol |z|: the samples of a batch share their steps,
        so a sample depends (within the tolerance) on the batch it is solved in, as in CompVis'
        code. torchdiffeq steps past the output times and interpolates back to them: CompVis' 250
        output times give the same result at t = 1 as these two, and the last step may end (and
        query the model) beyond t = 1."""
        from torchdiffeq import odeint  # here, not at the top: it imports scipy.integrate
        # (~0.6 s), which every train.py / sample.py start would pay for a sampler it rarely uses

        ends = torch.tensor([0.0, 1.0], device=z.device, dtype=z.dtype)
        trajectory = odeint(lambda t, x: velocity(x, t), z, ends, method="dopri5",
                            atol=self.atol, rtol=self.rtol)
        return trajectory[-1]
