"""The "triton" backend: the selective scan fused in Triton, forward and backward, for GPUs
without mamba_ssm's compiled kernel (Triton ships with PyTorch on Linux and compiles at run time).

Layout of the work, as in mamba_ssm's CUDA kernel (Gu & Dao 2023, section 3.3): a program owns
BLOCK_D channels of one B/C group of one batch element and walks the sequence in chunks of CHUNK
tokens. Within a chunk the tokens are scanned in parallel (`tl.associative_scan` over the affine
maps h -> a h + b, a_t = exp(delta_t A), b_t = delta_t B_t u_t), one state n at a time, adding
C_t h_t to the output; the state at the chunk's end carries into the next chunk. Nothing of size
(batch, Di, L, N) is written: the forward keeps only the state at every chunk start (1/CHUNK of
the states), and the backward walks the chunks in reverse, recomputes a chunk's states from its
checkpoint, and runs the adjoint recurrence mu_t = C_t g_t + a_{t+1} mu_{t+1} (the gradient of
h_t) as a reverse scan over the same chunk. The gradients of delta and A need a_t h_{t-1}, which
is h_t - b_t (no division by a decay that may underflow).

Everything is computed in float32 whatever the inputs' dtype (float32, bfloat16, float16). dB and
dC are sums over a group's channels, accumulated with float32 atomic adds like mamba_ssm's kernel
(so their last bits depend on the order the programs run in); dA, dD and d delta_bias are summed
over the batch from per-program partial sums.

Bounds: N <= MAX_STATE = 256. A program keeps the chunk-start states (and in the backward their
gradients and dA) as (BLOCK_D, next power of two of N) tiles in registers, and registers cannot be
indexed by the loop variable n: taking state n out of such a tile and putting it back costs O(N)
per state per chunk, O(N^2) per chunk, against O(N CHUNK) for the scans. Up to N = CHUNK = 256 the
scans dominate; past it the bookkeeping would. (Registers are not the bound: compiled for sm_90
by Triton 3.9 without a GPU, `triton.compile` as in tests/test_triton_scan.py and then
`cuobjdump -res-usage`, the kernels take at most 182 registers a thread, none spilled, for every
N up to 256.) Any L (a partial last chunk is padded with delta = 0, which decays by 1 and adds
nothing) and any Di.

With TRITON_INTERPRET=1 set before Triton is imported, the same kernels run on CPU tensors through
Triton's interpreter: that is how the tests check them without a GPU.
"""

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

CHUNK = 256  # tokens per chunk: the checkpoint interval, and the length of a parallel scan
# Channels x tokens per program (BLOCK_D = tile // CHUNK channels at full chunks): compiled for an
# H100 (sm_90) as above, N = 16, the forward takes 161 registers a thread at 1024, the backward,
# with more tiles alive, 168 at 512 (253 at 1024), none spilled. Not yet tuned on a GPU.
FWD_TILE, BWD_TILE = 1024, 512
# a * b + c as one FMA (Triton's default so far; 3.9 warns unless it is asked for by name)
COMPILE_OPTIONS = {"num_warps": 4, "enable_fp_fusion": True}
MAX_STATE = 256


@triton.jit
def _compose(a_first, b_first, a_then, b_then):
    """The affine map h -> a_then (a_first h + b_first) + b_then. Scanned in reverse, the first
    map is the later tokens' (Triton's reverse scan is flip, scan, flip, as its test_scan2d checks
    for this very combine)."""
    return a_first * a_then, a_then * b_first + b_then


@triton.jit
def _step_sizes(delta_ptr, bias, ptrs, mask, SOFTPLUS: tl.constexpr):
    """dt = delta + delta_bias, softplus'd if asked, in float32 (0 on padding: decay 1, no input),
    and d dt / d delta."""
    arg = tl.load(delta_ptr + ptrs, mask=mask, other=0.0).to(tl.float32) + bias[:, None]
    if SOFTPLUS:
        dt = tl.maximum(arg, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(arg)))  # softplus, stably
        slope = tl.sigmoid(arg)
    else:
        dt = arg
        slope = tl.full(arg.shape, 1.0, tl.float32)
    return tl.where(mask, dt, 0.0), slope


