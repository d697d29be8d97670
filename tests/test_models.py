import math

import pytest
import torch
import torch.nn.functional as F

from models import USM, All_models, SelectiveSSM, USM_models, Zigma, Zigma_models, modulate
from zigzag import zigzag_path


def tiny_usm(**kwargs) -> USM:
    kwargs = {"input_size": 16, "in_channels": 2, "hidden_size": 32, "stages": (1, 1, 1), **kwargs}
    return USM(**kwargs)


def randomise_zero_init(model: torch.nn.Module) -> None:
    """Give the adaLN-Zero and final layers non-zero weights so outputs depend on every path."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name or "pos_embed" in name:
                p.normal_(std=0.05)


@pytest.mark.parametrize("name", sorted(All_models))
def test_registry_output_shapes(name: str) -> None:
    # Built and run on the meta device: shapes without allocating the big models (32: divisible
    # by every USM's patch x 2^stages).
    with torch.device("meta"):
        model = All_models[name](input_size=32, in_channels=4, num_classes=10, learn_sigma=True)
        out = model(torch.randn(2, 4, 32, 32), torch.rand(2), torch.tensor([0, 10]))
    assert out.shape == (2, 8, 32, 32)
    assert isinstance(model, USM if name in USM_models else Zigma)


# (blocks, width, encoder stages) of every registry name: the published sizes
# (docs/upstream.md#usm-architecture, #zigma-network) and docs/models.md's table.
SIZES = {"USM-XL": (57, 1152, (10, 9, 9)), "USM-L": (49, 1024, (8, 8, 8)),
         "USM-B": (25, 768, (4, 4, 4)), "USM-S": (13, 384, (2, 2, 2)), "USM-T": (7, 64, (1, 1, 1)),
         "Zigma-B": (24, 768, None), "Zigma-S": (12, 384, None), "Zigma-T": (6, 64, None)}


@pytest.mark.parametrize("name", sorted(All_models))
def test_registry_builds_the_published_sizes(name: str) -> None:
    with torch.device("meta"):
        model = All_models[name](input_size=32, in_channels=4)
    blocks, width, stages = SIZES[name.split("/")[0]]
    assert model.pos_embed.shape[-1] == width
    assert model.x_embedder.proj.kernel_size == (int(name.split("/")[1]),) * 2
    if stages is None:
        assert len(model.blocks) == blocks
    else:
        assert model.stages == stages and 2 * sum(stages) + 1 == blocks
        assert [len(s) for s in model.enc_blocks] == [len(s) for s in model.dec_blocks][::-1]
        assert [len(s) for s in model.enc_blocks] == [*stages]  # the decoder mirrors them
        assert len(model.downs) == len(model.ups) == 3


def test_usm_b_parameter_count_is_the_authors() -> None:
    # docs/upstream.md#parameter-counts: the authors' 170,571,268 less their unused ln_1
    # (25 x 1536) and unconditional y_embedder (768 x 768 + 768); README flags (--learn_pos_emb),
    # 32x32x4.
    with torch.device("meta"):
        model = USM_models["USM-B/1"](input_size=32, in_channels=4, learn_pos_emb=True)
    assert sum(p.numel() for p in model.parameters()) == 170_571_268 - 38_400 - 590_592
    assert sum(p.numel() for p in model.parameters()) == 169_942_276
    assert len(model.enc_blocks) == 3 and [len(s) for s in model.enc_blocks] == [4, 4, 4]
    assert 2 * sum(model.stages) + 1 == 25


def test_zigma_b_parameter_count_is_compvis() -> None:
    # CompVis ZigMa-B/1 (config zigzag8_b1_pe2: 24 layers, width 768, 32x32x4, learned PE).
    with torch.device("meta"):
        model = Zigma_models["Zigma-B/1"](input_size=32, in_channels=4, learn_pos_emb=True)
    assert sum(p.numel() for p in model.parameters()) == 134_624_260


def test_stage_token_counts_and_paths_per_block() -> None:
    with torch.device("meta"):
        model = USM_models["USM-B/1"](input_size=32, in_channels=4)
        tokens: list[int] = []
        blocks = [b for s in model.enc_blocks for b in s] + [model.mid_block]
        blocks += [b for s in model.dec_blocks for b in s]
        for blk in blocks:
            blk.register_forward_hook(lambda m, args, out: tokens.append(out.shape[1]))
        model(torch.randn(1, 4, 32, 32), torch.rand(1))
    assert tokens == [1024] * 4 + [256] * 4 + [64] * 4 + [16] + [64] * 4 + [256] * 4 + [1024] * 4
    for k, blk in enumerate(blocks):  # block k scans along the authors' zigzag path k mod 8
        grid = blk.mixer.grid
        assert torch.equal(blk.mixer.perm.cpu(), zigzag_path(*grid, k % 8, "usm"))
    with torch.device("meta"):
        zigma = Zigma_models["Zigma-T/1"](input_size=8, in_channels=4)
    for i, blk in enumerate(zigma.blocks):  # layer i: Zigma's path i mod 8
        assert torch.equal(blk.mixer.perm.cpu(), zigzag_path(8, 8, i % 8, "zigma"))


def test_usm_block_is_the_authors_formula() -> None:
    # x + gate * (skip_scale * h + SS2D(h)), h = modulate(LayerNorm(x))
    # (docs/upstream.md#usm-block).
    torch.manual_seed(0)
    model = tiny_usm()
    randomise_zero_init(model)
    blk = model.enc_blocks[0][0]
    with torch.no_grad():
        blk.skip_scale.normal_()
    x, c = torch.randn(2, 256, 32), torch.randn(2, 32)
    shift, scale, gate = blk.adaLN_modulation(c).chunk(3, dim=-1)
    h = modulate(F.layer_norm(x, (32,), eps=1e-6), shift, scale)
    expected = x + gate.unsqueeze(1) * (blk.skip_scale * h + blk.mixer(h))
    torch.testing.assert_close(blk(x, c), expected)


def test_zigma_is_mambas_residual_stream() -> None:
    # residual += x; h = RMSNorm(residual); x = h + gate * mixer(modulate(h)); then
    # RMSNorm_f(residual + x) and a final layer without adaLN (docs/upstream.md#zigma-network).
    torch.manual_seed(0)
    model = Zigma(input_size=4, in_channels=2, hidden_size=32, depth=3).eval()
    randomise_zero_init(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    x, t = torch.randn(2, 2, 4, 4), torch.rand(2)

    def rms(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    c = model.cond.t_embedder(t)
    h = model.x_embedder(x) + model.pos_embed
    residual = None
    for blk in model.blocks:
        residual = h if residual is None else residual + h
        n = rms(residual, blk.norm.weight)
        shift, scale, gate = blk.adaLN_modulation(c).chunk(3, dim=-1)
        h = n + gate.unsqueeze(1) * blk.mixer(modulate(n, shift, scale))
    out = model.final_layer.linear(F.layer_norm(rms(residual + h, model.norm_f.weight), (32,),
                                                eps=1e-6))
    torch.testing.assert_close(model(x, t), model._unpatchify(out))
    assert model.final_layer.adaLN_modulation is None


def test_authors_initialisation() -> None:
    torch.manual_seed(0)
    model = tiny_usm(num_classes=3, learn_pos_emb=True)
    ssm_linears = {id(m) for s in model.modules() if isinstance(s, SelectiveSSM)
                   for m in (s.x_proj, s.dt_proj)}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in ssm_linears:
            if "adaLN" in name or "final_layer" in name:
                assert not module.weight.any(), name  # adaLN-Zero, zero final layer
            elif "t_embedder" in name:
                assert abs(module.weight.std() - 0.02) < 0.005, name
            else:  # xavier-uniform
                bound = math.sqrt(6 / sum(module.weight.shape))
                assert module.weight.abs().max() <= bound and module.weight.abs().max() > bound / 2
            if module.bias is not None:
                assert not module.bias.any(), name
    assert not model.pos_embed.any()  # the learned embedding starts at zeros
    assert all(torch.equal(b.skip_scale, torch.ones(32)) for s in model.enc_blocks for b in s)
    ssm = model.mid_block.mixer.ssm
    dt = F.softplus(ssm.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 and ssm.dt_proj.bias.std() > 0  # Mamba's dt
    torch.testing.assert_close(ssm.A_log[0].exp(), torch.arange(1.0, 17.0))


def test_compvis_initialisation() -> None:
    torch.manual_seed(0)
    model = Zigma(input_size=8, in_channels=2, hidden_size=64, depth=4)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            assert module.bias.any() == name.endswith("dt_proj"), name
    bound = 1 / math.sqrt(128) / math.sqrt(4)  # kaiming-uniform(a=sqrt 5) / sqrt(depth)
    out_proj = model.blocks[0].mixer.out_proj.weight
    assert bound / 2 < out_proj.abs().max() <= bound
    assert model.final_layer.linear.weight.any()  # CompVis does not zero the final layer
    assert all(torch.equal(b.norm.weight, torch.ones(64)) for b in model.blocks)
    assert not model.pos_embed.any() and model.pos_embed.requires_grad
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0, 0, 0.1 / 3, 0.2 / 3]) and model.drop_path.drop_prob == 0.1


def train_steps(model: torch.nn.Module, inputs: tuple, steps: int) -> list[str]:
    """Run SGD steps; return the parameters the last backward pass left without gradient."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        (model(*inputs) - inputs[0]).pow(2).mean().backward()
        opt.step()
    return [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]


