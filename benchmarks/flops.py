"""FLOP counting that treats USM, Zigma and a DiT the same way, and an independent cross-check.

torch.utils.flop_counter.FlopCounterMode counts matmuls, convolutions and attention from the
shapes of the aten ops it sees (2 FLOPs per multiply-add). The selective scan is invisible to it
(a fused CUDA kernel, or many small elementwise ops in the torch backend that it ignores), so the
scan is counted as one custom op with Mamba's formula (state-spaces/mamba issue 110):
9 * B * L * Di * N for the recurrence, + B * L * Di for the D skip term. Like the counter, this
leaves out the other elementwise work (norms, SiLU, gating, softplus), in every model alike.
Counting runs on the meta device: shapes only, so USM-B at 128x128 latents costs nothing.

The cross-check is fvcore's FlopCountAnalysis (the counter of DiT-era papers): it traces the model
with torch.jit and counts one multiply-add as one flop. It cannot see inside mamba_ssm's fused
kernels, so here the scan is traced as an opaque op (`opaque_selective_scan`), as the paper's
count would have met it. Both counts are split into the components of COMPONENTS.
"""

from collections import Counter, defaultdict
from unittest.mock import patch

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from models import SelectiveSSM
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


@torch.library.custom_op("usm_bench::opaque_selective_scan", mutates_args=())
def _opaque_scan_op(u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(u)  # only the shape matters to a counter


def opaque_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, backend="auto") -> torch.Tensor:
    """Stands for mamba_ssm's fused kernel in a jit trace: one op a counter cannot look into,
    computing nothing (zeros of the right shape), so tracing a B model on CPU takes seconds."""
    return _opaque_scan_op(u, delta)


# The parts of a network that the FLOP tables report, in this order. "other" catches whatever the
# rules of `component` do not place, so a renamed module shows up instead of vanishing.
COMPONENTS = ("patch embed", "conditioning", "mixer in_proj", "mixer x/dt/out proj", "mixer conv",
              "scan", "norms", "skip linears", "down/up samplers", "cross-attention",
              "final layer", "other")
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
_CONDITIONING = {"cond", "t_embedder", "y_embedder", "context_proj", "adaLN_modulation"}


def component(path: str, model: nn.Module, op: str, mixers: set[str]) -> str:
    """Which component an op counted in module `path` (dotted, "" = model) belongs to.

    Placed by module types where they are unambiguous (timm's PatchEmbed, norms, convolutions)
    and by attribute names otherwise; `mixers` are the paths of the modules that own a
    SelectiveSSM (SS2D, Zigma's Mamba mixer)."""
    names = path.split(".") if path else []
    module = model.get_submodule(path)
    prefixes = [".".join(names[:i]) for i in range(len(names) + 1)]
    ancestors = [model.get_submodule(p) for p in prefixes]
    if "selective_scan" in op:
        return "scan"
    if isinstance(module, _NORMS) or "norm" in op:  # modules, and F.layer_norm inside blocks
        return "norms"
    if any(isinstance(m, PatchEmbed) for m in ancestors):
        return "patch embed"
    if "final_layer" in names:
        return "final layer"
    if "attention" in op or any("Attention" in type(m).__name__ for m in ancestors):
        return "cross-attention"
    if _CONDITIONING & set(names):
        return "conditioning"
    if mixers & set(prefixes):  # Zigma's causal conv1d is functional (selective_scan.conv)
        if isinstance(module, nn.modules.conv._ConvNd) or "conv" in op:
            return "mixer conv"
        return "mixer in_proj" if "in_proj" in names else "mixer x/dt/out proj"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "down/up samplers"
    if any("skip" in n for n in names):
        return "skip linears"
    return "other"


def by_component(model: nn.Module, per_module: dict[str, dict[str, int]]) -> dict[str, int]:
    """Sum a counter's cumulative per-module, per-op counts into COMPONENTS.

    Both counters report each module's count including its submodules; a module's own ops are
    its count minus its direct children's, and those are what `component` places."""
    mixers = {path.rpartition(".")[0] for path, m in model.named_modules()
              if isinstance(m, SelectiveSSM)}
    out = dict.fromkeys(COMPONENTS, 0)
    for path, module in model.named_modules():
        own = Counter(per_module.get(path, {}))
        for name, _ in module.named_children():
            own.subtract(per_module.get(f"{path}.{name}" if path else name, {}))
        for op, flops in own.items():
            if flops:
                out[component(path, model, op, mixers)] += flops
    return out


def count_components(model: nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor | None
                     ) -> dict[str, int]:
    """Our count (FLOPs = 2 x multiply-adds, the scan by its formula) per component."""
    with patch("models.selective_scan", counted_selective_scan), torch.no_grad(), \
            FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    root = type(model).__name__
    per_module: dict[str, dict[str, int]] = defaultdict(dict)
    for key, ops in counter.get_flop_counts().items():
        if key == root or key.startswith(root + "."):
            per_module[key[len(root) + 1:]] = {str(op): n for op, n in ops.items()}
    return by_component(model, per_module)


def fvcore_components(model: nn.Module, *args: torch.Tensor | None) -> dict[str, int]:
    """fvcore's FlopCountAnalysis per component (one multiply-add = one flop), tracing `model`
    on real tensors with the scan opaque. fvcore skips the ops it has no formula for: the scan,
    attention (scaled_dot_product_attention), RMSNorm and every elementwise op."""
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError as err:
        raise ImportError("the FLOP cross-check needs fvcore: pip install -r "
                          "requirements-dev.txt") from err
    with patch("models.selective_scan", opaque_selective_scan), torch.no_grad():
        analysis = FlopCountAnalysis(model, args)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        per_module = analysis.by_module_and_operator()
    return by_component(model, per_module)
