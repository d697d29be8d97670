"""U-Shape Mamba (USM) and the Zigma baseline, built from the same parts.

USM: Ergasti et al., "U-Shape Mamba: State Space Model for faster diffusion", CVPR-W 2025
(arXiv 2504.13499). Zigma: Hu et al., "ZigMa: A DiT-style Zigzag Mamba Diffusion Model", ECCV 2024.
The layout follows DiT (Peebles & Xie 2023): embedders, blocks with adaLN-Zero, a final layer,
and a registry of named configurations at the bottom of the file.

Both networks are the published ones (docs/upstream.md): with the same weights, USM computes
what the authors' release computes and Zigma what CompVis/zigma (config zigzag8_b1_pe2) computes,
so their checkpoints load (loader.py). They share the selective scan, the SSM layer, the
conditioning and the cross-attention; their blocks differ as their authors built them.

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
from timm.layers import DropPath, PatchEmbed
from torch.utils.checkpoint import checkpoint

from diffusion import classifier_free_guidance
from selective_scan import causal_conv1d, selective_scan
from zigzag import NUM_PATHS, zigzag_inverse, zigzag_path


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation (DiT eq. in Sec. 3.2): per-sample shift and scale over all tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(h: int, w: int, dim: int) -> torch.Tensor:
    """The fixed 2-D sin-cos table both releases use when the embedding is not learned (MAE's
    layout): the first dim/2 channels encode the column, the last dim/2 the row, each as
    [sin | cos] over frequencies 10000^(-i / (dim/4)). Shape (1, h*w, dim), raster order."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float().unsqueeze(0)


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
    is the inverse softplus of dt drawn log-uniformly in [dt_min, dt_max]. The scan keeps A, D and
    the dt bias in float32 whatever the autocast dtype (Mamba's own rule).
    """

    def __init__(self, d_inner: int, d_state: int = 16, dt_rank: int = 1):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1,
                         dt_floor: float = 1e-4) -> None:
        self.x_proj.reset_parameters()  # nn.Linear's default, as in both releases
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        d_inner = self.D.numel()
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)))
        dt = (dt * dt_min).clamp(min=dt_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) == dt
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1.0)).repeat(d_inner, 1))
        self.D.fill_(1.0)

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
    """USM's 2-D selective scan with one zigzag direction (docs/upstream.md#usm-block).

    in_proj -> (x, z); depthwise 3x3 conv + SiLU on x in the 2-D layout; tokens gathered into
    the block's zigzag order (the authors' numbering, zigzag.py); selective scan; back to raster
    order; LayerNorm; gate by SiLU(z); out_proj. `gate=False` is the authors' --skip_gate: no z
    branch (in_proj C -> Di) and no gating.
    """

    def __init__(self, dim: int, grid: tuple[int, int], path: int, d_state: int = 16,
                 expand: int = 2, gate: bool = True):
        super().__init__()
        d_inner = expand * dim
        self.grid, self.gate = grid, gate
        self.in_proj = nn.Linear(dim, (2 if gate else 1) * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner)
        # Its input is channels-last (a view of the (b, l, d) tokens), so the weight's gradient
        # comes channels-last too; a (Di, 1, 3, 3) weight is the same memory either way, but DDP
        # compares strides and warned at every run. Stored channels-last, the two agree.
        self.conv2d.to(memory_format=torch.channels_last)
        self.ssm = SelectiveSSM(d_inner, d_state, dt_rank=math.ceil(dim / 16))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.register_buffer("perm", zigzag_path(*grid, path, "usm"), persistent=False)
        self.register_buffer("inverse", zigzag_inverse(*grid, path, "usm"), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1) if self.gate else (self.in_proj(x), None)
        h, w = self.grid
        x = F.silu(self.conv2d(rearrange(x, "b (h w) d -> b d h w", h=h, w=w)))
        # index_select, not x[:, :, perm]: the same gather, but its backward is a plain scatter
        # where advanced indexing's is an accumulating index_put_ (2.7x the fwd+bwd time on CPU).
        y = self.ssm(rearrange(x, "b d h w -> b d (h w)").index_select(2, self.perm))
        y = self.out_norm(rearrange(y.index_select(2, self.inverse), "b d l -> b l d"))
        return self.out_proj(y * F.silu(z) if self.gate else y)


class ZigmaMixer(nn.Module):
    """Zigma's Mamba mixer: Mamba's causal depthwise conv1d (d_conv 4) on the zigzag sequence
    (Zigma's path numbering, zigzag.py)."""

    def __init__(self, dim: int, path: int, grid: tuple[int, int], d_state: int = 16,
                 expand: int = 2, d_conv: int = 4):
        super().__init__()
        d_inner = expand * dim
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, padding=d_conv - 1, groups=d_inner)
        self.ssm = SelectiveSSM(d_inner, d_state, dt_rank=math.ceil(dim / 16))
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.register_buffer("perm", zigzag_path(*grid, path, "zigma"), persistent=False)
        self.register_buffer("inverse", zigzag_inverse(*grid, path, "zigma"), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x.index_select(1, self.perm))  # the gather of SS2D.forward
        x, z = rearrange(x, "b l d -> b d l").chunk(2, dim=1)
        x = causal_conv1d(x, self.conv1d.weight, self.conv1d.bias, activation="silu")
        y = rearrange(self.ssm(x, z=z), "b d l -> b l d")  # Mamba gates by SiLU(z) in the scan
        return self.out_proj(y).index_select(1, self.inverse)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to the (projected) text tokens."""

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)  # k rows, then v rows
        self.to_out = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.to_q(x), "b l (h d) -> b h l d", h=self.heads)
        k, v = rearrange(self.to_kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


#################################################################################
#                                 Core blocks                                    #
#################################################################################


class AdaLNBlock(nn.Module):
    """What the USM and Zigma blocks share: adaLN-Zero conditioning (DiT Sec. 3.2) and, with text,
    a cross-attention step driven by a second shift/scale/gate triplet. There is no MLP
    (docs/upstream.md#usm-block).

    The modulation MLP is zero-initialised (by each model's init), so every gate starts at 0.
    """

    def __init__(self, dim: int, cross_attn: bool):
        super().__init__()
        self.cross_attn = CrossAttention(dim) if cross_attn else None
        self.n_mod = 6 if cross_attn else 3  # (shift, scale, gate) per branch
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adaLN_modulation(c).chunk(self.n_mod, dim=-1)

    def attend(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...],
               context: torch.Tensor | None) -> torch.Tensor:
        """x + gate2 * CrossAttention(modulate(LN(x), shift2, scale2), context), or x."""
        if self.cross_attn is None:
            return x
        h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), mod[3], mod[4])
        return x + mod[5].unsqueeze(1) * self.cross_attn(h, context)


class USMBlock(AdaLNBlock):
    """One USM block (the authors' release, docs/upstream.md#usm-block):

        h = modulate(LayerNorm(x), shift, scale)
        x = x + gate * (skip_scale * h + SS2D(h))          [+ cross-attention]

    skip_scale is a trained per-channel vector (init ones). With `skip`, a decoder block first
    concatenates the encoder output on channels and projects 2C -> C, before the norm.
    """

    def __init__(self, dim: int, grid: tuple[int, int], path: int, d_state: int = 16,
                 cross_attn: bool = False, skip: bool = False, gate: bool = True):
        super().__init__(dim, cross_attn)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer = SS2D(dim, grid, path, d_state, gate=gate)
        self.skip_scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        mod = self.modulation(c)
        h = modulate(self.norm(x), mod[0], mod[1])
        x = x + mod[2].unsqueeze(1) * (self.skip_scale * h + self.mixer(h))
        return self.attend(x, mod, context)


class ZigmaBlock(AdaLNBlock):
    """One Zigma layer (CompVis/zigma, docs/upstream.md#zigma-network): Mamba's residual stream.

        residual = residual + drop_path(x)      (the first layer starts with residual = x)
        h = RMSNorm(residual)
        x = h + gate * mixer(modulate(h, shift, scale))     [+ cross-attention on x]

    and returns (x, residual); the residual is kept in float32.
    """

    def __init__(self, dim: int, grid: tuple[int, int], path: int, d_state: int = 16,
                 cross_attn: bool = False, drop_path: float = 0.0):
        super().__init__(dim, cross_attn)
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.mixer = ZigmaMixer(dim, path, grid, d_state)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, c: torch.Tensor,
                context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = (x if residual is None else residual + self.drop_path(x)).float()
        h = self.norm(residual)
        mod = self.modulation(c)
        x = h + mod[2].unsqueeze(1) * self.mixer(modulate(h, mod[0], mod[1]))
        return self.attend(x, mod, context), residual


class FinalLayer(nn.Module):
    """LayerNorm [+ adaLN modulation] + Linear to patch*patch*out_channels. USM modulates; Zigma's
    final layer has no adaLN (CompVis)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, adaln: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = (nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)) if adaln
                                 else None)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return self.linear(x)


#################################################################################
#                          Shared model plumbing                                 #
#################################################################################


class _Backbone(nn.Module):
    """Patchify, positional embedding, conditioning and guidance of both models.

    The positional embedding is learned (starting at zeros, as both releases start it) or the
    fixed sin-cos table, kept as a buffer in the state dict so that a checkpoint's stored table is
    the one used (the authors' table is stored in their checkpoints; docs/upstream.md#usm-options).
    """

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
        if learn_pos_emb:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1],
                                                      hidden_size))
        else:
            self.register_buffer("pos_embed", sincos_pos_embed(*self.grid, hidden_size))
        self.cond = Conditioning(hidden_size, num_classes, context_dim)

    def _check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.input_size or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {self.input_size[0]}, "
                f"{self.input_size[1]}), got {tuple(x.shape)}"
            )

    def _run(self, block: nn.Module, *args: torch.Tensor | None):
        if self.use_checkpoint and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid[0], p=p, q=p)

    @torch.no_grad()
    def _init_embedders(self) -> None:
        """What both releases do alike: the patch embedding initialised like a Linear (xavier on
        the flattened kernel, zero bias), the timestep MLP's weights N(0, 0.02), the class table
        N(0, 0.02), every adaLN modulation zero."""
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for layer in self.cond.t_embedder.mlp[::2]:
            nn.init.normal_(layer.weight, std=0.02)
        if self.cond.y_embedder is not None:
            nn.init.normal_(self.cond.y_embedder.weight, std=0.02)
        for name, module in self.named_modules():
            if name.endswith("adaLN_modulation"):
                nn.init.zeros_(module[-1].weight)
                nn.init.zeros_(module[-1].bias)

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
    """U-Shape Mamba: a U-Net of Mamba blocks at constant width (docs/upstream.md#usm-architecture).

    Encoder: `stages[i]` blocks, then a stride-2 Conv2d (tokens / 4). Middle: one block.
    Decoder: up-sampling (ConvTranspose2d, or nearest + 3x3 conv), then `stages[i]` blocks in
    reverse order. Each decoder block takes the most recent unused encoder-block output (LIFO).
    Block k (0..depth-1 through the whole U) scans along the authors' zigzag path k mod 8.

    `skip_gate` is the authors' --skip_gate (SS2D without its SiLU(z) gate); as in their code it
    reaches the encoder and decoder blocks but not the middle block. `use_convtranspose=False`
    is ours: the authors' alternative (Conv2d + PixelShuffle) crashes in their own forward.
    """

    def __init__(self, input_size: int | Sequence[int] = 32, patch_size: int = 1,
                 in_channels: int = 4, hidden_size: int = 768, stages: Sequence[int] = (4, 4, 4),
                 num_classes: int = 0, context_dim: int | None = None, learn_sigma: bool = False,
                 learn_pos_emb: bool = False, skip_conn: bool = True,
                 use_convtranspose: bool = True, skip_gate: bool = False,
                 use_checkpoint: bool = False, d_state: int = 16):
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_classes,
                         context_dim, learn_sigma, learn_pos_emb, use_checkpoint,
                         divisor=patch_size * 2 ** len(stages))
        self.stages, self.skip_conn = tuple(stages), skip_conn
        grids = [(self.grid[0] >> i, self.grid[1] >> i) for i in range(len(stages) + 1)]
        k = iter(range(2 * sum(stages) + 1))  # block number through the whole U

        def block(grid: tuple[int, int], skip: bool = False, gate: bool = not skip_gate
                  ) -> USMBlock:
            return USMBlock(hidden_size, grid, next(k) % NUM_PATHS, d_state,
                            cross_attn=context_dim is not None, skip=skip, gate=gate)

        C = hidden_size
        self.enc_blocks = nn.ModuleList(
            nn.ModuleList(block(grids[i]) for _ in range(n)) for i, n in enumerate(stages)
        )
        self.downs = nn.ModuleList(nn.Conv2d(C, C, 2, stride=2) for _ in stages)
        self.mid_block = block(grids[-1], gate=True)
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
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The authors' init (docs/upstream.md#initialisation): every Linear xavier-uniform with
        zero bias, except the SSM's own projections (raw parameters in their code, so Mamba's init
        stays); then the shared embedder init, and a zero final layer (output 0 at init)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, SelectiveSSM):
                module.reset_parameters()
        self._init_embedders()
        for p in self.final_layer.parameters():
            nn.init.zeros_(p)

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
    """The Zigma baseline as CompVis/zigma builds it (docs/upstream.md#zigma-network): a
    flat stack of Mamba layers at full resolution on Mamba's residual stream, layer i scanning
    along Zigma's zigzag path i mod 8, a final RMSNorm, and a final layer without adaLN.

    Stochastic depth as in CompVis: layer i drops its input to the residual with probability
    [0, linspace(0, drop_path, depth)][i], and the final add drops with drop_path.
    """

    def __init__(self, input_size: int | Sequence[int] = 32, patch_size: int = 1,
                 in_channels: int = 4, hidden_size: int = 768, depth: int = 24,
                 num_classes: int = 0, context_dim: int | None = None, learn_sigma: bool = False,
                 learn_pos_emb: bool = True, use_checkpoint: bool = False, d_state: int = 16,
                 drop_path: float = 0.1):
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_classes,
                         context_dim, learn_sigma, learn_pos_emb, use_checkpoint,
                         divisor=patch_size)
        rates = [0.0, *torch.linspace(0, drop_path, depth, device="cpu").tolist()]
        self.blocks = nn.ModuleList(
            ZigmaBlock(hidden_size, self.grid, i % NUM_PATHS, d_state,
                       cross_attn=context_dim is not None, drop_path=rates[i])
            for i in range(depth)
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm_f = nn.RMSNorm(hidden_size, eps=1e-5)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaln=False)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """CompVis' init: Linear weights as PyTorch makes them and biases zero (the dt bias
        apart), each mixer's out_proj kaiming-uniform scaled by 1/sqrt(depth) (GPT-2's rule for
        residual branches), then the shared embedder init. The final layer is not zeroed."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            block.mixer.ssm.reset_parameters()
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            block.mixer.out_proj.weight /= math.sqrt(len(self.blocks))
        self._init_embedders()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) in [0, 1], y: (B,) labels, context: (B, L, context_dim)."""
        self._check_input(x)
        c, context = self.cond(t, y, context)
        x, residual = self.x_embedder(x) + self.pos_embed, None
        for blk in self.blocks:
            x, residual = self._run(blk, x, residual, c, context)
        x = self.norm_f(residual + self.drop_path(x))
        return self._unpatchify(self.final_layer(x, c))