def test_output_is_zero_at_init_and_every_parameter_then_learns() -> None:
    torch.manual_seed(0)
    model = tiny_usm(num_classes=3, context_dim=8, learn_pos_emb=True, skip_gate=True)
    inputs = (torch.randn(4, 2, 16, 16), torch.rand(4), torch.tensor([0, 1, 2, 3]),
              torch.randn(4, 5, 8))
    assert torch.equal(model(*inputs), torch.zeros_like(inputs[0]))
    # Every parameter is in the graph from the start (DDP's unused-parameter check passes)...
    model(*inputs).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # ...and, once the zero-initialised gates have moved (adaLN-Zero needs two steps to open
    # the final layer and then the gates), every parameter gets a non-zero gradient.
    assert train_steps(model, inputs, 3) == []


@pytest.mark.parametrize("build", [lambda: tiny_usm(num_classes=2),
                                   lambda: Zigma(input_size=8, in_channels=2, hidden_size=32,
                                                 depth=2, num_classes=2)],
                         ids=["USM", "Zigma"])
def test_gradients_have_their_parameters_strides(build) -> None:
    # DDP copies each gradient into a bucket view with the parameter's strides, and warns at every
    # run when they differ (the depthwise conv's weight did: its gradient comes channels-last).
    model = build()
    x = torch.randn(2, 2, *model.input_size)
    model(x, torch.rand(2), torch.tensor([0, 1])).sum().backward()
    assert [(name, p.grad.stride(), p.stride()) for name, p in model.named_parameters()
            if p.grad.stride() != p.stride()] == []


