"""U-Shape Mamba (USM) and the Zigma baseline, built from the same parts.

USM: Ergasti et al., "U-Shape Mamba: State Space Model for faster diffusion", CVPR-W 2025
(arXiv 2504.13499). Zigma: Hu et al., "ZigMa: A DiT-style Zigzag Mamba Diffusion Model", ECCV 2024.
The layout follows DiT (Peebles & Xie 2023): embedders, blocks with adaLN-Zero, a final layer,
and a registry of named configurations at the bottom of the file.

Time convention: models take t in [0, 1] (the rectified-flow time, or the diffusion step divided by
the number of training steps) and scale it by 1000 before the sinusoidal embedding, so the embedding
sees the same range as DiT's integer timesteps.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from torch.utils.checkpoint import checkpoint

from diffusion import classifier_free_guidance
from selective_scan import selective_scan
from zigzag import NUM_PATHS, zigzag_inverse, zigzag_path


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation (DiT eq. in Sec. 3.2): per-sample shift and scale over all tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding layers for timesteps, class labels and text            #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t * 1000 followed by a two-layer MLP (as DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # t in [0, 1] -> [0, 1000]: the frequencies were designed for integer diffusion steps.
        return self.mlp(self.timestep_embedding(t * 1000, self.frequency_embedding_size))


class Conditioning(nn.Module):
    """The conditioning vector c = t-embedding [+ class embedding] [+ mean of projected text].

    Class label `num_classes` is the null class used for classifier-free guidance; the training
    script drops labels to it. Text hidden states are projected to the model width once here and
    the projected tokens are returned for the blocks' cross-attention.
    """

    def __init__(self, hidden_size: int, num_classes: int = 0, context_dim: int | None = None):
        super().__init__()
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        self.context_proj = nn.Linear(context_dim, hidden_size) if context_dim else None

    def forward(
        self, t: torch.Tensor, y: torch.Tensor | None, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this model is class-conditional: pass y (num_classes = null)")
            c = c + self.y_embedder(y)
        if self.context_proj is None:
            return c, None
        if context is None:
            raise ValueError("this model is text-conditional: pass context (B, L, context_dim)")
        context = self.context_proj(context)
        return c + context.mean(dim=1), context


#################################################################################
#                      Selective state space layers (Mamba)                      #
#################################################################################


class SelectiveSSM(nn.Module):
    """The input-dependent SSM of Mamba (Gu & Dao 2023, Alg. 2) on a (B, Di, L) sequence.

    delta, B and C are projected from the input itself; A is diagonal and input-independent.
    Initialisation follows Mamba: A = -(1..N) per channel (stored as log), D = 1, and the dt bias
    is the inverse softplus of dt drawn log-uniformly in [dt_min, dt_max].
    """

    def __init__(
        self, d_inner: int, d_state: int = 16, dt_rank: int = 1,
        dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)))
        dt = (dt * dt_min).clamp(min=dt_floor)
        with torch.no_grad():  # inverse softplus: softplus(bias) == dt
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dt, B, C = self.x_proj(rearrange(x, "b d l -> b l d")).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        delta = rearrange(dt @ self.dt_proj.weight.T, "b l d -> b d l")
        return selective_scan(
            x, delta, -torch.exp(self.A_log.float()),
            rearrange(B, "b l n -> b n l"), rearrange(C, "b l n -> b n l"),
            D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )


class SS2D(nn.Module):
    """USM's 2-D selective scan with one zigzag direction (SPEC "SS2D").

    in_proj -> (x, z); depthwise 3x3 conv + SiLU on x in the 2-D layout; tokens gathered into
    the block's zigzag order; selective scan; back to raster order; LayerNorm; gate by SiLU(z);
    out_proj.
    """

    def __init__(self, dim: int, grid: tuple[int, int], path: int, d_state: int = 16,
                 expand: int = 2):
        super().__init__()
        d_inner = expand * dim
        self.grid = grid
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner)
        self.ssm = SelectiveSSM(d_inner, d_state, dt_rank=math.ceil(dim / 16))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.register_buffer("perm", zigzag_path(*grid, path), persistent=False)
        self.register_buffer("inverse", zigzag_inverse(*grid, path), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)
        h, w = self.grid
        x = F.silu(self.conv2d(rearrange(x, "b (h w) d -> b d h w", h=h, w=w)))
        y = self.ssm(rearrange(x, "b d h w -> b d (h w)")[:, :, self.perm])
        y = rearrange(y[:, :, self.inverse], "b d l -> b l d")
        return self.out_proj(self.out_norm(y) * F.silu(z))


class ZigmaMixer(nn.Module):
    """Zigma's Mamba mixer: Mamba's causal depthwise conv1d (d_conv 4) on the zigzag sequence."""

    def __init__(self, dim: int, path: int, grid: tuple[int, int], d_state: int = 16,
                 expand: int = 2, d_conv: int = 4):
        super().__init__()
        d_inner = expand * dim
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, padding=d_conv - 1, groups=d_inner)
        self.ssm = SelectiveSSM(d_inner, d_state, dt_rank=math.ceil(dim / 16))
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.register_buffer("perm", zigzag_path(*grid, path), persistent=False)
        self.register_buffer("inverse", zigzag_inverse(*grid, path), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = rearrange(self.in_proj(x[:, self.perm]), "b l d -> b d l").chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., : x.shape[-1]])  # left padding only: causal
        y = rearrange(self.ssm(x, z=z), "b d l -> b l d")  # Mamba gates by SiLU(z) in the scan
        return self.out_proj(y)[:, self.inverse]


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to the (projected) text tokens."""

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.to_q(x), "b l (h d) -> b h l d", h=self.heads)
        k, v = rearrange(self.to_kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


#################################################################################
#                                 Core blocks                                    #
#################################################################################


class MambaBlock(nn.Module):
    """One residual block: x = x + gate * mixer(modulate(norm(x))) [+ cross-attention].

    adaLN-Zero (DiT Sec. 3.2): the modulation MLP is zero-initialised, so every gate starts at 0
    and the block starts as the identity. There is no MLP (SPEC). With text, a second
    shift/scale/gate triplet drives the cross-attention that follows the Mamba branch.
    `skip_dim` adds USM's skip projection: the encoder output is concatenated on channels and
    projected 2C -> C before the norm.
    """

    def __init__(self, dim: int, mixer: nn.Module, norm: nn.Module, cross_attn: bool = False,
                 skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm = norm
        self.mixer = mixer
        self.cross_attn = CrossAttention(dim) if cross_attn else None
        n_mod = 6 if cross_attn else 3
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mod * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        mod = self.adaLN_modulation(c).chunk(6 if self.cross_attn else 3, dim=-1)
        x = x + mod[2].unsqueeze(1) * self.mixer(modulate(self.norm(x), mod[0], mod[1]))
        if self.cross_attn is not None:
            h = modulate(self.norm(x), mod[3], mod[4])
            x = x + mod[5].unsqueeze(1) * self.cross_attn(h, context)
        return x


class FinalLayer(nn.Module):
    """adaLN + Linear to patch*patch*out_channels, zero-initialised (output is 0 at init)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        for layer in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


#################################################################################
#                          Shared model plumbing                                 #
#################################################################################


class _Backbone(nn.Module):
    """Patchify, positional embedding, conditioning, final layer and guidance of both models."""

    def __init__(self, input_size: int | Sequence[int], patch_size: int, in_channels: int,
                 hidden_size: int, num_classes: int, context_dim: int | None, learn_sigma: bool,
                 learn_pos_emb: bool, use_checkpoint: bool, divisor: int):
        super().__init__()
        H, W = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if H % divisor or W % divisor:
            raise ValueError(
                f"input size {H}x{W} must be divisible by {divisor} (patch size {patch_size} times "
                f"2 per down-sampling stage) so every stage has a whole token grid"
            )
        self.input_size, self.patch_size = (H, W), patch_size
        self.in_channels, self.num_classes = in_channels, num_classes
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.use_checkpoint = use_checkpoint
        self.grid = (H // patch_size, W // patch_size)
        self.x_embedder = PatchEmbed((H, W), patch_size, in_channels, hidden_size, bias=True)
        pos = build_sincos2d_pos_embed(list(self.grid), hidden_size).unsqueeze(0)
        if learn_pos_emb:  # starts from the sin-cos table and is trained
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos, persistent=False)
        self.cond = Conditioning(hidden_size, num_classes, context_dim)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def _check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.input_size or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {self.input_size[0]}, "
                f"{self.input_size[1]}), got {tuple(x.shape)}"
            )

    def _run(self, block: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        if self.use_checkpoint and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid[0], p=p, q=p)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                         context: torch.Tensor | None = None, cfg_scale: float = 4.0,
                         null_context: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guidance: uncond + cfg_scale * (cond - uncond), one doubled batch.

        The null class is `num_classes`; for text the caller passes the encoding of the empty
        caption as `null_context` (what the model saw under caption dropout).
        """
        cond, uncond = {}, {}
        if y is not None:
            cond["y"], uncond["y"] = y, torch.full_like(y, self.num_classes)
        if context is not None:
            if null_context is None:
                raise ValueError("text guidance needs null_context (the empty caption's encoding)")
            cond["context"] = context
            uncond["context"] = null_context.expand_as(context)
        guided = classifier_free_guidance(self, cfg_scale, cond, uncond, self.in_channels)
        return guided(x, t)


class USM(_Backbone):
    """U-Shape Mamba: a U-Net of Mamba blocks at constant width (SPEC "Architecture").

    Encoder: `stages[i]` blocks, then a stride-2 Conv2d (tokens / 4). Middle: one block.
    Decoder: up-sampling (ConvTranspose2d, or nearest + 3x3 conv), then `stages[i]` blocks in
    reverse order. Each decoder block takes the most recent unused encoder-block output (LIFO).
    Block k (0..depth-1 through the whole U) scans along zigzag path k mod 8.
    """

    def __init__(self, input_size: int | Sequence[int] = 32, patch_size: int = 1,
                 in_channels: int = 4, hidden_size: int = 768, stages: Sequence[int] = (4, 4, 4),
                 num_classes: int = 0, context_dim: int | None = None, learn_sigma: bool = False,
                 learn_pos_emb: bool = False, skip_conn: bool = True,
                 use_convtranspose: bool = True, use_checkpoint: bool = False, d_state: int = 16):
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_classes,
                         context_dim, learn_sigma, learn_pos_emb, use_checkpoint,
                         divisor=patch_size * 2 ** len(stages))
        self.stages, self.skip_conn = tuple(stages), skip_conn
        grids = [(self.grid[0] >> i, self.grid[1] >> i) for i in range(len(stages) + 1)]
        k = iter(range(2 * sum(stages) + 1))  # block number through the whole U

        def block(grid: tuple[int, int], skip: bool = False) -> MambaBlock:
            mixer = SS2D(hidden_size, grid, next(k) % NUM_PATHS, d_state)
            norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            return MambaBlock(hidden_size, mixer, norm, context_dim is not None, skip)

        C = hidden_size
        self.enc_blocks = nn.ModuleList(
            nn.ModuleList(block(grids[i]) for _ in range(n)) for i, n in enumerate(stages)
        )
        self.downs = nn.ModuleList(nn.Conv2d(C, C, 2, stride=2) for _ in stages)
        self.mid_block = block(grids[-1])
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(C, C, 2, stride=2) if use_convtranspose
            else nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                               nn.Conv2d(C, C, 3, padding=1))
            for _ in stages
        )
        self.dec_blocks = nn.ModuleList(
            nn.ModuleList(block(grids[i], skip_conn) for _ in range(n))
            for i, n in reversed(list(enumerate(stages)))
        )

    def _resample(self, layer: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = layer(rearrange(x, "b (h w) c -> b c h w", h=grid[0], w=grid[1]))
        return rearrange(x, "b c h w -> b (h w) c")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) in [0, 1], y: (B,) labels, context: (B, L, context_dim)."""
        self._check_input(x)
        c, context = self.cond(t, y, context)
        x = self.x_embedder(x) + self.pos_embed
        skips, grid = [], self.grid
        for blocks, down in zip(self.enc_blocks, self.downs, strict=True):
            for blk in blocks:
                x = self._run(blk, x, c, context)
                skips.append(x)
            x, grid = self._resample(down, x, grid), (grid[0] // 2, grid[1] // 2)
        x = self._run(self.mid_block, x, c, context)
        for blocks, up in zip(self.dec_blocks, self.ups, strict=True):
            x, grid = self._resample(up, x, grid), (grid[0] * 2, grid[1] * 2)
            for blk in blocks:
                x = self._run(blk, x, c, context, skips.pop() if self.skip_conn else None)
        return self._unpatchify(self.final_layer(x, c))


class Zigma(_Backbone):
    """The Zigma baseline: a flat stack of Mamba layers at full resolution (SPEC "Baseline").

    Layer i scans along zigzag path i mod 8; RMSNorm + adaLN modulation; Mamba's causal conv1d.
    """

    def __init__(self, input_size: int | Sequence[int] = 32, patch_size: int = 1,
                 in_channels: int = 4, hidden_size: int = 768, depth: int = 24,
                 num_classes: int = 0, context_dim: int | None = None, learn_sigma: bool = False,
                 learn_pos_emb: bool = True, use_checkpoint: bool = False, d_state: int = 16):
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_classes,
                         context_dim, learn_sigma, learn_pos_emb, use_checkpoint,
                         divisor=patch_size)
        self.blocks = nn.ModuleList(
            MambaBlock(hidden_size, ZigmaMixer(hidden_size, i % NUM_PATHS, self.grid, d_state),
                       nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False),
                       cross_attn=context_dim is not None)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) in [0, 1], y: (B,) labels, context: (B, L, context_dim)."""
        self._check_input(x)
        c, context = self.cond(t, y, context)
        x = self.x_embedder(x) + self.pos_embed
        for blk in self.blocks:
            x = self._run(blk, x, c, context)
        return self._unpatchify(self.final_layer(x, c))