@triton.jit
def _channel_weights(bias_ptr, D_ptr, channel, d_ok, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """delta_bias and D of the program's channels, 0 where absent."""
    bias = tl.zeros(channel.shape, tl.float32)
    D = tl.zeros(channel.shape, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channel, mask=d_ok, other=0.0)
    if HAS_D:
        D = tl.load(D_ptr + channel, mask=d_ok, other=0.0)
    return bias, D


@triton.jit
def _column(tile, index, n):
    """tile[:, n] as a vector (registers cannot be indexed by a loop variable)."""
    return tl.sum(tl.where(index[None, :] == n, tile, 0.0), axis=1)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
    dim, length, state, group_dim, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block, group, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < group_dim
    channel = group * group_dim + offs_d
    rows = (batch * dim + channel).to(tl.int64) * length  # where each channel's tokens start
    bc_rows = (batch * tl.num_programs(1) + group).to(tl.int64) * state * length
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, CHUNK)
    state_mask = d_ok[:, None] & (offs_n < state)[None, :]
    bias, D = _channel_weights(bias_ptr, D_ptr, channel, d_ok, HAS_BIAS, HAS_D)
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # the states at the chunk start
    for c in range(n_chunks):
        offs_t = c * CHUNK + offs_c
        t_ok = offs_t < length
        mask = d_ok[:, None] & t_ok[None, :]
        ptrs = rows[:, None] + offs_t[None, :]
        x = tl.load(u_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        dt, _ = _step_sizes(delta_ptr, bias, ptrs, mask, SOFTPLUS)
        dtx = dt * x
        if SAVE_STATES:
            slot = ((batch * dim + channel).to(tl.int64) * n_chunks + c) * state
            tl.store(states_ptr + slot[:, None] + offs_n[None, :], h, mask=state_mask)
        y = tl.zeros((BLOCK_D, CHUNK), tl.float32)
        for n in range(state):
            A_n = tl.load(A_ptr + channel * state + n, mask=d_ok, other=0.0)
            B_n = tl.load(B_ptr + bc_rows + n * length + offs_t, mask=t_ok, other=0.0)
            C_n = tl.load(C_ptr + bc_rows + n * length + offs_t, mask=t_ok, other=0.0)
            decay, hs = tl.associative_scan(
                (tl.exp(dt * A_n[:, None]), dtx * B_n.to(tl.float32)[None, :]), 1, _compose)
            hs += decay * _column(h, offs_n, n)[:, None]  # plus the chunk-start state, decayed
            y += hs * C_n.to(tl.float32)[None, :]
            h = tl.where(offs_n[None, :] == n, _column(hs, offs_c, CHUNK - 1)[:, None], h)
        y += D[:, None] * x
        if HAS_Z:
            z = tl.load(z_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, grad_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    dim, length, state, group_dim, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block, group, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < group_dim
    channel = group * group_dim + offs_d
    rows = (batch * dim + channel).to(tl.int64) * length
    bc_rows = (batch * tl.num_programs(1) + group).to(tl.int64) * state * length
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, CHUNK)
    state_mask = d_ok[:, None] & (offs_n < state)[None, :]
    bias, D = _channel_weights(bias_ptr, D_ptr, channel, d_ok, HAS_BIAS, HAS_D)
    mu_next = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # gradient of the next chunk's first state
    dA = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD = tl.zeros((BLOCK_D,), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        offs_t = c * CHUNK + offs_c
        t_ok = offs_t < length
        mask = d_ok[:, None] & t_ok[None, :]
        ptrs = rows[:, None] + offs_t[None, :]
        x = tl.load(u_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        dt, slope = _step_sizes(delta_ptr, bias, ptrs, mask, SOFTPLUS)
        next_mask = d_ok[:, None] & (offs_t + 1 < length)[None, :]
        dt_next, _ = _step_sizes(delta_ptr, bias, ptrs + 1, next_mask, SOFTPLUS)
        dtx = dt * x
        g = tl.load(grad_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
            sig_z = tl.sigmoid(z)
            gy = g * z * sig_z  # the gradient of y, before the gate
        else:
            gy = g
        slot = ((batch * dim + channel).to(tl.int64) * n_chunks + c) * state
        h0 = tl.load(states_ptr + slot[:, None] + offs_n[None, :], mask=state_mask, other=0.0)
        y = tl.zeros((BLOCK_D, CHUNK), tl.float32)
        mu_B = tl.zeros((BLOCK_D, CHUNK), tl.float32)  # sum over n of mu B: d/d(dt x)
        mu_hA = tl.zeros((BLOCK_D, CHUNK), tl.float32)  # sum over n of mu A a h_{t-1}: d/d dt
        for n in range(state):
            A_n = tl.load(A_ptr + channel * state + n, mask=d_ok, other=0.0)
            B_n = tl.load(B_ptr + bc_rows + n * length + offs_t, mask=t_ok, other=0.0)
            C_n = tl.load(C_ptr + bc_rows + n * length + offs_t, mask=t_ok, other=0.0)
            B_n, C_n = B_n.to(tl.float32)[None, :], C_n.to(tl.float32)[None, :]
            column = offs_n[None, :] == n
            b = dtx * B_n
            decay, hs = tl.associative_scan((tl.exp(dt * A_n[:, None]), b), 1, _compose)
            hs += decay * _column(h0, offs_n, n)[:, None]  # the recomputed states h_t
            y += hs * C_n
            tl.atomic_add(dC_ptr + bc_rows + n * length + offs_t, tl.sum(gy * hs, axis=0),
                          mask=t_ok, sem="relaxed")
            growth, mu = tl.associative_scan(
                (tl.exp(dt_next * A_n[:, None]), gy * C_n), 1, _compose, reverse=True)
            mu += growth * _column(mu_next, offs_n, n)[:, None]  # mu_t, the gradient of h_t
            mu_next = tl.where(column, _column(mu, offs_c, 0)[:, None], mu_next)
            tl.atomic_add(dB_ptr + bc_rows + n * length + offs_t, tl.sum(mu * dtx, axis=0),
                          mask=t_ok, sem="relaxed")
            mu_B += mu * B_n
            q = mu * (hs - b)  # mu_t a_t h_{t-1}: the gradient of a_t, times a_t
            mu_hA += q * A_n[:, None]
            dA = tl.where(column, dA + tl.sum(q * dt, axis=1)[:, None], dA)
        y += D[:, None] * x
        du = mu_B * dt + gy * D[:, None]
        dD += tl.sum(gy * x, axis=1)
        if HAS_Z:  # d/dz of y silu(z) = y sigmoid(z) (1 + z (1 - sigmoid(z)))
            dz = g * y * sig_z * (1.0 + z * (1.0 - sig_z))
            tl.store(dz_ptr + ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        ddelta = tl.where(mask, (mu_B * x + mu_hA) * slope, 0.0)
        dbias += tl.sum(ddelta, axis=1)
        tl.store(du_ptr + ptrs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + ptrs, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask)
    item = (batch * dim + channel).to(tl.int64)
    tl.store(dA_ptr + item[:, None] * state + offs_n[None, :], dA, mask=state_mask)
    if HAS_D:
        tl.store(dD_ptr + item, dD, mask=d_ok)
    if HAS_BIAS:
        tl.store(dbias_ptr + item, dbias, mask=d_ok)


# True when TRITON_INTERPRET=1 was set at import: the kernels then run on CPU tensors, in Python.
INTERPRETED = isinstance(_scan_fwd_kernel, InterpretedFunction)


def launch_shape(length: int, group_dim: int, state: int, chunk: int | None,
                 tile: int) -> dict[str, int]:
    """CHUNK (tokens per chunk, a power of two), BLOCK_D (channels per program) and BLOCK_N."""
    chunk = chunk or min(CHUNK, triton.next_power_of_2(max(length, 16)))
    block_d = min(triton.next_power_of_2(group_dim), max(1, tile // chunk))
    return {"CHUNK": chunk, "BLOCK_D": block_d, "BLOCK_N": triton.next_power_of_2(state)}


def on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it t's (tensors on cuda:1, say, in a
    process that never called set_device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def grid(shape: dict[str, int], group_dim: int, groups: int, batch: int) -> tuple[int, ...]:
    """One program per (block of BLOCK_D channels, group, batch element)."""
    return triton.cdiv(group_dim, shape["BLOCK_D"]), groups, batch


class TritonScan(torch.autograd.Function):
    """selective_scan_fn's contract through the Triton kernels (CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                chunk: int | None) -> Tensor:
        batch, dim, length = u.shape
        state, groups = A.shape[1], 1 if B.dim() == 3 else B.shape[1]
        if state > MAX_STATE:
            raise ValueError(f"the Triton scan takes N <= {MAX_STATE} states, got {state}")
        # Activations stay in their dtype (the kernels load and convert them), weights in float32.
        u_, delta_, z_ = (None if t is None else t.detach().contiguous() for t in (u, delta, z))
        A_, D_, bias_ = (None if t is None else t.detach().float().contiguous()
                         for t in (A, D, delta_bias))
        B_, C_ = (t.detach().reshape(batch, groups, state, length).contiguous() for t in (B, C))
        shape = launch_shape(length, dim // groups, state, chunk, FWD_TILE)
        n_chunks = triton.cdiv(length, shape["CHUNK"])
        out = torch.empty_like(u_)
        states = None  # at every chunk start, for the backward
        if any(ctx.needs_input_grad):
            states = u_.new_empty(batch, dim, n_chunks, state, dtype=torch.float32)
        flags = {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None,
                 "SOFTPLUS": bool(delta_softplus)}
        if out.numel():  # absent optional tensors: another pointer stands in, never read
            pointers = (u_, delta_, A_, B_, C_, A_ if D is None else D_, u_ if z is None else z_,
                        A_ if delta_bias is None else bias_, out, out if states is None else states)
            with on_device(u_):
                _scan_fwd_kernel[grid(shape, dim // groups, groups, batch)](
                    *pointers, dim, length, state, dim // groups, n_chunks, **flags,
                    SAVE_STATES=states is not None, **shape, **COMPILE_OPTIONS)
        ctx.save_for_backward(u_, delta_, A_, B_, C_, D_, z_, bias_, states)
        ctx.flags, ctx.chunk, ctx.B_shape = flags, shape["CHUNK"], B.shape
        ctx.dtypes = [None if t is None else t.dtype for t in (A, B, C, D, delta_bias)]
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        u, delta, A, B, C, D, z, bias, states = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, state = B.shape[1], A.shape[1]
        shape = launch_shape(length, dim // groups, state, ctx.chunk, BWD_TILE)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dA = u.new_zeros(batch, dim, state, dtype=torch.float32)  # per batch element
        dD, dbias = (u.new_zeros(batch, dim, dtype=torch.float32) for _ in range(2))
        dB, dC = (u.new_zeros(B.shape, dtype=torch.float32) for _ in range(2))  # atomic sums
        if u.numel():
            pointers = (u, delta, A, B, C, A if D is None else D, u if z is None else z,
                        A if bias is None else bias, states, grad_out.contiguous(),
                        du, ddelta, du if dz is None else dz, dA, dD, dbias, dB, dC)
            with on_device(u):
                _scan_bwd_kernel[grid(shape, dim // groups, groups, batch)](
                    *pointers, dim, length, state, dim // groups, states.shape[2], **ctx.flags,
                    **shape, **COMPILE_OPTIONS)
        weights = (dA.sum(0), dB.view(ctx.B_shape), dC.view(ctx.B_shape), dD.sum(0), dbias.sum(0))
        dA, dB, dC, dD, dbias = (None if dtype is None else g.to(dtype)
                                 for g, dtype in zip(weights, ctx.dtypes, strict=True))
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
) -> Tensor:
    """Same contract as `selective_scan_ref`, for float32/float16/bfloat16 tensors; returns u's
    dtype. chunk (a power of two) overrides the tokens per chunk (the tests use short ones)."""
    return TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)
