import json
import math
from unittest.mock import patch

import pytest
import torch
import torch.nn as nn

import benchmarks.benchmark as bench
from benchmarks.flops import (
    COMPONENTS,
    count_components,
    count_flops,
    counted_selective_scan,
    fvcore_components,
)
from models import SS2D, All_models


def mamba_linear_flops(tokens: int, dim: int, d_state: int = 16) -> int:
    """Hand count of one Mamba mixer's Linear layers: in_proj, x_proj, dt_proj, out_proj."""
    d_inner, dt_rank = 2 * dim, math.ceil(dim / 16)
    macs = dim * 2 * d_inner + d_inner * (dt_rank + 2 * d_state) + dt_rank * d_inner
    return 2 * tokens * (macs + d_inner * dim)


def scan_flops(tokens: int, dim: int, d_state: int = 16) -> int:
    return 9 * tokens * 2 * dim * d_state + tokens * 2 * dim  # Mamba's count, D term included


def test_ss2d_flops_match_the_hand_formula_and_counting_keeps_the_output() -> None:
    torch.manual_seed(0)
    dim, (h, w), batch = 16, (4, 6), 2
    ss2d = SS2D(dim, (h, w), path=3)
    x = torch.randn(batch, h * w, dim)
    kinds = count_flops(ss2d, x)
    tokens = batch * h * w
    assert kinds["linear"] == mamba_linear_flops(tokens, dim)
    assert kinds["conv"] == 2 * tokens * 2 * dim * 9  # depthwise 3x3 over Di channels
    assert kinds["scan"] == scan_flops(tokens, dim)
    assert kinds["total"] == kinds["linear"] + kinds["conv"] + kinds["scan"]
    with patch("models.selective_scan", counted_selective_scan):
        counted = ss2d(x)
    torch.testing.assert_close(counted, ss2d(x))  # the custom op runs the real scan


@pytest.mark.parametrize("name", ["USM-T/1", "Zigma-T/1"])
def test_model_flops_on_meta_match_the_analytic_count(name: str) -> None:
    dim, size, out = 64, 16, 4
    with torch.device("meta"):
        model = All_models[name](input_size=size, in_channels=out)
        kinds = count_flops(model, torch.randn(1, out, size, size), torch.rand(1))
    if name.startswith("USM"):  # tokens / 4 after each stage, the middle block at the bottom
        enc = [(size >> i) ** 2 for i, n in enumerate(model.stages) for _ in range(n)]
        blocks, skips = enc + [(size >> len(model.stages)) ** 2] + enc[::-1], enc
    else:  # every layer at full resolution
        blocks, skips = [size**2] * len(model.blocks), []
    per_image = 2 * (256 * dim + dim * dim)  # t-embedder MLP
    if name.startswith("USM"):  # USM's final layer is modulated; Zigma's has no adaLN
        per_image += 2 * dim * 2 * dim
    per_image += 2 * len(blocks) * 3 * dim * dim  # adaLN-Zero of every block
    linear = sum(mamba_linear_flops(n, dim) for n in blocks) + per_image
    linear += sum(2 * n * 2 * dim * dim for n in skips) + 2 * 256 * dim * out  # final Linear
    assert kinds["linear"] == linear
    assert kinds["scan"] == sum(scan_flops(n, dim) for n in blocks)
    assert "attention" not in kinds


def test_fvcore_counts_half_our_flops_for_linear_and_conv_layers() -> None:
    # The stated convention: fvcore counts a multiply-add as 1, ours as 2; nothing else differs
    # for Linear, (depthwise, strided, transposed) convolutions and matmuls.
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Conv2d(8, 8, 2, stride=2), nn.ConvTranspose2d(8, 8, 2, stride=2),
                          nn.Flatten(2), nn.Linear(36, 5))
    x = torch.randn(2, 4, 8, 8)
    ours, fvcore = count_components(model, x), fvcore_components(model, x)
    assert sum(ours.values()) == count_flops(model, x)["total"] > 0
    assert ours == {c: 2 * n for c, n in fvcore.items()}


