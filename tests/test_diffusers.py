"""Checkpoints exported as diffusers pipeline folders (usm_diffusers.py, `python -m loader
export`), with diffusers as the oracle: its schedulers sample what sample.py samples, its loaders
read what export writes. Tiny random models, tiny VAE and CLIP; nothing is downloaded."""

import json
import os
import pickle
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from huggingface_hub import RepoUrl, constants

import loader
import sample
import usm_diffusers
from diffusion import RectifiedFlow, create_diffusion
from encoders import load_text_encoder, load_vae
from loader import load_checkpoint, load_model
from models import All_models
from sampling import ImageSampler, flow_sampler
from tests.fixtures import make_hub_cache, save_tiny_clip, save_tiny_vae
from tests.test_upstream_parity import FIXTURES
from usm_diffusers import PIPELINE_MODULE, USMPipeline, export

# |pipeline - sample.py| on images in [0, 1] (latents for the authors' model). Both run the same
# float32 network; they round the time grid differently: ours is torch.linspace(0, 1, N + 1)
# stepped by its differences, diffusers' the float32 sigmas 1 - i / N stepped by theirs with the
# network queried at 1 - 1000 sigma / 1000 (Gaussian: its betas in float32, ours in float64). A
# few ulps of t per step, carried through the steps of a random network: measured 1.2e-7 (Euler,
# guided), 1.3e-6 (text, through the VAE), 2.3e-6 (DDPM), 8e-7 (DDIM), 0 (the authors' grid).
# A wrong sign, time or guidance is off by more than 1e-3.
TOLERANCE = 2e-5


