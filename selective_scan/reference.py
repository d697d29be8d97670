"""Token-by-token selective scan: the readable definition that the fast backends must match.

Mamba's selective state space layer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", eq. 2a/2b; the decay is eq. 4's zero-order hold exp(delta A), the input
term the first-order delta B used by the authors' kernel), for every channel d and state n, with
input-dependent step size delta_t and input-dependent B_t, C_t:

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t        (2a)
    y_t = C_t h_t + D x_t                                 (2b)
    out_t = y_t * silu(z_t)                               (the Mamba block's gate)

Shapes and meaning follow mamba_ssm's `selective_scan_fn`: u, delta, z are (batch, Di, L); A is
(Di, N); B and C are (batch, N, L) or grouped (batch, G, N, L), where group g serves the Di/G
consecutive channels g*Di/G ... (g+1)*Di/G - 1; D and delta_bias are (Di,).

The helpers below (dtype, delta, output gate) are shared with the chunked backend, so that the two
differ only in how the recurrence (2a) is evaluated.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scan in float32 at least (half precision loses the state), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def effective_delta(
    delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> Tensor:
    """delta + delta_bias, then softplus if asked (Mamba: dt = softplus(dt_proj(x) + bias))."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """The D x_t skip term of (2b), then the output gate silu(z)."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def per_channel(BC: Tensor, dim: int) -> Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L): each channel gets its group's."""
    if BC.dim() == 3:
        BC = BC.unsqueeze(1)
    return BC.repeat_interleave(dim // BC.shape[1], dim=1)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Selective scan evaluated one token at a time, exactly as eq. 2a/2b read. Slow: documentation
    and the benchmark's baseline. Returns (batch, Di, L) in u's dtype."""
    dtype = compute_dtype(u.dtype)
    delta = effective_delta(delta, delta_bias, delta_softplus, dtype)
    x, A = u.to(dtype), A.to(dtype)
    B, C = per_channel(B, x.shape[1]).to(dtype), per_channel(C, x.shape[1]).to(dtype)
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (batch, Di, L, N): exp(delta_t A)
    drive = (delta * x).unsqueeze(-1) * B.transpose(2, 3)  # (batch, Di, L, N): delta_t B_t x_t
    h = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])
    ys = []
    # unbind rather than indexing [:, :, t]: indexing's backward writes a full-size gradient per
    # token, which makes the backward pass quadratic in L.
    for decay_t, drive_t, C_t in zip(decay.unbind(2), drive.unbind(2), C.unbind(3), strict=True):
        h = decay_t * h + drive_t  # (2a)
        ys.append((h * C_t).sum(-1))  # C_t h_t of (2b)
    return skip_and_gate(torch.stack(ys, dim=-1), x, D, z).to(u.dtype)