@pytest.mark.parametrize("name", ["USM-T/1", "Zigma-T/1"])
def test_components_cover_the_model_and_differ_from_fvcore_only_where_stated(name: str) -> None:
    torch.manual_seed(0)
    model = All_models[name](input_size=16, in_channels=4, context_dim=32)
    x, t, context = torch.randn(1, 4, 16, 16), torch.rand(1), torch.randn(1, 5, 32)
    ours = count_components(model, x, t, context=context)
    fvcore = fvcore_components(model, x, t, None, context)
    assert sum(ours.values()) == count_flops(model, x, t, context=context)["total"]
    assert ours["other"] == fvcore["other"] == 0  # every op placed in a named component
    explained = {"scan", "norms", "cross-attention"}  # bench.DIFFERENCES
    assert set(bench.DIFFERENCES) == explained
    for c in set(COMPONENTS) - explained:
        assert ours[c] == 2 * fvcore[c], c
    assert ours["scan"] > 0 and fvcore["scan"] == 0  # opaque to the trace
    assert ours["cross-attention"] > 2 * fvcore["cross-attention"] > 0  # fvcore: no SDPA
    assert ours["norms"] == 0
    assert fvcore["norms"] > 0  # the LayerNorms (of the final layer at least)
    unet = name.startswith("USM")
    assert (ours["skip linears"] > 0) == unet and (ours["down/up samplers"] > 0) == unet
    assert min(ours[c] for c in ("patch embed", "conditioning", "mixer in_proj",
                                 "mixer x/dt/out proj", "mixer conv", "final layer")) > 0


def test_memory_split_is_what_adamw_training_holds() -> None:
    """The parameters' share of the peak, against the tensors a float32 AdamW step really holds:
    the weights, their gradients and the optimizer's state (its step counters aside)."""
    model = nn.Sequential(nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 8))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).square().sum().backward()
    optimizer.step()

    def mib(tensors) -> float:
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    params = sum(p.numel() for p in model.parameters())
    split = bench.memory_split(params=params, peak_mib=10.0)
    assert split["weights_mb"] == mib(model.parameters())
    assert split["gradients_mb"] == mib(p.grad for p in model.parameters())
    assert split["adamw_mb"] == mib(state)
    assert split["activations_mb"] == pytest.approx(10.0 - 2 * mib(model.parameters()) - mib(state))


def test_claim_figures_read_both_ways() -> None:
    def figure(kind: str, ours: float | None) -> str:
        return bench.claim_figure({"kind": kind, "ours": ours})

    assert figure("faster", 1.78) == "78% faster (44% less time)"
    assert figure("faster", 0.8) == "25% slower"
    assert figure("less", 0.7) == "30% less" and figure("less", 1.12) == "12% more"
    assert figure("ratio", 0.523) == "0.52" and figure("less", None) == "–"


def test_training_plan_takes_the_largest_batch_that_fits(monkeypatch) -> None:
    args = bench.parse_args(["--models", "USM-T/1,Zigma-T/1", "--full", "--device", "cpu"])
    per_token = 1e6  # bytes of activations per image-token: parameters are negligible beside
    monkeypatch.setattr(bench, "activation_bytes_per_token", lambda *a: per_token)
    fixed = max(16 * bench.n_params(m, 32, True) for m in args.models)

    def plan(extra_tokens: float) -> list[tuple[int, int, bool]]:
        monkeypatch.setattr(bench, "available_bytes",
                            lambda device: (fixed + per_token * extra_tokens) / 0.8)
        return [(r["size"], r["batch"], r["checkpoint"]) for r in bench.plan_training(args, {})]

    assert plan(9 * 1024) == [(32, 8, False), (32, 8, True)]  # the authors' batch
    assert plan(3.5 * 1024) == [(32, 3, False), (32, 3, True)]
    assert plan(0.9 * 1024) == [(16, 3, False), (16, 3, True)]  # not even 1 image at 32x32
    cheap = bench.parse_args(["--models", "USM-T/1,Zigma-T/1", "--device", "cpu"])
    assert [(r["size"], r["batch"]) for r in bench.plan_training(cheap, {})] == [(16, 1)] * 2


