"""What train.py promises about a training step and its evaluations, observed where the loop keeps
it: one tiny in-process run (4 steps, 2 epochs of 8 images) shared by the tests, with spies on what
the objective, the model and the optimizer receive. Each test fails when the loop stops calling
its helper (tests/test_data.py and test_diffusion.py test the helpers themselves): a flip, label
dropout, the --sampling option, the schedule over --epochs, --weight-decay, the learnable
positional embedding, guided grids from the EMA on the sampler's grid; FID's reference images,
noise seeds and image count (compute_fid as each process runs it); the VAE's latent scale in
training, grids and sample.py."""

import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import sample
import train
from diffusion import RectifiedFlow
from encoders import load_vae
from sampling import ImageSampler, to_uint8
from tests.fixtures import make_image_folder, save_tiny_vae
from tests.test_train import run
from tests.test_train_options import initial_weights

# 8 train images, batch 4: 2 steps an epoch, so --epochs 2 ends the run at step 4 (not at
# --max-steps 100). Warm-up over 1 step, then cosine decay to 0 at step 4. One guided sample grid
# at the end.
OPTIONS = ["--num-classes", "2", "--cond-drop-prob", "0.5", "--sampling", "uniform",
           "--learn-pos-emb", "--lr", "0.01", "--warmup-steps", "1", "--lr-schedule", "cosine",
           "--epochs", "2", "--max-steps", "100", "--num-sampling-steps", "3",
           "--sample-every", "4", "--cfg-scale", "2", "--weight-decay", "0.05"]
STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=4, size=8)


@pytest.fixture(scope="module")
def observed(data, tmp_path_factory) -> SimpleNamespace:
    """One run of train.main with OPTIONS, and what its steps and its final grid handed on."""
    seen = SimpleNamespace(batches=[], objective_inputs=[], times=[], forwards=[], lrs=[],
                           grids=[])
    build, copy = train.build_model, train.deepcopy
    model_inputs, training_losses = train.model_inputs, RectifiedFlow.training_losses
    sample_timesteps, draw = RectifiedFlow.sample_timesteps, ImageSampler.__call__

    def watch_model_inputs(x, cond, *args):  # the batch as the loader gave it
        seen.batches.append((x.clone(), cond.clone()))
        return model_inputs(x, cond, *args)

    def watch_training_losses(self, model, x, model_kwargs=None, noise=None):
        seen.objective_inputs.append((x.clone(), dict(model_kwargs or {})))
        return training_losses(self, model, x, model_kwargs, noise)

    def watch_sample_timesteps(self, batch_size, device):
        t = sample_timesteps(self, batch_size, device)
        seen.times.append((self.sampling, t.clone()))
        return t

    # Every forward of the model or its EMA: (module, training mode, gradients on, t, y, output)
    def build_and_watch(*args, **kwargs):
        model, model_kwargs = build(*args, **kwargs)
        seen.model = model
        model.register_forward_hook(
            lambda m, a, kw, out: seen.forwards.append(
                (m, m.training, torch.is_grad_enabled(), a[1].clone(), kw["y"], out.detach())),
            with_kwargs=True)
        return model, model_kwargs

    def draw_and_watch(self, conditions, seed):  # the grids: (conditions, seed, images)
        seen.grids.append((conditions, seed, draw(self, conditions, seed)))
        return seen.grids[-1][2]

    def copy_and_watch(module):  # setup's one deepcopy is the EMA (it carries the hook along)
        seen.ema = copy(module)
        return seen.ema

    handle = register_optimizer_step_pre_hook(
        lambda optimizer, a, kw: seen.lrs.append(optimizer.param_groups[0]["lr"]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "model_inputs", watch_model_inputs)
        mp.setattr(RectifiedFlow, "training_losses", watch_training_losses)
        mp.setattr(RectifiedFlow, "sample_timesteps", watch_sample_timesteps)
        mp.setattr(train, "build_model", build_and_watch)
        mp.setattr(train, "deepcopy", copy_and_watch)
        mp.setattr(ImageSampler, "__call__", draw_and_watch)
        try:
            seen.exp = run(data, tmp_path_factory.mktemp("results"), *OPTIONS)
        finally:
            handle.remove()
    return seen


def test_each_step_trains_on_images_flipped_at_random_one_by_one(observed):
    assert len(observed.batches) == len(observed.objective_inputs) == STEPS
    flips = []
    for (images, _), (x, _) in zip(observed.batches, observed.objective_inputs, strict=True):
        same = (x == images).flatten(1).all(1)
        mirrored = (x == images.flip(-1)).flatten(1).all(1)
        assert (same | mirrored).all()  # every image trained on as it is or as its mirror image
        flips.append(mirrored)
    flips = torch.stack(flips)
    assert flips.any() and not flips.all()
    assert any(0 < row.sum() < len(row) for row in flips)  # drawn per image, not per batch


def test_labels_drop_to_the_null_class_at_the_cond_drop_prob(observed):
    dropped = []
    for (_, labels), (_, kwargs) in zip(observed.batches, observed.objective_inputs, strict=True):
        y = kwargs["y"]
        kept = y != 2  # 2 classes: the null class is 2
        assert torch.equal(y[kept], labels[kept]) and (y[~kept] == 2).all()
        dropped.append(~kept)
    dropped = torch.cat(dropped)  # --cond-drop-prob 0.5 over 16 labels: some dropped, not all
    assert 0 < dropped.sum() < len(dropped)


def test_training_times_come_from_the_sampling_option_unscaled(observed):
    training = [t for m, mode, grad, t, y, out in observed.forwards if grad]
    assert len(observed.times) == len(training) == STEPS
    for (sampling, drawn), t in zip(observed.times, training, strict=True):
        assert sampling == "uniform"  # --sampling uniform, not the default log
        assert torch.equal(t, drawn) and 0 <= t.min() and t.max() <= 1  # [0, 1], not 0..1000
    assert train.parse_args(["--data-path", "d"]).sampling == "log"  # the paper's default


def test_learning_rate_warms_up_then_decays_to_zero_at_the_last_epoch(observed):
    # Closed form: 0.01 x step / 1 during warm-up, then 0.01 x (1 + cos(pi (step - 1) / 3)) / 2,
    # ending at 0 at step 4, the end of --epochs 2 (not of --max-steps 100).
    assert observed.lrs == pytest.approx([0.01, 0.0075, 0.0025, 0.0])


def test_learn_pos_emb_trains_a_positional_embedding_that_starts_at_zero(observed, data):
    w0 = initial_weights(data)  # TINY's model without --learn-pos-emb: the fixed sin-cos table
    assert w0["pos_embed"].abs().sum() > 0
    model = observed.model
    assert "pos_embed" in dict(model.named_parameters())
    folder = observed.exp / "checkpoints" / f"step-{STEPS:07d}"
    meta = train.read_meta(folder)
    assert meta["model_kwargs"]["learn_pos_emb"] is True
    trained = load_file(folder / "model.safetensors")["pos_embed"]
    assert trained.shape == w0["pos_embed"].shape and trained.abs().min() > 0  # every entry moved
    ema = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=True)["pos_embed"]
    assert not torch.equal(ema, trained) and ema.abs().sum() > 0


