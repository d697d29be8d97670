"""Write the parity fixtures from the upstream code itself (run in a side environment, README.md).

Each fixture is a tiny checkpoint saved the way the upstream training script saves it, built with
the upstream model classes, plus `<name>.expected.pt`: fixed inputs and what the upstream forward
computes on them with the checkpoint's EMA and model weights. The tests load the checkpoint with
our loader and compare our forward with these outputs; nothing here is imported by the tests.

    python make_fixtures.py usm     --usm-src U --zigma-src Z --out DIR   # the USM authors' .pt
    python make_fixtures.py compvis --zigma-src Z --out DIR --case pe2    # CompVis' .pt, via Hydra

make_fixtures.sh beside this file sets up the environments and runs every case.

mamba_ssm's CUDA kernels are replaced by the Mamba authors' own PyTorch references shipped in
CompVis' vendored copy (`selective_scan_ref`, `mamba_inner_ref`, `causal_conv1d_ref`, and
`rms_norm_ref` / `layer_norm_ref` for the Triton norms), so everything runs on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import torch

SEED = 0
BATCH = 2


#################################################################################
#                      mamba_ssm / Triton -> reference code                      #
#################################################################################


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def install_reference_kernels(zigma_src: Path) -> None:
    """Make CompVis' vendored mamba_ssm importable without its CUDA extensions, route every kernel
    to the reference implementation beside it, and expose that scan as `mamba_ssm` for USM."""
    _stub("selective_scan_cuda")
    _stub("causal_conv1d_cuda")
    # The language model the package also exports (it needs transformers) is never used here.
    _stub("dis_mamba.mamba_ssm.models.mixer_seq_simple", MambaLMHeadModel=None)
    sys.path.extend([str(zigma_src), str(zigma_src / "dis_causal_conv1d")])
    import causal_conv1d
    from causal_conv1d import causal_conv1d_interface as conv

    causal_conv1d.causal_conv1d_fn = conv.causal_conv1d_fn = conv.causal_conv1d_ref
    from dis_mamba.mamba_ssm.modules import mamba_simple
    from dis_mamba.mamba_ssm.ops import selective_scan_interface as scan
    from dis_mamba.mamba_ssm.ops.triton import layernorm

    scan.causal_conv1d_fn = conv.causal_conv1d_ref
    scan.selective_scan_fn = mamba_simple.selective_scan_fn = scan.selective_scan_ref
    scan.mamba_inner_fn = mamba_simple.mamba_inner_fn = scan.mamba_inner_ref
    mamba_simple.causal_conv1d_fn = conv.causal_conv1d_ref

    # The fused Triton add + norm, in float32 as the kernel computes it.
    def rms_norm_fn(x, weight, bias, residual=None, prenorm=False, residual_in_fp32=False,
                    eps=1e-6):
        return layernorm.rms_norm_ref(x, weight, bias, residual=residual, eps=eps,
                                      prenorm=prenorm, upcast=True)

    def layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False,
                      residual_in_fp32=False, is_rms_norm=False):
        ref = layernorm.rms_norm_ref if is_rms_norm else layernorm.layer_norm_ref
        return ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)

    layernorm.rms_norm_fn, layernorm.layer_norm_fn = rms_norm_fn, layer_norm_fn
    _stub("mamba_ssm")
    _stub("mamba_ssm.ops")
    _stub("mamba_ssm.ops.selective_scan_interface", selective_scan_fn=scan.selective_scan_ref,
          selective_scan_ref=scan.selective_scan_ref)


#################################################################################
#                                 Shared                                         #
#################################################################################


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Every trained parameter moved off its initialisation (adaLN and the final layer start at
    zero), so every tensor of the checkpoint changes the output. Frozen tables stay as built."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def trained(model: torch.nn.Module, step: bool, x: torch.Tensor, t: torch.Tensor, cond
            ) -> tuple[torch.optim.Optimizer, torch.nn.Module]:
    """(optimizer, EMA) of a model made to look trained: the optimizer as both scripts build it
    (AdamW, lr 1e-4, no weight decay), after one step when `step` (its state then holds two
    tensors per parameter, as any trained checkpoint's does; the other fixtures skip it to stay
    small); model and EMA perturbed differently. Both are left in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    if step:
        model(x.clone(), t, cond).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    perturb(model, SEED + 2)
    ema = copy.deepcopy(model)
    perturb(ema, SEED + 3)
    model.eval()
    return opt, ema.eval()


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("omegaconf", "hydra", "timm", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def record(out: Path, name: str, entry: dict) -> None:
    """Add one fixture's description to MANIFEST.json (the tests read it)."""
    manifest_path = out / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[name] = {**entry, "writer": versions()}
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


#################################################################################
#                     The USM authors' release (argparse args)                   #
#################################################################################

# Their README's training command, with each case's flags; the size is tiny (their registry has
# nothing that small, so --model names a registry entry and the model is built at the tiny size
# with the same keyword arguments their train.py passes).
USM_README = ["--model", "USM-S/1", "--data-path", "data", "--batch_size", "8", "--num-classes",
              "0", "--results_dir", "results", "--sample-every", "20000", "--ckpt-every", "10000",
              "--use_ckpt", "--sampling", "log"]
SMALL = dict(depth=7, hidden_size=4, patch_size=1, input_size=8)  # stages 1-1-1
USM_CASES = {  # flags, size, whether the optimizer has stepped (its state then holds tensors)
    "usm_readme": (["--learn_pos_emb", "--use_convtranspose", "--skip_conn"],
                   dict(SMALL, depth=13, input_size=16), False),  # stages 2-2-2, all 8 paths
    "usm_fixed_pe_skip_gate": (["--use_convtranspose", "--skip_conn", "--skip_gate"], SMALL,
                               False),
    "usm_classes_no_skips": (["--learn_pos_emb", "--use_convtranspose", "--num-classes", "3"],
                             SMALL, False),
    # Width 2: the cross-attention has 8 heads of 64 at any width (4 x 512 x width per block).
    "usm_text": (["--learn_pos_emb", "--use_convtranspose", "--skip_conn", "--has_text"],
                 dict(SMALL, hidden_size=2), False),
}
CONTEXT = (5, 12)  # text tokens, context width


def authors_args(usm_src: Path, argv: list[str]) -> argparse.Namespace:
    """Their train.py's own argument parser (its __main__ block) applied to argv."""
    source = (usm_src / "train.py").read_text()
    block = textwrap.dedent(source.split('if __name__ == "__main__":', 1)[1])
    from models import USM_models

    captured = {}
    sys.argv = ["train.py", *argv]
    exec(block, {"argparse": argparse, "USM_models": USM_models,
                 "main": lambda args: captured.setdefault("args", args)})
    return captured["args"]


def write_usm(usm_src: Path, out: Path) -> None:
    sys.path.insert(0, str(usm_src))
    from models import USM

    for name, (flags, size, step) in USM_CASES.items():
        args = authors_args(usm_src, [*USM_README, *flags])
        torch.manual_seed(SEED)
        kwargs = dict(num_classes=args.num_classes, learn_sigma=False, use_checkpoint=False,
                      learn_pos_emb=args.learn_pos_emb, use_convtranspose=args.use_convtranspose,
                      has_text=args.has_text, skip_gate=args.skip_gate, skip_conn=args.skip_conn)
        if args.has_text:
            kwargs["d_context"] = CONTEXT[1]
        model = USM(**size, **kwargs)
        gen = torch.Generator().manual_seed(SEED + 1)
        side = size["input_size"]
        x = torch.randn(BATCH, 4, side, side, generator=gen)
        t = torch.tensor([37.5, 812.25])  # their 1..1000 time (training t = 1 + 999 sigmoid(n))
        inputs = {"x": x, "t": t}
        if args.has_text:
            inputs["context"] = torch.randn(BATCH, *CONTEXT, generator=gen)
        elif args.num_classes:
            inputs["y"] = torch.tensor([2, 0])
        cond = inputs.get("context", inputs.get("y"))
        opt, ema = trained(model, step, x, t, cond)
        with torch.no_grad():
            outputs = {"ema_out": ema(x.clone(), t, cond), "model_out": model(x.clone(), t, cond)}
        # train.py: accelerator.save({...}) of best_<step>.pt and checkpoints/last.pt
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "args": args}, out / f"{name}.pt")
        torch.save({**inputs, **outputs}, out / f"{name}.expected.pt")
        record(out, name, {"source": "usm-authors", "time": "1..1000", "argv": flags,
                           "size": size, "optimizer_stepped": step,
                           "saved_as": "train.py accelerator.save"})


