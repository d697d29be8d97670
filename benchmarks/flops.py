"""FLOP counting that treats USM, Zigma and a DiT the same way.

torch.utils.flop_counter.FlopCounterMode counts matmuls, convolutions and attention from the
shapes of the aten ops it sees (2 FLOPs per multiply-add). The selective scan is invisible to it
(a fused CUDA kernel, or many small elementwise ops in the torch backend that it ignores), so the
scan is counted as one custom op with Mamba's formula (state-spaces/mamba issue 110):
9 * B * L * Di * N for the recurrence, + B * L * Di for the D skip term. Like the counter, this
leaves out the other elementwise work (norms, SiLU, gating, softplus), in every model alike.
Counting runs on the meta device: shapes only, so USM-B at 128x128 latents costs nothing.
"""

from collections import Counter
from unittest.mock import patch

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from selective_scan import selective_scan

METHOD = (
    "torch.utils.flop_counter.FlopCounterMode on the meta device (Linear, Conv, attention; "
    "FLOPs = 2 x multiply-adds) + selective scan 9*B*L*Di*N + B*L*Di per scan; norms and other "
    "elementwise ops not counted. GMACs = GFLOPs / 2 (the fvcore convention many papers call "
    "'GFLOPs')."
)


@torch.library.custom_op("usm_bench::selective_scan", mutates_args=())
def _scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
             delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u)


@register_flop_formula(torch.ops.usm_bench.selective_scan)
def scan_flops(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, *args, **kwargs) -> int:
    """Mamba's count for one scan over u (B, Di, L) with a (Di, N) state matrix A."""
    batch, d_inner, length = u_shape
    flops = 9 * batch * length * d_inner * A_shape[1]
    return flops + (batch * length * d_inner if D_shape is not None else 0)


def counted_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, backend="auto") -> torch.Tensor:
    """Drop-in for selective_scan that FlopCounterMode sees as one op (the backend is moot)."""
    return _scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


# FlopCounterMode's keys (aten overload packets) grouped into the kinds reported in the table.
_KINDS = {"mm": "linear", "addmm": "linear", "bmm": "linear", "baddbmm": "linear",
          "convolution": "conv", "selective_scan": "scan"}


def count_flops(model: torch.nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor | None
                ) -> dict[str, int]:
    """Forward FLOPs of model(*args, **kwargs) by kind: linear, conv, attention, scan, total.

    The model's `selective_scan` (imported into models.py) is swapped for the counted op while
    the forward runs; pass meta tensors and a meta model to count without computing.
    """
    with patch("models.selective_scan", counted_selective_scan), torch.no_grad(), \
            FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    kinds: Counter[str] = Counter()
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = op.__name__ if hasattr(op, "__name__") else str(op)
        kinds[_KINDS.get(name.split(".")[0], "attention")] += flops
    kinds["total"] = counter.get_total_flops()
    return dict(kinds)