def test_grids_sample_the_ema_with_guidance_on_the_samplers_time_grid(observed):
    training = [(m, mode) for m, mode, grad, t, y, out in observed.forwards if grad]
    sampling = [(m, mode, t, y, out) for m, mode, grad, t, y, out in observed.forwards if not grad]
    assert all(m is observed.model and mode for m, mode in training)
    assert all(m is observed.ema and not mode for m, mode, *_ in sampling)
    # The final grid: 2 class rows of 8 from the --global-seed's noise, 3 Euler steps from t = 0
    # (--num-sampling-steps), each on the doubled batch of guidance: the labels, then the null
    # class 2, mixed as uncond + 2 (cond - uncond) (--cfg-scale 2)
    (labels, seed, images), = observed.grids
    assert seed == 0 and labels.tolist() == [0] * 8 + [1] * 8
    assert [t.tolist() for *_, t, y, out in sampling] == [
        pytest.approx([i / 3] * 32) for i in range(3)]
    assert all(torch.equal(y, torch.cat([labels, torch.full((16,), 2)]))
               for *_, y, out in sampling)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    for *_, out in sampling:
        cond, uncond = out.chunk(2)
        x = x + (uncond + 2 * (cond - uncond)) / 3
    torch.testing.assert_close(images, x.clamp(-1, 1))
    assert (observed.exp / "samples" / f"step-{STEPS:07d}.png").is_file()


def test_adamw_decays_the_weights_by_the_weight_decay_option(observed):
    folder = observed.exp / "checkpoints" / f"step-{STEPS:07d}"
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)
    assert [group["weight_decay"] for group in optimizer["param_groups"]] == [0.05]