#################################################################################
#                                   Configs                                      #
#################################################################################
# USM depth = 2 * sum(stages) + 1. The released code splits the 12 encoder blocks of USM-B as
# 4-4-4; the other sizes keep three stages with the blocks spread as evenly as possible.


def _usm(hidden_size: int, stages: tuple[int, ...], patch_size: int):
    def build(**kwargs) -> USM:
        return USM(hidden_size=hidden_size, patch_size=patch_size,
                   stages=kwargs.pop("stages", stages), **kwargs)
    return build


def _zigma(hidden_size: int, depth: int, patch_size: int):
    def build(**kwargs) -> Zigma:
        return Zigma(hidden_size=hidden_size, depth=depth, patch_size=patch_size, **kwargs)
    return build


USM_models = {
    "USM-XL/1": _usm(1152, (10, 9, 9), 1), "USM-XL/2": _usm(1152, (10, 9, 9), 2),
    "USM-L/1": _usm(1024, (8, 8, 8), 1), "USM-L/2": _usm(1024, (8, 8, 8), 2),
    "USM-B/1": _usm(768, (4, 4, 4), 1), "USM-B/2": _usm(768, (4, 4, 4), 2),
    "USM-S/1": _usm(384, (2, 2, 2), 1), "USM-S/2": _usm(384, (2, 2, 2), 2),
    # Tiny: trains on a CPU in minutes (the Fashion-MNIST demo and experiment).
    "USM-T/1": _usm(64, (1, 1, 1), 1), "USM-T/2": _usm(64, (1, 1, 1), 2),
}

Zigma_models = {
    "Zigma-B/1": _zigma(768, 24, 1), "Zigma-B/2": _zigma(768, 24, 2),
    "Zigma-S/1": _zigma(384, 12, 1), "Zigma-S/2": _zigma(384, 12, 2),
    "Zigma-T/1": _zigma(64, 6, 1), "Zigma-T/2": _zigma(64, 6, 2),
}

All_models = {**USM_models, **Zigma_models}