def random_model(name: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = All_models[name](**kwargs)
    for p in model.parameters():  # zero-initialised layers too: an output that depends on all
        torch.nn.init.normal_(p, std=0.05)
    return model.eval().requires_grad_(False)


def save_checkpoint(path: Path, name: str, kwargs: dict, args: dict, **extra) -> dict:
    """A .pt of ours whose "ema" and "model" differ; returns the EMA state dict."""
    ema = random_model(name, 0, **kwargs).state_dict()
    model = random_model(name, 1, **kwargs).state_dict()
    torch.save({"ema": ema, "model": model, "model_kwargs": kwargs,
                "args": {"model": name, **args}, **extra}, path)
    return ema


CLASS_KWARGS = {"input_size": 8, "in_channels": 1, "stages": (1,), "num_classes": 3}
CLASS_ARGS = {"vae": "none", "objective": "rf", "num_classes": 3, "data_path": "data/fashion-mnist",
              "fid_images": 1000, "fid_reference": "val", "fid_resize": "tf1", "cfg_scale": 3.0,
              "sampler": None, "num_sampling_steps": None}


@pytest.fixture(scope="module")
def class_export(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(checkpoint, its export, the EMA state dict) of a class-conditional pixel-space USM."""
    folder = tmp_path_factory.mktemp("class")
    ema = save_checkpoint(folder / "usm.pt", "USM-T/2", CLASS_KWARGS, CLASS_ARGS, step=1600,
                          fid=12.5)
    return folder / "usm.pt", export(folder / "usm.pt", folder / "pipe"), ema


def forbid_unpickling(monkeypatch) -> None:
    """Every way to unpickle, made to fail: what loading an export must never do."""
    def refuse(*args, **kwargs):
        raise AssertionError("unpickled while loading an export")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def euler(steps: int) -> RectifiedFlow:
    return flow_sampler(sample.parse_args(["--ckpt", "x", "--num-sampling-steps", str(steps)]))[0]


def test_export_reloads_exactly_without_pickle_and_exports_byte_identical(
        class_export, tmp_path, monkeypatch):
    ckpt, out, ema = class_export
    files = files_of(out)
    # model_index.json, the EMA in safetensors, the scheduler, the card, the custom-code module
    assert {"model_index.json", "transformer/config.json", "README.md", f"{PIPELINE_MODULE}.py",
            "transformer/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json"} == files.keys()
    assert not any(content.startswith((b"\x80", b"PK")) for content in files.values())  # pickles
    index = json.loads(files["model_index.json"])
    assert index["_class_name"] == [PIPELINE_MODULE, "USMPipeline"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]

    forbid_unpickling(monkeypatch)
    # export -> load -> export, and a loaded pipeline saved: the same bytes
    assert files_of(export(out, tmp_path / "again")) == files
    USMPipeline.from_pretrained(out).save_pretrained(tmp_path / "saved")
    assert files_of(tmp_path / "saved") == files
    for net in (load_model(out), USMPipeline.from_pretrained(out).transformer.net,
                DiffusionPipeline.from_pretrained(out, trust_remote_code=True).transformer.net):
        state = net.state_dict()
        assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in ema)
    meta, _ = load_checkpoint(out)
    assert (meta["step"], meta["fid"], meta["source"]) == (1600, 12.5, "ours")
    with pytest.raises(KeyError, match="only 'ema'"):
        load_checkpoint(out, "model")


def test_model_card_says_what_the_checkpoint_records(class_export):
    card = (class_export[1] / "README.md").read_text()
    header = card.split("---")[1]
    for line in ("library_name: diffusers", "license: other", "- zalando-datasets/fashion_mnist",
                 "pipeline_tag: unconditional-image-generation", "- rectified-flow"):
        assert line in header
    assert "Training step: 1600" in card and '"data_path": "data/fashion-mnist"' in card
    assert "FID: 12.500 at this step: 1000 EMA samples (euler25, guidance 3.0)" in card


def test_custom_code_is_run_only_when_it_is_the_import_export_writes(class_export, tmp_path):
    out = tmp_path / "pipe"
    for name, content in files_of(class_export[1]).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(out)  # diffusers' rule for custom code
    (out / f"{PIPELINE_MODULE}.py").write_text("import os\nos.system('echo other code')\n")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        USMPipeline.from_pretrained(out)


def test_push_to_hub_uploads_the_export(class_export, monkeypatch):
    uploaded = {}

    def upload_folder(repo_id: str, folder_path: str, **kwargs) -> None:
        uploaded[repo_id] = files_of(Path(folder_path))

    monkeypatch.setattr(usm_diffusers, "create_repo", lambda repo_id, **kwargs: RepoUrl(
        f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(usm_diffusers, "upload_folder", upload_folder)
    USMPipeline.from_pretrained(class_export[1]).push_to_hub("owner/usm-demo")
    assert uploaded == {"owner/usm-demo": files_of(class_export[1])}


def test_a_named_vae_is_loaded_and_stays_a_name(class_export, tmp_path):
    vae = save_tiny_vae(tmp_path / "vae")
    pipe = USMPipeline.from_pretrained(class_export[1])
    pipe = USMPipeline(pipe.transformer, pipe.scheduler, vae_repo=str(vae))
    assert pipe.vae.config.latent_channels == 4 and "vae" in pipe.components
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["vae"] == [None, None] and index["vae_repo"] == str(vae)
    assert not (tmp_path / "saved" / "vae").exists()
    assert USMPipeline.from_pretrained(tmp_path / "saved").vae.config == pipe.vae.config


def test_flow_pipeline_samples_what_sample_py_samples(class_export):
    """FlowMatchEulerDiscreteScheduler on sigma = 1 - t against sample.py's Euler sampler, with
    classifier-free guidance, from the same noise and labels."""
    _, out, _ = class_export
    pipe = USMPipeline.from_pretrained(out)
    labels, z = torch.tensor([0, 2, 1]), torch.randn(3, 1, 8, 8)
    ours = ImageSampler(load_model(out), euler(6), None, None, 1, 8, cfg_scale=2.5)
    expected = ((ours.from_noise(z, labels) + 1) / 2).permute(0, 2, 3, 1).numpy()
    images = pipe(class_labels=labels.tolist(), num_inference_steps=6, guidance_scale=2.5,
                  latents=z, output_type="np").images
    assert np.abs(images - expected).max() <= TOLERANCE
    unguided = pipe(class_labels=labels.tolist(), num_inference_steps=6, latents=z,
                    output_type="np").images
    assert np.abs(unguided - expected).max() > 1e-2  # the guidance is seen
    pil = pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert pil.images[0].size == (8, 8) and pil.images[0].mode == "L"


def test_gaussian_pipeline_samples_what_ddpm_and_ddim_sample(tmp_path):
    """A learned-sigma Zigma: diffusers' DDPM (learned range) and DDIM against diffusion/."""
    kwargs = {"input_size": 8, "in_channels": 1, "num_classes": 3, "learn_sigma": True}
    save_checkpoint(tmp_path / "zigma.pt", "Zigma-T/2", kwargs,
                    {"vae": "none", "objective": "gaussian", "num_classes": 3})
    pipe = USMPipeline.from_pretrained(export(tmp_path / "zigma.pt", tmp_path / "pipe"))
    net, labels, z = load_model(tmp_path / "pipe"), torch.tensor([0, 1]), torch.randn(2, 1, 8, 8)
    # DDPM on the linspace grid (as space_timesteps' "5"); DDIM on the "leading" one, ddimN's
    # stride from 0 when N divides 1000
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    for respacing, scheduler in (("5", pipe.scheduler), ("ddim5", ddim)):
        pipe.scheduler = scheduler
        torch.manual_seed(0)  # DDPM's step noise: the global generator, drawn in the same order
        expected = ImageSampler(net, create_diffusion(respacing), None, None, 1, 8, 2.0
                                ).from_noise(z, labels)
        torch.manual_seed(0)
        images = pipe(class_labels=labels.tolist(), num_inference_steps=5, guidance_scale=2.0,
                      latents=z, output_type="pt").images
        assert (images - ((expected + 1) / 2).permute(0, 2, 3, 1)).abs().max() <= TOLERANCE


def test_text_and_latent_model_round_trips_with_its_encoders(tmp_path, monkeypatch):
    """A text-conditional latent USM, its tiny VAE and CLIP included by the command line: the
    pipeline's prompts and VAE decoding give sample.py's images, and a second export the same
    bytes."""
    vae, clip = save_tiny_vae(tmp_path / "vae"), save_tiny_clip(tmp_path / "clip")
    kwargs = {"input_size": 8, "in_channels": 4, "stages": (1,), "context_dim": 32}
    save_checkpoint(tmp_path / "usm.pt", "USM-T/2", kwargs,
                    {"vae": str(vae), "text_encoder": str(clip), "objective": "rf"})
    loader.main(["export", str(tmp_path / "usm.pt"), str(tmp_path / "pipe"), "--include-vae",
                 "--include-text-encoder"])
    out = tmp_path / "pipe"
    with pytest.raises(SystemExit, match="pass --include-vae"):  # a local VAE cannot be named
        loader.main(["export", str(tmp_path / "usm.pt"), str(tmp_path / "ref")])

    forbid_unpickling(monkeypatch)
    meta, _ = load_checkpoint(out)
    assert meta["args"]["vae"] == str(out / "vae") and meta["args"]["text_encoder"] == str(out)
    ours = ImageSampler(load_model(out), euler(3), load_vae(str(out / "vae"), "cpu"),
                        load_text_encoder(str(out), "cpu"), 4, 8, cfg_scale=2.0)
    prompts, z = ["a red dress", "a bag"], torch.randn(2, 4, 8, 8)
    expected = ((ours.from_noise(z, prompts) + 1) / 2).permute(0, 2, 3, 1).numpy()
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    images = pipe(prompt=prompts, num_inference_steps=3, guidance_scale=2.0, latents=z,
                  output_type="np").images
    assert images.shape == (2, 64, 64, 3) and np.abs(images - expected).max() <= TOLERANCE
    assert files_of(export(out, tmp_path / "again", True, True)) == files_of(out)


@pytest.mark.parametrize("fixture", ["usm_readme", "usm_text", "zigma_pe2_omegaconf2.3.0",
                                     "zigma_text_omegaconf2.2.3"])
def test_upstream_checkpoints_export(fixture, tmp_path):
    """The USM authors' and CompVis' checkpoints (tests/upstream): their EMA, exported, is the
    network load_model builds from them; their VAE and text encoder are named, not included."""
    out = export(FIXTURES / f"{fixture}.pt", tmp_path / "pipe")
    theirs, exported = load_model(FIXTURES / f"{fixture}.pt").state_dict(), load_model(out)
    assert all(torch.equal(exported.state_dict()[k], theirs[k]) for k in theirs)
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae_repo"] == "stabilityai/sd-vae-ft-ema" and index["vae"] == [None, None]
    assert (index["text_encoder_repo"] is not None) == ("text" in fixture)


def test_authors_checkpoint_samples_on_their_time_grid(tmp_path):
    """The USM authors' release queried t_min + (1 - t_min) t: the export keeps it (compared on
    the latents: a random VAE's images are mostly clipped)."""
    out = export(FIXTURES / "usm_readme.pt", tmp_path / "pipe")
    net = load_model(out)
    z = torch.randn(2, net.in_channels, *net.input_size)
    # a VAE in place of the named SD one, which is not downloaded here
    pipe = USMPipeline.from_pretrained(out, vae=load_vae(str(save_tiny_vae(tmp_path / "v")),
                                                        "cpu"))
    sampler, name = sample.create_sampler(
        sample.parse_args(["--ckpt", "x", "--num-sampling-steps", "4"]), "rf", "usm-authors")
    assert name.endswith("-authors-time") and not net.num_classes
    latents = pipe(num_images=2, num_inference_steps=4, latents=z, output_type="latent").images
    assert (latents - sampler.sample(net, z)).abs().max() <= TOLERANCE
    assert (latents - euler(4).sample(net, z)).abs().max() > 1e-3  # our time grid differs


def test_hub_repository_of_a_pipeline_folder_reads_offline(class_export, tmp_path, monkeypatch):
    ckpt, out, ema = class_export
    cache = tmp_path / "hub"
    make_hub_cache(cache, "owner/usm-pipe", files_of(out), "c" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = cache / "models--owner--usm-pipe" / "snapshots" / ("c" * 40)
    assert sample.resolve_checkpoint("hf://owner/usm-pipe") == snapshot
    for net in (load_model("hf://owner/usm-pipe"),
                USMPipeline.from_pretrained("owner/usm-pipe").transformer.net):
        state = net.state_dict()
        assert all(torch.equal(state[k], ema[k]) for k in ema)
