"""Checkpoints of the USM authors' release and of CompVis/zigma load strictly and exactly.

The foreign checkpoints are written here from the key names and shapes their code uses
(docs/upstream.md#usm-checkpoints, CompVis' model_zigma.py): a model of ours with random weights
is renamed into the foreign layout, saved as that code saves it, loaded back with `load_model`,
and must compute exactly what it computed before.
"""

import argparse
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import sample
from loader import CheckpointError, load_checkpoint, load_model
from models import USM, Zigma
from tests.fixtures import save_tiny_vae

ROOT = __file__.rsplit("/tests/", 1)[0]


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and stored table non-trivial, so every tensor matters to the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.05 * torch.randn_like(value))
    return model.eval()


#################################################################################
#                    Our models written in the foreign layouts                   #
#################################################################################

USM_BLOCK = {  # ours -> the authors' names inside a block
    "mixer.in_proj.weight": "attn.self_attention.in_proj.weight",
    "mixer.conv2d.weight": "attn.self_attention.conv2d.weight",
    "mixer.conv2d.bias": "attn.self_attention.conv2d.bias",
    "mixer.ssm.A_log": "attn.self_attention.A_logs",
    "mixer.ssm.D": "attn.self_attention.Ds",
    "mixer.out_norm.weight": "attn.self_attention.out_norm.weight",
    "mixer.out_norm.bias": "attn.self_attention.out_norm.bias",
    "mixer.out_proj.weight": "attn.self_attention.out_proj.weight",
    "skip_scale": "attn.skip_scale",
    "adaLN_modulation.1.weight": "adaLN_modulation.1.weight",
    "adaLN_modulation.1.bias": "adaLN_modulation.1.bias",
    "skip_linear.weight": "skip.weight",
    "skip_linear.bias": "skip.bias",
    "cross_attn.to_q.weight": "mca.to_q.weight",
    "cross_attn.to_out.weight": "mca.to_out.0.weight",
    "cross_attn.to_out.bias": "mca.to_out.0.bias",
}
STACKED = {  # the authors keep one scan direction stacked in a leading dimension of 1
    "mixer.ssm.x_proj.weight": "attn.self_attention.x_proj_weight",
    "mixer.ssm.dt_proj.weight": "attn.self_attention.dt_projs_weight",
    "mixer.ssm.dt_proj.bias": "attn.self_attention.dt_projs_bias",
}


def block_in_authors_layout(ours: dict, src: str, dst: str, out: dict) -> None:
    for name, theirs in USM_BLOCK.items():
        if f"{src}.{name}" in ours:
            out[f"{dst}.{theirs}"] = ours[f"{src}.{name}"]
    for name, theirs in STACKED.items():
        out[f"{dst}.{theirs}"] = ours[f"{src}.{name}"][None]
    if f"{src}.cross_attn.to_kv.weight" in ours:
        k, v = ours[f"{src}.cross_attn.to_kv.weight"].chunk(2)
        out[f"{dst}.mca.to_k.weight"], out[f"{dst}.mca.to_v.weight"] = k, v
    dim = ours[f"{src}.skip_scale"].numel()
    out[f"{dst}.attn.ln_1.weight"], out[f"{dst}.attn.ln_1.bias"] = torch.ones(dim), torch.zeros(dim)


