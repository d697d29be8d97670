"""train.py's options and promises, observed in what a run does (tiny models, 1-3 steps): gradient
clipping, bf16, --has-text, several processes, best/, Zigma's drop path, and that the loop applies
its EMA and learning-rate schedule. Helpers are checked by their effects on the saved checkpoints
or, where a run hides them, by hooks on what the optimizer and the model receive."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_file
from timm.layers import DropPath
from torch.optim.optimizer import register_optimizer_step_pre_hook

import sampling
import train
from encoders import load_text_encoder
from models import Zigma
from selective_scan import dispatch
from tests.deterministic_train import make_deterministic
from tests.fixtures import make_coco_folder, make_image_folder, save_tiny_clip
from tests.test_train import (
    LAUNCH_ENV,
    REPO,
    TINY,
    checkpoint_state,
    free_port,
    logged_losses,
    run,
)

SAVE_GRID = train.save_grid


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), per_class=5, size=8)


@pytest.fixture(autouse=True)
def no_sample_grids(monkeypatch):
    """The grid a run draws at its last step (25 sampler steps) would cost more than the tiny
    training; nothing here looks at it."""
    monkeypatch.setattr(train, "save_grid", lambda *args: None)


@pytest.fixture
def optimizer_gradients():
    """The gradients of every optimizer step, as the step sees them (a step pre-hook)."""
    seen: list[list[torch.Tensor]] = []

    def record(optimizer, args, kwargs):
        seen.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None])

    handle = register_optimizer_step_pre_hook(record)
    yield seen
    handle.remove()


def initial_weights(data: Path) -> dict[str, torch.Tensor]:
    """The weights train.main starts from: it seeds with --global-seed, then builds the model."""
    args = train.parse_args([*TINY, "--data-path", str(data)])
    set_seed(args.global_seed)
    model, _ = sampling.build_model(args, 3, args.image_size, None)
    return model.state_dict()


def test_grad_clip_scales_the_gradient_to_the_norm_before_the_step(images, tmp_path,
                                                                   optimizer_gradients):
    run(images, tmp_path / "free", "--max-steps", "1")
    run(images, tmp_path / "clipped", "--max-steps", "1", "--grad-clip", "0.01")
    run(images, tmp_path / "loose", "--max-steps", "1", "--grad-clip", "1e6")
    free, clipped, loose = optimizer_gradients
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in free]))
    assert norm > 0.02  # so that a clip at 0.01 must act
    # By hand: every gradient times max_norm / total norm ...
    for g, c in zip(free, clipped, strict=True):
        torch.testing.assert_close(c, g * 0.01 / norm)
    # ... which is what torch.nn.utils.clip_grad_norm_ does to the unclipped gradients.
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in free]
    for p, g in zip(params, free, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.01)
    for p, c in zip(params, clipped, strict=True):
        torch.testing.assert_close(c, p.grad)
    for g, c in zip(free, loose, strict=True):  # a norm above the gradient's changes nothing
        assert torch.equal(c, g)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose precision cannot change: reset it around a
    run with another --mixed-precision."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_training_autocasts_the_model_and_keeps_the_scan_in_float32(
        images, tmp_path, monkeypatch, fresh_accelerator_state):
    # (fp16 is not tested: on a CPU accelerate runs it as plain float32, without autocast.)
    scans = []  # (input dtype, autocast on inside the scan, A's dtype) of every training scan

    def recording_scan(u, delta, A, *args):
        if torch.is_grad_enabled():
            scans.append((u.dtype, torch.is_autocast_enabled("cpu"), A.dtype))
        return scan(u, delta, A, *args)

    scan = dispatch._scan
    monkeypatch.setattr(dispatch, "_scan", recording_scan)
    steps = ["--max-steps", "2", "--log-every", "1", "--lr", "1e-2"]
    exp32 = run(images, tmp_path / "fp32", *steps)
    assert set(scans) == {(torch.float32, False, torch.float32)}
    scans.clear()
    AcceleratorState._reset_state(True)
    exp16 = run(images, tmp_path / "bf16", *steps, "--mixed-precision", "bf16")
    # The layers before the scan ran in bf16 (autocast was on); the scan itself ran with autocast
    # off, its state parameters in float32.
    assert set(scans) == {(torch.bfloat16, False, torch.float32)}
    state = load_file(exp16 / "checkpoints" / "step-0000002" / "model.safetensors")
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    # Step 2's loss (at step 1 the zero final layer outputs 0 in any precision): the same batch
    # and weights, up to bf16 rounding.
    loss32, loss16 = logged_losses(exp32)[-1], logged_losses(exp16)[-1]
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=0.05)


def test_has_text_trains_on_one_caption_per_image_or_the_empty_one(tmp_path, monkeypatch):
    data = make_coco_folder(tmp_path / "coco", n_train=4, n_val=1, size=8)
    clip = save_tiny_clip(tmp_path / "clip", hidden_size=16)
    with pytest.raises(SystemExit, match="--has_text needs COCO captions"):
        run(make_image_folder(tmp_path / "images", size=8), tmp_path / "r0", "--has-text")
    contexts = []  # what the model is given in training steps
    build = train.build_model

    def build_and_watch(*args, **kwargs):
        model, model_kwargs = build(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda m, args, kwargs: contexts.append(kwargs["context"]) if m.training else None,
            with_kwargs=True)
        return model, model_kwargs

    monkeypatch.setattr(train, "build_model", build_and_watch)
    exp = run(data, tmp_path / "r", "--has-text", "--text-encoder", str(clip),
              "--cond-drop-prob", "0.5", "--max-steps", "3")
    meta = train.read_meta(exp / "checkpoints" / "step-0000003")
    assert meta["args"]["has_text"] and meta["model_kwargs"]["context_dim"] == 16
    # Which caption each context row encodes: CLIP's states of every (image i, caption j), and of
    # the empty caption that --cond-drop-prob puts in the place of a dropped one (None).
    encoder = load_text_encoder(str(clip), "cpu")
    captions = [(i, j) for i in range(4) for j in range(3)] + [None]
    with torch.no_grad():
        states = encoder([f"image {c[0]} of train, caption number {c[1]}" if c else ""
                          for c in captions])
    picked = [[next(c for c, s in zip(captions, states, strict=True) if torch.allclose(row, s))
               for row in context] for context in contexts]
    # Three steps of the 4 images, each image with one of its own captions or the empty one
    assert len(picked) == 3 and all(len(batch) == 4 for batch in picked)
    kept = [[c for c in batch if c] for batch in picked]
    assert all(len({i for i, _ in batch}) == len(batch) for batch in kept)
    assert 0 < sum(map(len, kept)) < 12  # --cond-drop-prob 0.5: some captions dropped, not all
    # One caption drawn per image: within a batch the caption numbers differ (the authors'
    # release drew one number for the whole batch).
    assert any(len({j for _, j in batch}) > 1 for batch in kept), picked


@pytest.mark.slow
def test_two_processes_equal_one_at_the_same_global_batch(images, tmp_path, monkeypatch):
    """With the training draws made functions of the images (tests/deterministic_train.py), 2
    processes x batch 2 see the same 4 images per step as 1 process x batch 4, and averaging their
    gradients must give the same update: weights, EMA and AdamW's moments after 2 steps."""
    common = ["--max-steps", "2", "--ckpt-every", "2", "--ema-decay", "0.5", "--lr", "1e-2"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "tests/deterministic_train.py", *TINY, "--data-path", str(images),
               "--results-dir", str(tmp_path / "two"), "--batch-size", "2", *common]
    result = subprocess.run(command, cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    make_deterministic(lambda name, value: monkeypatch.setattr(train, name, value))
    one = run(images, tmp_path / "one", "--batch-size", "4", *common)
    two = tmp_path / "two" / "000-USM-T-1"
    assert "global batch 4" in (two / "log.txt").read_text()
    expected = checkpoint_state(one / "checkpoints" / "step-0000002")
    got = checkpoint_state(two / "checkpoints" / "step-0000002")
    assert expected.keys() == got.keys()
    for key in expected:
        if key.startswith("opt."):  # AdamW's moments carry the gradients' scale
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-9, msg=key)
        else:  # Adam normalises each update to about lr (1e-2): agreement within 1% of a step
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4, msg=key)


