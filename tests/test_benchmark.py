import json
import math
from unittest.mock import patch

import pytest
import torch

import benchmarks.benchmark as bench
from benchmarks.flops import count_flops, counted_selective_scan
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
    per_image = 2 * (256 * dim + dim * dim + 2 * dim * dim)  # t-embedder MLP, final adaLN
    per_image += 2 * len(blocks) * 3 * dim * dim  # adaLN-Zero of every block
    linear = sum(mamba_linear_flops(n, dim) for n in blocks) + per_image
    linear += sum(2 * n * 2 * dim * dim for n in skips) + 2 * 256 * dim * out  # final Linear
    assert kinds["linear"] == linear
    assert kinds["scan"] == sum(scan_flops(n, dim) for n in blocks)
    assert "attention" not in kinds


def test_benchmark_runs_end_to_end_on_tiny_models(tmp_path, monkeypatch) -> None:
    # Measured in this process rather than in fresh ones: fast, and memory is tested below.
    monkeypatch.setattr(bench, "measure_isolated", bench.measure)
    out = tmp_path / "cpu"
    bench.main(["--models", "USM-T/1,Zigma-T/1", "--sizes", "8,16", "--quick", "--full",
                "--device", "cpu", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(r["model"], r["text"]) for r in result["main"]] == [
        ("USM-T/1", False), ("Zigma-T/1", False), ("USM-T/1", True), ("Zigma-T/1", True)]
    for row in result["main"]:
        assert row["sample_ms"] > 0 and row["train_img_s"] > 0 and row["gflops"] > 0
    usm, zigma = result["main"][:2]
    assert result["ratios"][0]["gflops"] == pytest.approx(usm["gflops"] / zigma["gflops"])
    assert result["ratios"][1]["train_img_s"] > 0  # --full: training with text is timed
    scaling = {(r["model"], r["tokens"]): r for r in result["scaling"]}
    assert set(scaling) == {(m, n) for m in ("USM-T/1", "Zigma-T/1", "DiT-T/1")
                            for n in (64, 256)}
    # 4x the tokens: about 4x the FLOPs for the scans (exactly 4x for Zigma's flat stack).
    assert scaling["Zigma-T/1", 256]["gflops"] == pytest.approx(
        4 * scaling["Zigma-T/1", 64]["gflops"], rel=0.01)
    assert all("sample_ms" in r for r in result["scaling"])
    markdown = out.with_suffix(".md").read_text()
    assert "| USM-T/1 | no |" in markdown and "python -m benchmarks.benchmark" in markdown
    assert (tmp_path / "scaling_cpu.png").stat().st_size > 0


def test_isolated_measurement_sees_weights_gradients_and_adam_states() -> None:
    with torch.device("meta"):
        n_params = sum(p.numel() for p in All_models["USM-S/1"](input_size=8).parameters())
    weights_mib = 4 * n_params / 2**20
    result = bench.measure_isolated(name="USM-S/1", size=8, text=False, train_batch=1,
                                    checkpoint=True, device="cpu", threads=1, warmup=0,
                                    repeats=1)
    assert result["sample_mb"] > 0.9 * weights_mib
    # Training also holds gradients and AdamW's two moments: at least 4x the weights.
    assert result["train_mb"] > 3.9 * weights_mib