#################################################################################
#                                   Configs                                      #
#################################################################################
# USM depth = 2 * sum(stages) + 1. The released code splits the 12 encoder blocks of USM-B as
# 4-4-4; the other sizes keep three stages with the blocks spread as evenly as possible.


# Each builder keeps its shape in `.config`: a checkpoint that records only tensors is matched to
# its registry name by it (loader.py).


def _usm(hidden_size: int, stages: tuple[int, ...], patch_size: int):
    def build(**kwargs) -> USM:
        return USM(hidden_size=hidden_size, patch_size=patch_size,
                   stages=kwargs.pop("stages", stages), **kwargs)
    build.config = dict(hidden_size=hidden_size, stages=stages, patch_size=patch_size)
    return build


def _zigma(hidden_size: int, depth: int, patch_size: int):
    def build(**kwargs) -> Zigma:
        return Zigma(hidden_size=hidden_size, depth=depth, patch_size=patch_size, **kwargs)
    build.config = dict(hidden_size=hidden_size, depth=depth, patch_size=patch_size)
    return build


USM_models = {
    "USM-XL/1": _usm(1152, (10, 9, 9), 1), "USM-XL/2": _usm(1152, (10, 9, 9), 2),
    "USM-L/1": _usm(1024, (8, 8, 8), 1), "USM-L/2": _usm(1024, (8, 8, 8), 2),
    "USM-B/1": _usm(768, (4, 4, 4), 1), "USM-B/2": _usm(768, (4, 4, 4), 2),
    "USM-S/1": _usm(384, (2, 2, 2), 1), "USM-S/2": _usm(384, (2, 2, 2), 2),
    # Tiny: trains on a CPU in minutes (the Fashion-MNIST demo and experiment).
    "USM-T/1": _usm(64, (1, 1, 1), 1), "USM-T/2": _usm(64, (1, 1, 1), 2),
    "USM-T/4": _usm(64, (1, 1, 1), 4),
}

Zigma_models = {
    "Zigma-B/1": _zigma(768, 24, 1), "Zigma-B/2": _zigma(768, 24, 2),
    "Zigma-S/1": _zigma(384, 12, 1), "Zigma-S/2": _zigma(384, 12, 2),
    "Zigma-T/1": _zigma(64, 6, 1), "Zigma-T/2": _zigma(64, 6, 2),
    "Zigma-T/4": _zigma(64, 6, 4),
}

All_models = {**USM_models, **Zigma_models}