def test_best_checkpoint_is_replaced_only_when_fid_improves(images, tmp_path, monkeypatch):
    """FID is scripted (5, 4, 4.5 then, after resuming, 4.2, 3): best/ must hold step 2 after the
    first run, keep it through the resumed run's worse 4.2 (the best FID is read back from best/),
    and move to step 5."""
    fids = iter([5.0, 4.0, 4.5, 4.2, 3.0])
    best_when_measured = []  # best/'s (step, fid) as each FID is computed

    def scripted_fid(accelerator, generate, val_set, fid_images, args, inception, reference):
        best = exp_dir / "checkpoints" / "best"
        meta = train.read_meta(best) if best.is_dir() else {}
        best_when_measured.append((meta.get("step"), meta.get("fid")))
        return next(fids), reference

    exp_dir = tmp_path / "000-USM-T-1"
    monkeypatch.setattr(train, "compute_fid", scripted_fid)
    monkeypatch.setattr(train, "load_inception", lambda *args: None)
    fid = ["--fid-every", "1", "--ckpt-every", "1"]
    run(images, tmp_path, *fid, "--max-steps", "3")
    run(images, tmp_path, *fid, "--max-steps", "5")  # resumes at step 3
    final = train.read_meta(exp_dir / "checkpoints" / "best")
    assert best_when_measured + [(final["step"], final["fid"])] == [
        (None, None), (1, 5.0), (2, 4.0), (2, 4.0), (2, 4.0), (5, 3.0)]


