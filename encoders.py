"""Frozen encoders used around the generator: the Stable Diffusion VAE (latent space) and the CLIP
text encoder (captions). Both come from their libraries (diffusers, transformers) and are never
trained here."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, CLIPTextModel

# Stable Diffusion's latent scale factor: makes the VAE latents roughly unit variance
# (docs/upstream.md#usm-architecture).
VAE_SCALE = 0.18215
VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
CLIP_MAX_LENGTH = 77  # CLIP's context length; captions are padded/truncated to it


def vae_downsample_factor(vae: AutoencoderKL | None) -> int:
    """Pixels per latent along each side (1 without a VAE): every encoder block after the first
    halves the resolution (8 for the Stable Diffusion VAEs)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def load_vae(spec: str, device: torch.device | str) -> AutoencoderKL | None:
    """--vae ema | mse | <folder> -> a frozen AutoencoderKL in eval mode; "none" -> None."""
    if spec == "none":
        return None
    vae = AutoencoderKL.from_pretrained(VAE_REPOS.get(spec, spec)).to(device)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents, a sample of the posterior as in DiT."""
    return vae.encode(x).latent_dist.sample() * VAE_SCALE


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images clamped to [-1, 1]."""
    return vae.decode(z / VAE_SCALE).sample.clamp(-1, 1)


class TextEncoder:
    """A frozen CLIP text encoder: captions -> last hidden state (B, 77, hidden_size)."""

    def __init__(self, tokenizer, model: CLIPTextModel):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.hidden_size: int = model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=CLIP_MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        )
        return self.model(tokens.input_ids.to(self.device)).last_hidden_state


def load_text_encoder(spec: str, device: torch.device | str) -> TextEncoder:
    """A hub id such as openai/clip-vit-large-patch14, a folder with a saved CLIP text model and
    its tokenizer, or a diffusers pipeline folder (model_index.json) holding them in its
    text_encoder/ and tokenizer/ subfolders."""
    pipeline = (Path(spec) / "model_index.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(spec, subfolder="tokenizer" if pipeline else "")
    model = CLIPTextModel.from_pretrained(spec, subfolder="text_encoder" if pipeline else "")
    return TextEncoder(tokenizer, model.to(device))
