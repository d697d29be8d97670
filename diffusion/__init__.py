"""Objectives and samplers that turn a backbone into a generator.

RectifiedFlow is the USM paper's objective (Liu et al. 2022). create_diffusion builds a Gaussian
diffusion the way DiT does (Ho et al. 2020; Nichol & Dhariwal 2021; Song et al. 2021 for DDIM).
classifier_free_guidance wraps a model for guided sampling with either.
"""

from .gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from .guidance import classifier_free_guidance
from .rectified_flow import RectifiedFlow
from .respace import SpacedDiffusion, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "RectifiedFlow",
    "SpacedDiffusion",
    "classifier_free_guidance",
    "create_diffusion",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing: str | None,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """DiT's constructor: "" (or None) keeps all steps for training; "250" or "ddim50" to sample.

    A "ddimN" respacing also makes sample() use the DDIM sampler.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    respacing = timestep_respacing or str(diffusion_steps)
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, respacing),
        betas,
        predict_xstart=predict_xstart,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        use_kl=use_kl,
        rescale_learned_sigmas=rescale_learned_sigmas,
        use_ddim=respacing.startswith("ddim"),
    )