class RecordingSampler:
    """Stands in for ImageSampler in compute_fid: records (conditions, seed), returns noise."""

    def __init__(self):
        self.calls, self.nfe = [], []

    def __call__(self, conditions, seed: int) -> torch.Tensor:
        self.calls.append((conditions.clone(), seed))
        return torch.rand(len(conditions), 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("processes, batch_size, fid_images", [(1, 2, 3), (2, 1, 4)])
def test_fid_counts_images_and_gives_every_batch_and_process_its_own_seed(
        data, processes, batch_size, fid_images):
    """compute_fid, the loop's FID, run as each process of a `processes`-process run would run it
    (its shard; gather_object is the identity in this one process)."""
    val, _ = train.build_dataset(data, "val", 8, 3)  # 4 images: 2 of each class
    args = train.parse_args(["--data-path", str(data), "--batch-size", str(batch_size),
                             "--num-classes", "2", "--global-seed", "7"])
    subset = train.fid_subset(len(val), fid_images, args.global_seed)
    samplers = [RecordingSampler() for _ in range(processes)]
    for rank, generate in enumerate(samplers):
        seen = []  # every batch Inception is given: reference images and samples, in turn

        def inception(images: torch.Tensor, seen=seen) -> torch.Tensor:
            seen.append(images)
            return images.float().flatten(1)[:, :4]

        accelerator = SimpleNamespace(process_index=rank, num_processes=processes,
                                      device=torch.device("cpu"))
        fid, _ = train.compute_fid(accelerator, generate, val, fid_images, args, inception, None)
        assert np.isfinite(fid)
        # The reference images: this process's share of the subset (dealt out in turn), as they
        # are (not flipped); each sample takes the label of one of them
        share = subset[rank::processes]
        assert torch.equal(torch.cat(seen[0::2]), to_uint8(torch.stack([val[i][0] for i in share])))
        labels = [label for conditions, _ in generate.calls for label in conditions.tolist()]
        assert labels == [val.samples[i][1] for i in share]
    calls = [call for generate in samplers for call in generate.calls]
    # --fid-images counts images: that many samples (and reference images), not batches of them
    assert sum(len(conditions) for conditions, _ in calls) == fid_images
    # Every batch of every process has its own noise seed, none of them the grids' (7)
    seeds = [seed for _, seed in calls]
    assert len(set(seeds)) == len(seeds) > 1 and args.global_seed not in seeds


def test_latents_are_scaled_by_sd_factor_in_training_grids_and_sample_py(tmp_path, monkeypatch):
    """Stable Diffusion's latent scale 0.18215 (written here, not read from encoders.py): the
    objective gets the VAE's latents times it, and the VAE decodes the sampler's output divided
    by it, in train.py's grids and in sample.py. The tiny VAE's posterior is made (nearly)
    deterministic so that its latents can be recomputed."""
    vae = load_vae(str(save_tiny_vae(tmp_path / "random-vae")), "cpu")
    with torch.no_grad():  # log-variance -30: the posterior's spread is e^-15
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30
    vae.save_pretrained(tmp_path / "vae")
    latents = []  # (images the loader gave, latents the objective got)
    decoded, sampled = [], []  # what the VAE decoded, what the sampler returned
    model_inputs, decode, sample_fn = train.model_inputs, AutoencoderKL.decode, RectifiedFlow.sample

    def watch_inputs(x, *args):
        inputs = model_inputs(x, *args)
        latents.append((x, inputs[0]))
        return inputs

    def watch_sample(self, *args, **kwargs):
        sampled.append(sample_fn(self, *args, **kwargs))
        return sampled[-1]

    def watch_decode(self, z, *args, **kwargs):
        decoded.append(z)
        return decode(self, z, *args, **kwargs)

    monkeypatch.setattr(train, "model_inputs", watch_inputs)
    monkeypatch.setattr(RectifiedFlow, "sample", watch_sample)
    monkeypatch.setattr(AutoencoderKL, "decode", watch_decode)
    data = make_image_folder(tmp_path / "data", per_class=2, size=64)
    exp = run(data, tmp_path / "r", "--vae", str(tmp_path / "vae"), "--image-size", "64",
              "--max-steps", "1", "--num-sampling-steps", "2")
    (images, z), = latents
    with torch.no_grad():
        views = [vae.encode(x).latent_dist.mean * 0.18215 for x in (images, images.flip(-1))]
    close = [(z - view).flatten(1).abs().amax(1) < 1e-4 for view in views]
    assert (close[0] | close[1]).all()  # each image's latents, or its mirror image's
    sample.main(sample.parse_args(["--ckpt", str(exp), "--sample-dir", str(tmp_path / "s"),
                                   "--num-samples", "2", "--num-sampling-steps", "2"]))
    assert len(decoded) == len(sampled) == 2  # train.py's grid, then sample.py's batch
    for z, x in zip(decoded, sampled, strict=True):
        torch.testing.assert_close(z, x / 0.18215)


def test_the_authors_samples_option_counts_batches_of_the_batch_size_per_process(data, tmp_path,
                                                                                monkeypatch):
    counts = []  # the number of images each FID is asked for

    def scripted_fid(accelerator, generate, reference_set, fid_images, *args):
        counts.append(fid_images)
        return 1.0, None

    monkeypatch.setattr(train, "compute_fid", scripted_fid)
    monkeypatch.setattr(train, "load_inception", lambda *args: None)
    monkeypatch.setattr(train, "save_grid", lambda *args: None)
    fid = ["--fid-every", "1", "--max-steps", "2", "--batch-size", "2"]
    run(data, tmp_path / "a", *fid, "--samples", "3")  # 3 batches of 2 on 1 process
    run(data, tmp_path / "b", *fid, "--fid-images", "5")
    assert counts == [6, 6, 5, 5]