#################################################################################
#                      CompVis' Zigma (Hydra / OmegaConf args)                   #
#################################################################################

# CompVis' README training command (train_acc.py overrides) at a tiny size, per case.
COMPVIS_README = ["model=zigzag8_b1_pe2", "use_latent=1", "data=churches256", "ckpt_every=10_000",
                  "data.sample_fid_n=5_000", "data.sample_fid_bs=4",
                  "data.sample_fid_every=10_000", "data.batch_size=8", "note=_", "use_wandb=false",
                  "model.params.embed_dim=4", "model.params.depth=8", "model.params.img_dim=8"]
COMPVIS_CASES = {  # overrides, world size (2: DistributedDataParallel's `module.` keys), step
    "pe2": ([], 2, False),  # 8 layers: all 8 paths
    "pe1_single_gpu": (["model.params.use_pe=1", "model.params.depth=2"], 1, False),
    "pe0_single_gpu": (["model.params.use_pe=0", "model.params.depth=1"], 1, False),
    "classes": (["+model.params.num_classes=3", "model.params.depth=2"], 2, True),
    "text": (["data=coco", "model.params.depth=1", "+model.params.has_text=true",
              f"+model.params.d_context={CONTEXT[1]}"], 1, False),
}


def _ddp(model: torch.nn.Module, store: Path) -> torch.nn.Module:
    """Wrap as train_acc.py's accelerator.prepare does on several GPUs (here: gloo, 1 process)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return torch.nn.parallel.DistributedDataParallel(model)


def write_compvis(zigma_src: Path, out: Path, case: str) -> None:
    import hydra
    import omegaconf

    sys.path.insert(0, str(zigma_src))
    overrides, world, step = COMPVIS_CASES[case]
    name = f"zigma_{case}_omegaconf{omegaconf.__version__}"
    work = Path(tempfile.mkdtemp())
    plain = {}

    def train(args):  # what train_acc.py's main does up to its first torch.save, on a CPU
        import importlib

        module, cls = args.model.target.rsplit(".", 1)
        torch.manual_seed(SEED)
        model = getattr(importlib.import_module(module), cls)(**args.model.params, device="cpu")
        side = args.model.params.img_dim
        gen = torch.Generator().manual_seed(SEED + 1)
        x = torch.randn(BATCH, 4, side, side, generator=gen)
        t = torch.tensor([0.0375, 0.81225])  # their t in [0, 1] (scaled by 1000 inside)
        inputs = {"x": x, "t": t}
        if args.model.params.get("has_text"):
            inputs["context"] = torch.randn(BATCH, *CONTEXT, generator=gen)
        elif args.model.params.get("num_classes", -1) > 0:
            inputs["y"] = torch.tensor([2, 0])
        cond = inputs.get("context", inputs.get("y"))
        opt, ema = trained(model, step, x, t, cond)
        with torch.no_grad():
            outputs = {"ema_out": ema(x, t, cond), "model_out": model(x, t, cond)}
        if world > 1:
            model, ema = _ddp(model, work / "store"), _ddp(ema, work / "store_ema")
        checkpoint = {"model": model.state_dict(), "ema": ema.state_dict(),
                      "opt": opt.state_dict(), "args": args, "train_steps": 10_000,
                      "best_fid": 666}
        torch.save(checkpoint, out / f"{name}.pt")  # train_acc.py: f"{train_steps:07d}.pt"
        plain.update(omegaconf.OmegaConf.to_container(args))  # what the tests must read
        torch.save({**inputs, **outputs}, out / f"{name}.expected.pt")

    # hydra.main as train_acc.py declares it (version_base exists from Hydra 1.2 on); it resolves
    # hydra.run.dir (${now:...}) as a real run does, below a temporary working directory.
    main_kwargs = dict(config_path=str(zigma_src / "config"), config_name="default")
    if "version_base" in inspect.signature(hydra.main).parameters:
        main_kwargs["version_base"] = None
    sys.argv = ["train_acc.py", *COMPVIS_README, *overrides]
    cwd = os.getcwd()
    os.chdir(work)
    try:
        hydra.main(**main_kwargs)(train)()
    finally:
        os.chdir(cwd)
    record(out, name, {"source": "zigma-compvis", "time": "0..1", "overrides": overrides,
                       "module_prefix": world > 1, "optimizer_stepped": step,
                       "saved_as": "train_acc.py torch.save", "args_plain": plain})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["usm", "compvis"])
    p.add_argument("--usm-src", type=Path)
    p.add_argument("--zigma-src", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--case", choices=sorted(COMPVIS_CASES))
    a = p.parse_args()
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    install_reference_kernels(a.zigma_src.resolve())
    if a.what == "usm":
        write_usm(a.usm_src.resolve(), a.out)
    else:
        write_compvis(a.zigma_src.resolve(), a.out, a.case)


if __name__ == "__main__":
    main()
