"""USM and Zigma as a diffusers model and pipeline, and checkpoints exported as pipeline folders.

    python -m loader export results/demo/000-USM-T-4/checkpoints/step-0001600 usm-demo

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("usm-demo", trust_remote_code=True)
    pipe(class_labels=[0, 1, 2], guidance_scale=3.0).images[0].save("sample.png")

An exported folder is what the diffusers ecosystem shares (DiT's is the model followed here,
diffusers' DiTPipeline): model_index.json; transformer/ (config.json, the EMA weights in
diffusion_pytorch_model.safetensors); scheduler/; the VAE and the CLIP text encoder when the model
needs them, included or named by their Hub repository; README.md, the model card; and
pipeline_usm.py, the custom-code module diffusers' own DiffusionPipeline.from_pretrained loads
(with trust_remote_code=True) and which only imports USMPipeline from this repository. No file in
it is a pickle.

Time conventions (docs/diffusers.md). Our rectified flow is z_t = t x + (1 - t) eps with t = 1 the
data, and the network predicts x - eps (diffusion/rectified_flow.py). diffusers' flow-matching
schedulers use x_sigma = sigma eps + (1 - sigma) x and a model output eps - x: so sigma = 1 - t,
the scheduler's timestep is 1000 sigma, and its model output is minus our velocity. Our Euler grid
t_i = i / N is the sigma grid 1 - i / N (FlowMatchEulerDiscreteScheduler appends sigma = 0).
Gaussian diffusion is DiT's (diffusion/): a model called with step s / 1000, diffusers' DDPM
scheduler with the learned-range variance, or DDIM.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    ImagePipelineOutput,
    ModelMixin,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import CommitInfo, ModelCard, ModelCardData, create_repo, upload_folder
from transformers import AutoTokenizer, CLIPTextModel

from diffusion import classifier_free_guidance
from encoders import VAE_REPOS, TextEncoder, decode_latents, load_text_encoder, load_vae
from loader import (
    AUTHORS_T_MIN,
    PIPELINE_INDEX,
    USM_AUTHORS,
    ZIGMA_COMPVIS,
    build_model,
    load_checkpoint,
)
from sample import DDPM_STEPS
from sampling import SAMPLE_STEPS

PIPELINE_MODULE = "pipeline_usm"  # the custom-code module file written into every export
PIPELINE_CODE = ('"""USMPipeline, from the repository that exported this folder (it must be '
                 'importable)."""\n\nfrom usm_diffusers import USMPipeline, '
                 'USMTransformer2DModel  # noqa: F401\n')