def usm_in_authors_layout(model: USM) -> dict[str, torch.Tensor]:
    """The state dict the authors' USM (models.py, mamba_arch.py) holds for these weights: flat
    enc_blocks / dec_blocks lists with the samplers in them, SS2D under attn.self_attention."""
    ours, out = model.state_dict(), {}
    index = 0
    for s, n in enumerate(model.stages):
        for j in range(n):
            block_in_authors_layout(ours, f"enc_blocks.{s}.{j}", f"enc_blocks.{index}", out)
            index += 1
        out[f"enc_blocks.{index}.weight"] = ours[f"downs.{s}.weight"]
        out[f"enc_blocks.{index}.bias"] = ours[f"downs.{s}.bias"]
        index += 1
    block_in_authors_layout(ours, "mid_block", "middle_block", out)
    index = 0
    for s, n in enumerate(model.stages[::-1]):
        out[f"dec_blocks.{index}.weight"] = ours[f"ups.{s}.weight"]
        out[f"dec_blocks.{index}.bias"] = ours[f"ups.{s}.bias"]
        index += 1
        for j in range(n):
            block_in_authors_layout(ours, f"dec_blocks.{s}.{j}", f"dec_blocks.{index}", out)
            index += 1
    top = {"pos_embed": "pos_embed", "x_embedder.proj.weight": "x_embedder.proj.weight",
           "x_embedder.proj.bias": "x_embedder.proj.bias",
           "final_layer.linear.weight": "final_layer.linear.weight",
           "final_layer.linear.bias": "final_layer.linear.bias",
           "final_layer.adaLN_modulation.1.weight": "final_layer.adaLN_modulation.1.weight",
           "final_layer.adaLN_modulation.1.bias": "final_layer.adaLN_modulation.1.bias",
           "cond.context_proj.weight": "y_embedder.weight",
           "cond.context_proj.bias": "y_embedder.bias",
           "cond.y_embedder.weight": "y_embedder.embedding_table.weight"}
    top.update({f"cond.t_embedder.mlp.{i}.{p}": f"t_embedder.mlp.{i}.{p}"
                for i in (0, 2) for p in ("weight", "bias")})
    out.update({theirs: ours[name] for name, theirs in top.items() if name in ours})
    if model.cond.context_proj is None and model.cond.y_embedder is None:
        width = ours["x_embedder.proj.weight"].shape[0]  # their unused unconditional Linear
        out["y_embedder.weight"] = torch.randn(width, 768)
        out["y_embedder.bias"] = torch.zeros(width)
    return out