def test_zigma_every_parameter_learns() -> None:
    torch.manual_seed(0)
    model = Zigma(input_size=8, in_channels=2, hidden_size=32, depth=3, num_classes=2)
    inputs = (torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([0, 2]))
    assert train_steps(model, inputs, 3) == []


def test_decoder_consumes_encoder_outputs_last_in_first_out() -> None:
    model = tiny_usm(stages=(2, 1, 2))
    randomise_zero_init(model)
    enc = [b for s in model.enc_blocks for b in s]
    dec = [b for s in model.dec_blocks for b in s]
    outputs, skips = {}, {}
    for i, blk in enumerate(enc):
        blk.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
    for j, blk in enumerate(dec):
        blk.register_forward_pre_hook(lambda m, args, j=j: skips.__setitem__(j, args[3]))
    model(torch.randn(2, 2, 16, 16), torch.rand(2))
    for j in range(len(dec)):
        assert skips[j] is outputs[len(enc) - 1 - j]


def test_skip_connections_can_be_turned_off() -> None:
    model = tiny_usm(skip_conn=False, use_convtranspose=False)
    assert not any("skip_linear" in n for n, _ in model.named_parameters())
    skips = []
    for blk in (b for s in model.dec_blocks for b in s):
        blk.register_forward_pre_hook(lambda m, args: skips.append(args[3]))
    model(torch.randn(1, 2, 16, 16), torch.rand(1))
    assert skips == [None] * 3  # every decoder block ran, none was given an encoder output