def test_zigma_drop_path_is_on_in_training_and_off_in_eval():
    torch.manual_seed(0)
    model = Zigma(input_size=4, in_channels=2, hidden_size=32, depth=4, drop_path=0.5)
    with torch.no_grad():  # open the zero-initialised gates so that every branch matters
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name:
                p.normal_(std=0.05)
    plain = Zigma(input_size=4, in_channels=2, hidden_size=32, depth=4, drop_path=0.0)
    plain.load_state_dict(model.state_dict())
    x, t = torch.randn(1, 2, 4, 4).expand(6, -1, -1, -1), torch.rand(1).expand(6)
    model.eval()
    # Eval: the network without drop path, whatever the rate.
    torch.testing.assert_close(model(x, t), plain.train()(x, t))
    model.train()

    def distinct_rows() -> int:
        return len({row.detach().numpy().tobytes() for row in model(x, t)})

    # Training: six copies of one input come out different (branches dropped per sample), by the
    # final drop path alone and by the layers' own alone.
    final, layers = model.drop_path, [blk.drop_path for blk in model.blocks]
    for blk in model.blocks:
        blk.drop_path = torch.nn.Identity()
    assert distinct_rows() > 1
    model.drop_path = torch.nn.Identity()
    assert distinct_rows() == 1  # no drop path left: deterministic
    for blk, drop in zip(model.blocks, layers, strict=True):
        blk.drop_path = drop
    assert distinct_rows() > 1 and isinstance(final, DropPath)


def test_train_loop_trains_zigma_with_drop_path_and_samples_without(images, tmp_path,
                                                                   monkeypatch):
    calls = []  # (module in training mode, gradients on) of every drop-path call
    build = train.build_model

    def build_and_watch(*args, **kwargs):
        model, model_kwargs = build(*args, **kwargs)
        for module in model.modules():  # the EMA is a deep copy: it carries the hooks too
            if isinstance(module, DropPath):
                module.register_forward_hook(
                    lambda m, a, out: calls.append((m.training, torch.is_grad_enabled())))
        return model, model_kwargs

    monkeypatch.setattr(train, "build_model", build_and_watch)
    monkeypatch.setattr(train, "save_grid", SAVE_GRID)  # the EMA samples a grid at the end,
    monkeypatch.setattr(train, "SAMPLE_STEPS", 2)  # in 2 steps rather than 25
    run(images, tmp_path, "--model", "Zigma-T/1", "--max-steps", "1")
    assert {mode for mode, grad in calls if grad} == {True}  # the training step
    assert {mode for mode, grad in calls if not grad} == {False}  # the grid's sampling


def test_train_loop_applies_the_ema_and_the_learning_rate_schedule(images, tmp_path):
    exp = run(images, tmp_path, "--ckpt-every", "1", "--ema-decay", "0.5", "--lr", "0.01",
              "--warmup-steps", "4")
    w0 = initial_weights(images)
    steps = [exp / "checkpoints" / f"step-000000{i}" for i in (1, 2)]
    w1, w2 = (load_file(folder / "model.safetensors") for folder in steps)
    e1, e2 = (torch.load(folder / "custom_checkpoint_0.pkl", weights_only=True)
              for folder in steps)
    trained = [k for k, v in w0.items() if v.is_floating_point()]
    for k in trained:  # ema <- 0.5 ema + 0.5 model after every optimizer step, from the init
        torch.testing.assert_close(e1[k], 0.5 * w0[k] + 0.5 * w1[k])
        torch.testing.assert_close(e2[k], 0.5 * e1[k] + 0.5 * w2[k])
    # AdamW's first update is lr * g / (|g| + eps): every weight with a gradient moves by the
    # step's learning rate, here warm-up step 1 of 4 at 0.01.
    moved = torch.cat([(w1[k] - w0[k]).abs().flatten() for k in trained])
    assert moved.max().item() == pytest.approx(0.0025, rel=1e-3)