def zigma_in_compvis_layout(model: Zigma, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """The state dict of CompVis' ZigMa (model_zigma.py, Mamba mixers) for these weights."""
    ours, out = model.state_dict(), {}
    renames = {".mixer.ssm.x_proj.": ".mixer.x_proj.", ".mixer.ssm.dt_proj.": ".mixer.dt_proj.",
               ".mixer.ssm.A_log": ".mixer.A_log", ".mixer.ssm.D": ".mixer.D",
               ".cross_attn.to_q.": ".msa.to_q.", ".cross_attn.to_out.": ".msa.to_out.0.",
               "cond.t_embedder.": "t_embedder.", "cond.context_proj.": "y_embedder.",
               "cond.y_embedder.weight": "y_embedder.embedding_table.weight"}
    for name, value in ours.items():
        if name.endswith("cross_attn.to_kv.weight"):
            stem = name.removesuffix("cross_attn.to_kv.weight")
            out[f"{stem}msa.to_k.weight"], out[f"{stem}msa.to_v.weight"] = value.chunk(2)
            continue
        for a, b in renames.items():
            name = name.replace(a, b)
        out[name] = value
    return {prefix + k: v for k, v in out.items()}


def save_authors_pt(path, state: dict, **args) -> None:
    namespace = argparse.Namespace(model="USM-B/1", vae="ema", **args)
    torch.save({"model": state, "ema": state, "opt": {}, "args": namespace}, path)


def save_compvis_pt(path, state: dict, **params) -> None:
    args = OmegaConf.create({"vae": "ema", "model": {"name": "zigzag8_b1_pe2", "params": {
        "scan_type": "zigzagN8", **params}}})
    torch.save({"model": state, "ema": state, "opt": {}, "args": args, "train_steps": 10,
                "best_fid": 30.0}, path)


def outputs(model: torch.nn.Module, **kwargs) -> torch.Tensor:
    torch.manual_seed(1)
    h, w = model.input_size
    x, t = torch.randn(2, model.in_channels, h, w), torch.rand(2)
    with torch.no_grad():
        return model(x, t, **kwargs)


#################################################################################
#                                   Tests                                        #
#################################################################################

USM_CASES = {
    "readme-flags": dict(learn_pos_emb=True),
    "fixed-table-skip-gate": dict(skip_gate=True),
    "classes-no-skips": dict(num_classes=3, skip_conn=False, learn_pos_emb=True),
    "text": dict(context_dim=12, learn_pos_emb=True),
}


@pytest.mark.parametrize("case", sorted(USM_CASES))
def test_authors_usm_pt_loads_exactly(tmp_path, case: str) -> None:
    kwargs = USM_CASES[case]
    ours = randomise(USM(input_size=16, in_channels=3, hidden_size=32, stages=(2, 1, 2),
                         **kwargs))
    save_authors_pt(tmp_path / "best_0001000.pt", usm_in_authors_layout(ours),
                    learn_pos_emb=kwargs.get("learn_pos_emb", False), skip_conn=True)
    loaded = load_model(tmp_path / "best_0001000.pt")
    cond = {"y": torch.tensor([0, 2])} if "num_classes" in kwargs else {}
    if "context_dim" in kwargs:
        cond = {"context": torch.randn(2, 5, 12)}
    assert torch.equal(outputs(loaded, **cond), outputs(ours, **cond))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.stages == (2, 1, 2) and loaded.skip_conn == kwargs.get("skip_conn", True)
    assert loaded.num_classes == kwargs.get("num_classes", 0)
    if "learn_pos_emb" not in kwargs:  # the stored fixed table is used as stored
        assert torch.equal(loaded.pos_embed, ours.pos_embed)
        assert not isinstance(loaded.pos_embed, torch.nn.Parameter)


def test_authors_accelerate_folder_takes_the_ema_from_model_1(tmp_path) -> None:
    model = randomise(USM(input_size=8, in_channels=4, hidden_size=64, stages=(1, 1, 1),
                          learn_pos_emb=True), seed=0)
    ema = randomise(USM(input_size=8, in_channels=4, hidden_size=64, stages=(1, 1, 1),
                        learn_pos_emb=True), seed=1)
    save_file(usm_in_authors_layout(model), tmp_path / "model.safetensors")
    save_file(usm_in_authors_layout(ema), tmp_path / "model_1.safetensors")
    loaded = load_model(tmp_path)
    assert torch.equal(outputs(loaded), outputs(ema))
    assert torch.equal(outputs(load_model(tmp_path, weights="model")), outputs(model))
    meta, _ = load_checkpoint(tmp_path)
    assert meta["model"] == "USM-T/1" and meta["source"] == "usm-authors"  # a registry size


ZIGMA_CASES = {
    "pe2": (dict(learn_pos_emb=True), dict(use_pe=2)),
    "pe1-fixed": (dict(learn_pos_emb=False), dict(use_pe=1)),
    "text": (dict(learn_pos_emb=True, context_dim=12), dict(use_pe=2)),
    "classes": (dict(learn_pos_emb=True, num_classes=3), dict(use_pe=2)),
}


@pytest.mark.parametrize("case", sorted(ZIGMA_CASES))
def test_compvis_zigma_pt_loads_exactly(tmp_path, case: str) -> None:
    kwargs, params = ZIGMA_CASES[case]
    ours = randomise(Zigma(input_size=8, in_channels=4, hidden_size=32, depth=3, **kwargs))
    state = zigma_in_compvis_layout(ours)
    if "num_classes" in kwargs:  # CompVis trains classes without label dropout: no null row
        key = "module.y_embedder.embedding_table.weight"
        state[key] = state[key][:-1]
    save_compvis_pt(tmp_path / "0010000.pt", state, img_dim=8, **params)
    loaded = load_model(tmp_path / "0010000.pt")
    cond = {"y": torch.tensor([0, 2])} if "num_classes" in kwargs else {}
    if "context_dim" in kwargs:
        cond = {"context": torch.randn(2, 5, 12)}
    assert torch.equal(outputs(loaded, **cond), outputs(ours, **cond))
    learned = isinstance(loaded.pos_embed, torch.nn.Parameter)
    assert len(loaded.blocks) == 3 and learned == kwargs["learn_pos_emb"]
    assert loaded.num_classes == kwargs.get("num_classes", 0)
    meta, _ = load_checkpoint(tmp_path / "0010000.pt")
    assert meta["source"] == "zigma-compvis" and meta["step"] == 10


def test_compvis_without_positional_embedding(tmp_path) -> None:
    ours = randomise(Zigma(input_size=8, in_channels=4, hidden_size=32, depth=2))
    state = zigma_in_compvis_layout(ours, prefix="")  # a single-GPU run: no module. prefix
    del state["pos_embed"]
    save_compvis_pt(tmp_path / "0000100.pt", state, img_dim=8, use_pe=0)
    loaded = load_model(tmp_path / "0000100.pt")
    with torch.no_grad():
        ours.pos_embed.zero_()
    assert torch.equal(outputs(loaded), outputs(ours))


def test_load_is_strict(tmp_path) -> None:
    ours = randomise(USM(input_size=8, in_channels=4, hidden_size=32, stages=(1, 1)))
    state = usm_in_authors_layout(ours)
    save_authors_pt(tmp_path / "extra.pt", {**state, "enc_blocks.0.attn.extra": torch.ones(1)})
    with pytest.raises(CheckpointError, match="enc_blocks.0.attn.extra"):
        load_model(tmp_path / "extra.pt")
    state.pop("middle_block.attn.skip_scale")
    save_authors_pt(tmp_path / "missing.pt", state)
    with pytest.raises(RuntimeError, match="mid_block.skip_scale"):
        load_model(tmp_path / "missing.pt")


def test_unreadable_and_unbuildable_checkpoints_say_why(tmp_path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("not a pickle")
    with pytest.raises(CheckpointError, match="not a checkpoint this code reads"):
        load_model(tmp_path / "text.pt")
    state = usm_in_authors_layout(USM(input_size=8, in_channels=4, hidden_size=32, stages=(1,)))
    up = {k: v for k, v in state.items() if not k.startswith("dec_blocks.0.")}
    up["dec_blocks.0.0.weight"] = torch.zeros(128, 32, 3, 3)  # Conv2d + PixelShuffle up-sampler
    up["dec_blocks.0.0.bias"] = torch.zeros(128)
    save_authors_pt(tmp_path / "pixelshuffle.pt", up)
    with pytest.raises(CheckpointError, match="PixelShuffle"):
        load_model(tmp_path / "pixelshuffle.pt")


def test_convert_writes_a_checkpoint_of_ours(tmp_path) -> None:
    ours = randomise(Zigma(input_size=8, in_channels=4, hidden_size=64, depth=6))
    save_compvis_pt(tmp_path / "0000500.pt", zigma_in_compvis_layout(ours), img_dim=8, use_pe=2)
    subprocess.run([sys.executable, "-m", "loader", "convert", str(tmp_path / "0000500.pt"),
                    str(tmp_path / "ours.pt")], cwd=ROOT, check=True, capture_output=True)
    meta, _ = load_checkpoint(tmp_path / "ours.pt")
    assert meta["model"] == "Zigma-T/1" and meta["source"] == "ours"
    assert torch.equal(outputs(load_model(tmp_path / "ours.pt")), outputs(ours))


def test_sample_py_samples_an_authors_checkpoint_on_their_time_grid(tmp_path) -> None:
    # The authors' sampling command on their .pt: the architecture comes from the file, the
    # VAE is swapped for a tiny local one (the SD VAE is not downloaded in tests).
    ours = randomise(USM(input_size=8, in_channels=4, hidden_size=64, stages=(1, 1, 1),
                         learn_pos_emb=True))
    save_authors_pt(tmp_path / "best.pt", usm_in_authors_layout(ours), learn_pos_emb=True,
                    skip_conn=True, num_classes=0)
    authors = ["--model", "USM-T/1", "--batch_size", "2", "--num-classes", "0",
               "--learn_pos_emb", "--use_convtranspose", "--ckpt", str(tmp_path / "best.pt"),
               "--num_samples", "3", "--skip_conn", "--vae", str(save_tiny_vae(tmp_path / "vae")),
               "--num-sampling-steps", "2", "--sample-dir", str(tmp_path / "samples")]
    folder = sample.main(sample.parse_args(authors))
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png",
                                                           "000002.png"]
    assert (tmp_path / "samples.npz").is_file()
    with pytest.raises(SystemExit, match="--skip-gate: on here, off in the checkpoint"):
        sample.main(sample.parse_args([*authors, "--skip_gate"]))
    with pytest.raises(SystemExit, match="--has_text, but .* is not text-conditional"):
        sample.main(sample.parse_args([*authors, "--has_text"]))
    sampler, name = sample.create_sampler(sample.parse_args(authors), "rf", "usm-authors")
    assert sampler.t_min == 1e-3 and name == "euler2-authors-time"