@pytest.mark.slow
def test_benchmark_runs_end_to_end_on_tiny_models(tmp_path, monkeypatch) -> None:
    # Measured in this process rather than in fresh ones: fast, and memory is tested below.
    monkeypatch.setattr(bench, "isolated", lambda fn, **kwargs: fn(**kwargs))
    out = tmp_path / "cpu"
    bench.main(["--models", "USM-T/1,Zigma-T/1", "--sizes", "8,16", "--quick", "--full",
                "--train-size", "16", "--train-batch", "2", "--device", "cpu",
                "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(r["model"], r["text"]) for r in result["main"]] == [
        ("USM-T/1", False), ("Zigma-T/1", False), ("USM-T/1", True), ("Zigma-T/1", True)]
    for row in result["main"]:
        assert row["sample_ms"] > 0 and row["sample_batch_img_s"] > 0 and row["gflops"] > 0
    # One training row per regime (with and without checkpointing), text setting and model.
    assert [(r["checkpoint"], r["text"], r["model"]) for r in result["training"]] == [
        (c, text, m) for c in (False, True) for text in (False, True)
        for m in ("USM-T/1", "Zigma-T/1")]
    for row in result["training"]:
        assert (row["size"], row["batch"]) == (16, 2) and row["train_img_s"] > 0
        with torch.device("meta"):  # the parameters' share: float32 weights of this model
            model = All_models[row["model"]](input_size=16, in_channels=4, learn_pos_emb=True,
                                             context_dim=768 if row["text"] else None)
        params = sum(p.numel() for p in model.parameters())
        assert row["weights_mb"] == pytest.approx(4 * params / 2**20)
    claims = [(r["claim"], r["regime"]) for r in result["ratios"]]
    for ckpt in ("with", "without"):
        for text in ("no", "77x768"):
            assert ("less memory", f"training, 16x16 latents, batch 2, {ckpt} checkpointing, "
                    f"text {text}") in claims
    assert sum(c == "one third of the GFLOPs" for c, _ in claims) == 6  # 3 conventions x text
    # In one process the memory high-water mark is reached once, so only the speed and FLOP
    # figures exist here (memory: the isolated test below).
    assert all(r["ours"] is not None for r in result["ratios"] if r["kind"] != "less")
    # The FLOP rows count the models docs/benchmark.md names (256 px: 32x32x4 latents, learned
    # positional embedding), built and counted here independently of the benchmark's plumbing.
    counted = {}
    for name in ("USM-T/1", "Zigma-T/1"):
        with torch.device("meta"):
            model = All_models[name](input_size=32, in_channels=4, learn_pos_emb=True)
            counted[name] = count_flops(model, torch.randn(1, 4, 32, 32), torch.rand(1))["total"]
    usm, zigma = result["main"][:2]
    assert usm["gflops"] == pytest.approx(counted["USM-T/1"] / 1e9)
    assert zigma["gflops"] == pytest.approx(counted["Zigma-T/1"] / 1e9)
    assert result["ratios"][0]["ours"] == pytest.approx(counted["USM-T/1"] / counted["Zigma-T/1"])
    scaling = {(r["model"], r["tokens"]): r for r in result["scaling"]}
    assert set(scaling) == {(m, n) for m in ("USM-T/1", "Zigma-T/1", "DiT-T/1")
                            for n in (64, 256)}
    # 4x the tokens: about 4x the FLOPs for the scans (exactly 4x for Zigma's flat stack).
    assert scaling["Zigma-T/1", 256]["gflops"] == pytest.approx(
        4 * scaling["Zigma-T/1", 64]["gflops"], rel=0.01)
    assert all("sample_ms" in r and "train_mb" in r for r in result["scaling"])
    markdown = out.with_suffix(".md").read_text()
    assert "| USM-T/1 | no |" in markdown and "python -m benchmarks.benchmark" in markdown
    assert "| Zigma-T/1 | 77x768 | 16x16 latents, batch 2, with checkpointing |" in markdown
    flops_md = (tmp_path / "flops.md").read_text()
    assert "| scan |" in flops_md and "fvcore, fused hidden" in flops_md
    assert (tmp_path / "scaling_cpu.png").stat().st_size > 0


@pytest.mark.slow
def test_isolated_measurement_sees_weights_gradients_and_adam_states() -> None:
    with torch.device("meta"):
        n_params = sum(p.numel() for p in All_models["USM-S/1"](input_size=8).parameters())
    weights_mib = 4 * n_params / 2**20
    common = {"name": "USM-S/1", "size": 8, "text": False, "device": "cpu", "threads": 1,
              "warmup": 0, "repeats": 1}
    sampled = bench.isolated(bench.measure_sampling, batch=2, **common)
    assert sampled["sample_mb"] > 0.9 * weights_mib
    trained = bench.isolated(bench.measure_training, batch=1, checkpoint=True, **common)
    # Training also holds gradients and AdamW's two moments: at least 4x the weights.
    assert trained["train_mb"] > 3.9 * weights_mib