class USMTransformer2DModel(ModelMixin, ConfigMixin):
    """One of our networks (models.py: any registry entry, or USM / Zigma with full kwargs) as a
    diffusers model: config.json records how to build it, the weights are the network's own state
    dict under `net.` (loader.TRANSFORMER_PREFIX, which load_checkpoint strips).

    objective: "rf" (the output is our velocity x - eps) or "gaussian" (eps, then the
    learned-variance channels). t_min: the network is queried at t_min + (1 - t_min) t, the time
    the USM authors' release trained on (RectifiedFlow's t_min). training: what the checkpoint
    records (source, step, train.py's args, FID), for the model card and load_checkpoint.
    """

    @register_to_config
    def __init__(self, model: str = "USM-T/1", model_kwargs: dict | None = None,
                 objective: str = "rf", t_min: float = 0.0, training: dict | None = None):
        super().__init__()
        self.net = build_model(model, {**(model_kwargs or {}), "use_checkpoint": False})

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, return_dict: bool = True
                ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Our network's output at our time: timestep (B,) in [0, 1] (see the module docstring
        for diffusers' schedulers' times), class_labels (B,) with num_classes the null class,
        encoder_hidden_states (B, L, context_dim) CLIP states."""
        t_min = self.config.t_min
        sample = self.net(hidden_states, t_min + (1 - t_min) * timestep, class_labels,
                          encoder_hidden_states)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


class USMPipeline(DiffusionPipeline):
    """Class-, text- or unconditional image generation with a USM or Zigma transformer, sampled
    with a diffusers scheduler: FlowMatchEulerDiscreteScheduler for rectified flow (on sample.py's
    Euler grid), DDPMScheduler / DDIMScheduler for Gaussian diffusion.

    vae_repo / text_encoder_repo: a Hub repository (or folder) the VAE / CLIP text encoder is read
    from when the folder does not include it (e.g. stabilityai/sd-vae-ft-ema). license: the model
    card's. save_pretrained and push_to_hub write what `python -m loader export` writes.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(self, transformer: USMTransformer2DModel,
                 scheduler: FlowMatchEulerDiscreteScheduler | DDPMScheduler,
                 vae: AutoencoderKL | None = None, text_encoder: CLIPTextModel | None = None,
                 tokenizer=None, vae_repo: str | None = None,
                 text_encoder_repo: str | None = None, license: str = "other"):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(vae_repo=vae_repo, text_encoder_repo=text_encoder_repo,
                                license=license)
        # An encoder read from its repository stays a reference: registered as None, its
        # model_index.json entry stays [null, null] when it is set (DiffusionPipeline's
        # __setattr__), so save_pretrained does not copy it; .to() and CPU offload still see it.
        if vae is None and vae_repo:
            self.vae = AutoencoderKL.from_pretrained(vae_repo)
        if text_encoder is None and text_encoder_repo:
            self.tokenizer = AutoTokenizer.from_pretrained(text_encoder_repo)
            self.text_encoder = CLIPTextModel.from_pretrained(text_encoder_repo)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
                        ) -> USMPipeline:
        """DiffusionPipeline.from_pretrained of an exported folder (or Hub repository). diffusers
        loads any folder whose model_index.json names a module file as custom code, even from the
        class itself; that code is run without trust_remote_code only when it is the import
        export writes, which brings back this very class."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():  # a Hub repository: into (or from) the Hugging Face cache
            folder = Path(cls.download(pretrained_model_name_or_path, **{
                k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only")
                if k in kwargs}))
        module = folder / f"{PIPELINE_MODULE}.py"
        if module.is_file() and module.read_text() == PIPELINE_CODE:
            kwargs["trust_remote_code"] = True
        return super().from_pretrained(folder, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """diffusers' save_pretrained (safetensors only), then what makes the folder load as this
        pipeline with diffusers' DiffusionPipeline: model_index.json's _class_name names the
        custom-code module, written beside it; and the model card, README.md."""
        if kwargs.pop("push_to_hub", False):
            raise ValueError("use USMPipeline.push_to_hub: it uploads the model card too")
        kwargs["safe_serialization"] = True
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        # diffusers' configs record where they were loaded from (_name_or_path): a path of this
        # machine, and a re-saved folder would differ from the export by it.
        for path in [folder / PIPELINE_INDEX, *folder.glob("*/config.json")]:
            config = json.loads(path.read_text())
            if path.name == PIPELINE_INDEX:
                config["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
            elif "_name_or_path" not in config:
                continue
            config.pop("_name_or_path", None)
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # their format
        (folder / f"{PIPELINE_MODULE}.py").write_text(PIPELINE_CODE)
        references = {k: self.config[k] for k in ("vae_repo", "text_encoder_repo")
                      if self.config[k]}
        model_card(self.transformer.config, references, self.config.license).save(
            folder / "README.md")

    def push_to_hub(self, repo_id: str, commit_message: str | None = None,
                    private: bool | None = None, token: str | None = None,
                    create_pr: bool = False) -> CommitInfo:
        """Upload what save_pretrained writes to the Hub repository repo_id (created if needed).
        diffusers' own push_to_hub would replace the model card with a generic one."""
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return upload_folder(repo_id=repo_id, folder_path=folder, token=token,
                                 commit_message=commit_message or "Upload USMPipeline",
                                 create_pr=create_pr)

    def _conditions(self, class_labels: list[int] | None, prompt: str | list[str] | None,
                    device: torch.device) -> tuple[int, dict, dict]:
        """(batch size, the network's conditional and unconditional inputs): the null class, or
        the empty caption's encoding, which label / caption dropout trained as unconditional."""
        net = self.transformer.net
        if class_labels is not None:
            if not net.num_classes:
                raise ValueError("class_labels given, but this model is not class-conditional")
            y = torch.as_tensor(class_labels, device=device).reshape(-1)
            if (y < 0).any() or (y >= net.num_classes).any():
                raise ValueError(f"class labels must be in 0..{net.num_classes - 1}")
            return len(y), {"y": y}, {"y": torch.full_like(y, net.num_classes)}
        if prompt is not None:
            if self.text_encoder is None:
                raise ValueError("prompt given, but this model is not text-conditional")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            encode = TextEncoder(self.tokenizer, self.text_encoder)
            context = encode(prompts).to(device)
            return len(prompts), {"context": context}, {"context": encode([""]).to(
                device).expand_as(context)}
        if net.num_classes or self.text_encoder is not None:
            raise ValueError("this model is conditional: pass class_labels or prompt")
        return 0, {}, {}

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | None = None,
                 prompt: str | list[str] | None = None, num_images: int = 1,
                 num_inference_steps: int | None = None, guidance_scale: float = 1.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Images for class_labels, or prompt(s), or (unconditional) num_images of them.

        num_inference_steps: default 25 Euler steps for rectified flow (the paper's), 250 for
        Gaussian diffusion (DiT's DDPM protocol). guidance_scale: classifier-free guidance, 1 for
        none. latents: the initial noise (B, C, H, W), else drawn with generator. output_type:
        "pil", "np" (floats in [0, 1], (B, H, W, C)), "pt" (the same as a tensor) or "latent"
        (the sampler's output (B, C, H, W), not decoded).
        """
        device = self._execution_device
        net = self.transformer.net
        count, cond, uncond = self._conditions(class_labels, prompt, device)
        shape = (count or num_images, net.in_channels, *net.input_size)
        x = (latents.to(device) if latents is not None else
             randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype))

        def network(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                    context: torch.Tensor | None = None) -> torch.Tensor:
            return self.transformer(x, t, class_labels=y, encoder_hidden_states=context).sample

        if cond and guidance_scale != 1:  # the guidance sample.py uses (forward_with_cfg)
            model_fn = classifier_free_guidance(network, guidance_scale, cond, uncond,
                                                net.in_channels)
        else:
            def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return network(x, t, **cond)

        flow = self.transformer.config.objective == "rf"
        steps = num_inference_steps or (SAMPLE_STEPS if flow else int(DDPM_STEPS))
        if flow:  # sigma = 1 - t on our uniform grid t = i / N
            self.scheduler.set_timesteps(sigmas=1 - np.arange(steps) / steps, device=device)
        else:
            self.scheduler.set_timesteps(steps, device=device)
        train_steps = self.scheduler.config.num_train_timesteps
        # DDPM's learned-range variance takes the variance channels; DDIM & co. take eps alone
        # (a DDIMScheduler made from a DDPM config keeps its variance_type, unused).
        learned = isinstance(self.scheduler, DDPMScheduler) and self.scheduler.config.get(
            "variance_type") in ("learned", "learned_range")
        for timestep in self.progress_bar(self.scheduler.timesteps):
            t = (timestep / train_steps).expand(x.shape[0]).to(x.dtype)
            if flow:
                model_output = -model_fn(x, 1 - t)  # their eps - x is minus our velocity
            else:
                model_output = model_fn(x, t)
                model_output = model_output if learned else model_output[:, :net.in_channels]
            x = self.scheduler.step(model_output, timestep, x, generator=generator).prev_sample

        if output_type == "latent":  # what the sampler ends on, before any decoding
            self.maybe_free_model_hooks()
            return ImagePipelineOutput(images=x) if return_dict else (x,)
        images = decode_latents(self.vae, x) if self.vae is not None else x.clamp(-1, 1)
        images = ((images + 1) / 2).permute(0, 2, 3, 1).float().cpu()
        if output_type != "pt":
            images = images.numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


#################################################################################
#                        Checkpoint -> pipeline folder                           #
#################################################################################

# The base data set on the Hub, by the name of train.py's --data-path folder (where known).
HUB_DATASETS = {"fashion-mnist": "zalando-datasets/fashion_mnist",
                "imagenet": "ILSVRC/imagenet-1k"}
SOURCES = {"ours": "a train.py checkpoint of this repository",
           USM_AUTHORS: "the USM authors' release (Ergasti et al. 2025)",
           ZIGMA_COMPVIS: "CompVis/zigma (Hu et al. 2024)"}


def _encoders(args: dict, text: bool, include_vae: bool, include_text_encoder: bool
              ) -> tuple[dict, dict]:
    """(the pipeline's encoder components, the Hub repositories it names instead)."""
    components, references = {}, {}
    vae_spec = args.get("vae", "none")
    if vae_spec != "none":
        if include_vae:
            components["vae"] = load_vae(vae_spec, "cpu")
        elif Path(vae_spec).exists():
            raise ValueError(f"the VAE is the local folder {vae_spec}: a Hub reference to it "
                             "would not load elsewhere; pass --include-vae")
        else:
            references["vae_repo"] = VAE_REPOS.get(vae_spec, vae_spec)
    if text:
        spec = args.get("text_encoder", "openai/clip-vit-large-patch14")
        if include_text_encoder:
            encoder = load_text_encoder(spec, "cpu")
            components.update(text_encoder=encoder.model, tokenizer=encoder.tokenizer)
        elif Path(spec).exists():
            raise ValueError(f"the text encoder is the local folder {spec}: a Hub reference to it "
                             "would not load elsewhere; pass --include-text-encoder")
        else:
            references["text_encoder_repo"] = spec
    return components, references


def model_card(config: dict, references: dict, license: str) -> ModelCard:
    """README.md: the Hub's metadata header and what the checkpoint records."""
    training, kwargs = config["training"], config["model_kwargs"]
    args = training.get("args", {})
    if kwargs.get("context_dim"):
        kind, call = "text-to-image", 'pipe(prompt=["a photo of a cat"], guidance_scale=3.0)'
    elif kwargs.get("num_classes"):
        kind, call = "class-conditional", "pipe(class_labels=[0, 1, 2], guidance_scale=3.0)"
    else:
        kind, call = "unconditional", "pipe(num_images=4)"
    dataset = next((hub for name, hub in HUB_DATASETS.items()
                    if name in Path(str(args.get("data_path", ""))).name.lower()), None)
    objective = "rectified-flow" if config["objective"] == "rf" else "gaussian-diffusion"
    task = "text-to-image" if kind == "text-to-image" else "unconditional-image-generation"
    data = ModelCardData(
        library_name="diffusers", license=license, datasets=[dataset] if dataset else None,
        pipeline_tag=task, tags=["mamba", "state-space-model", objective,
                                 config["model"].split("-")[0].lower(), kind])
    fid = training.get("fid")
    if fid is None:
        fid_line = "not recorded (train.py records it in checkpoints/best/ when it measures one)"
    else:
        sampler = args.get("sampler") or "euler"
        steps = "" if sampler == "dopri5" else str(args.get("num_sampling_steps") or SAMPLE_STEPS)
        fid_line = (f"{fid:.3f} at this step: {args.get('fid_images')} EMA samples ({sampler}"
                    f"{steps}, guidance {args.get('cfg_scale')}) against as many images of the "
                    f"{args.get('fid_reference')} split, Inception resize "
                    f"{args.get('fid_resize')} (train.py's FID)")
    encoders = "".join(f"\n- {name.removesuffix('_repo')}: {repo} (read from the Hub when the "
                       "pipeline loads)" for name, repo in sorted(references.items()))
    body = f"""
# {config['model']}: {kind.replace("-to-image", "-to")} image generation with Mamba diffusion

Exported by `python -m loader export` from {SOURCES[training['source']]}.
The network's code is the repository that exported it: keep it importable (run from its root or
put it on PYTHONPATH). Defaults: 25 Euler steps for rectified flow, 250 DDPM steps otherwise.

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("<this folder or Hub repo>", trust_remote_code=True)
images = {call}.images
```

## What the checkpoint records

- Model: {config['model']} {json.dumps(kwargs, sort_keys=True)}
- Objective: {objective}; weights: the EMA
- Training step: {'not recorded' if training.get('step') is None else training['step']}
- FID: {fid_line}{encoders}

Training arguments, as the checkpoint records them:

```json
{json.dumps(args, indent=1, sort_keys=True, default=str)}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def export(src: str | os.PathLike, out: str | os.PathLike, include_vae: bool = False,
           include_text_encoder: bool = False, license: str = "other") -> Path:
    """Write any checkpoint load_checkpoint reads as a diffusers pipeline folder `out` (see the
    module docstring): the EMA weights, the scheduler of its objective, its encoders included or
    named by Hub repository, the model card. `out` must not exist; it appears whole or not at
    all."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it or choose another folder")
    meta, ema = load_checkpoint(src, "ema")
    args = dict(meta.get("args", {}))
    objective = args.get("objective", "rf")
    training = meta.get("training") or {key: meta[key] for key in ("source", "step", "args", "fid")
                                        if key in meta}
    transformer = USMTransformer2DModel(
        model=meta["model"], model_kwargs=meta["model_kwargs"], objective=objective,
        t_min=AUTHORS_T_MIN if meta["source"] == USM_AUTHORS else 0.0, training=training)
    transformer.net.load_state_dict(ema, strict=True)
    if objective == "rf":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    else:  # train.py's Gaussian diffusion: DiT's linear schedule and learned variance
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                  variance_type="learned_range", clip_sample=False,
                                  timestep_spacing="linspace")
    text = meta["model_kwargs"].get("context_dim") is not None
    components, references = _encoders(args, text, include_vae, include_text_encoder)
    pipe = USMPipeline(transformer, scheduler, **components, license=license)
    pipe.register_to_config(**references)  # named, not loaded: the export stays offline
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    os.replace(tmp, out)
    return out