def test_skip_gate_drops_the_z_branch_except_in_the_middle_block() -> None:
    # The authors' --skip_gate reaches encoder and decoder blocks only (their middle block is
    # built without it).
    model = tiny_usm(skip_gate=True)
    assert model.enc_blocks[0][0].mixer.in_proj.out_features == 64  # C -> Di
    assert model.dec_blocks[0][0].mixer.in_proj.out_features == 64
    assert model.mid_block.mixer.in_proj.out_features == 128  # C -> 2 Di


def test_fixed_positional_table_is_mae_sincos_and_stored() -> None:
    # dim 4: channels (sin, cos) of the column, then of the row; frequency 1.
    table = USM(input_size=(1, 2), in_channels=2, hidden_size=4, stages=(), patch_size=1).pos_embed
    one = torch.tensor(1.0)
    torch.testing.assert_close(table[0], torch.tensor([[0, 1, 0, 1],
                                                        [one.sin(), one.cos(), 0, 1]]))
    assert "pos_embed" in tiny_usm().state_dict()  # a checkpoint's table is the one used


def test_non_square_input_and_divisibility_errors() -> None:
    model = tiny_usm(input_size=(8, 24), stages=(1, 1))
    assert model(torch.randn(2, 2, 8, 24), torch.rand(2)).shape == (2, 2, 8, 24)
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny_usm(input_size=20)
    with pytest.raises(ValueError, match="divisible by 16"):
        USM_models["USM-T/2"](input_size=24, in_channels=4)
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(2, 2, 16, 16), torch.rand(2))


def test_conditioning_is_required_and_used() -> None:
    model = tiny_usm(num_classes=4)
    randomise_zero_init(model)
    x, t = torch.randn(2, 2, 16, 16), torch.rand(2)
    with pytest.raises(ValueError, match="pass y"):
        model(x, t)
    assert not torch.allclose(model(x, t, torch.tensor([0, 1])), model(x, t, torch.tensor([2, 3])))
    y = torch.tensor([0, 1])
    assert not torch.allclose(model(x, t, y), model(x, t.flip(0), y))


def test_gradient_checkpointing_matches_plain_forward() -> None:
    model = tiny_usm(num_classes=2)
    randomise_zero_init(model)
    x, t, y = torch.randn(2, 2, 16, 16), torch.rand(2), torch.tensor([0, 1])
    grads = []
    for flag in (False, True):
        model.use_checkpoint = flag
        model.zero_grad()
        model(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_forward_with_cfg() -> None:
    model = tiny_usm(num_classes=3, learn_sigma=True)
    randomise_zero_init(model)
    x, t, y = torch.randn(2, 2, 16, 16), torch.rand(2), torch.tensor([0, 1])
    cond, uncond = model(x, t, y), model(x, t, torch.tensor([3, 3]))
    guided = model.forward_with_cfg(x, t, y, cfg_scale=3.0)
    torch.testing.assert_close(guided[:, :2], uncond[:, :2] + 3.0 * (cond[:, :2] - uncond[:, :2]))
    torch.testing.assert_close(guided[:, 2:], cond[:, 2:])  # learned sigma is not guided


def test_text_cross_attention_uses_the_context() -> None:
    model = tiny_usm(context_dim=6)
    randomise_zero_init(model)
    x, t, ctx = torch.randn(2, 2, 16, 16), torch.rand(2), torch.randn(2, 7, 6)
    out = model(x, t, context=ctx)
    assert not torch.allclose(out, model(x, t, context=torch.randn_like(ctx)))
    null = torch.zeros(1, 7, 6)
    guided = model.forward_with_cfg(x, t, context=ctx, cfg_scale=1.0, null_context=null)
    torch.testing.assert_close(guided, out)
