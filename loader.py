"""Load any USM or Zigma checkpoint into this repository's models, and convert it to ours.

    from loader import load_model
    model = load_model("best_0200000.pt")          # eval mode; model(x, t, y=None, context=None)

    python -m loader convert best_0200000.pt usm-afhq.pt
    python -m loader export best_0200000.pt usm-afhq      # a diffusers pipeline folder

Three layouts are read (docs/upstream.md#usm-checkpoints and docs/upstream.md#zigma-checkpoints),
and the diffusers pipeline folders `export` writes from any of them (docs/diffusers.md):
- ours: a train.py checkpoint folder (meta.json records the model) or a .pt with "model_kwargs";
- the USM authors' release: their `best_<step>.pt` / `last.pt` ({"model", "ema", "opt", "args"},
  args an argparse.Namespace) and their accelerate `save_state` folders (model.safetensors = the
  model, model_1.safetensors = the EMA);
- CompVis/zigma: `{:07d}.pt` ({"model", "ema", "opt", "args", ...}, args an OmegaConf DictConfig,
  keys prefixed with `module.` by multi-GPU runs). The config is read as plain data under torch's
  safe loading, whichever omegaconf pickled it, without omegaconf installed.
A foreign checkpoint's architecture is read off its tensor shapes (width, stage split or depth,
patch, channels, grid, classes, text and its context width, learned sigma); its `args` only add
what shapes cannot show. The load is strict: every tensor is used, except the ones the authors'
code creates and never calls (`attn.ln_1` in every USM block, the unconditional `y_embedder`).
All three take t in [0, 1]: the authors' 1..1000 time is our t * 1000 inside the model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from checkpoints import META_FILE, CheckpointError, read_meta, verify_checkpoint
from hub import local_checkpoint
from models import USM, All_models, Zigma, sincos_pos_embed

USM_AUTHORS, ZIGMA_COMPVIS, OURS = "usm-authors", "zigma-compvis", "ours"
# The USM release queried its model at t = 1 + 999 i / N on its 1..1000 scale
# (docs/upstream.md#time-convention): in our [0, 1] time, t_min + (1 - t_min) * i / N with this
# t_min.
AUTHORS_T_MIN = 1e-3


class _ConfigObject:
    """Stands in for every class an OmegaConf config is pickled as (DictConfig, ListConfig, their
    value nodes and metadata): the unpickler creates it under their names and hands it their
    pickled state, from which `_config_value` takes the values. No omegaconf code runs, and any
    omegaconf version's pickle reads the same (they differ in metadata only)."""

    def __setstate__(self, state: dict) -> None:
        self.state = state


def _plain_dict(*_default_factory: object) -> dict:
    """Stands in for collections.defaultdict: every omegaconf version (2.1 to 2.4) pickles a
    config's resolver cache as one, and a Hydra run fills it (the `${now:...}` of hydra.run.dir);
    torch's safe unpickler refuses to fill a defaultdict, so it becomes a plain dict."""
    return {}


_OMEGACONF_CLASSES = ["dictconfig.DictConfig", "listconfig.ListConfig", "base.ContainerMetadata",
                      "base.Metadata", *(f"nodes.{kind}Node" for kind in (
                          "Any", "String", "Integer", "Float", "Boolean", "Bytes", "Path"))]
# What a checkpoint's pickle may hold besides tensors: DiT-style argparse args, and the
# Hydra/OmegaConf config CompVis stores, read as plain data.
_SAFE_GLOBALS = [argparse.Namespace, typing.Any, dict, list, int, float, str, bool,
                 (_plain_dict, "collections.defaultdict"),
                 *((_ConfigObject, f"omegaconf.{name}") for name in _OMEGACONF_CLASSES)]


#################################################################################
#                                Reading files                                   #
#################################################################################


def torch_load(path: str | os.PathLike) -> dict:
    """torch.load of a checkpoint pickle (a dict), allowing only tensors and the args classes
    above; CheckpointError naming the file when it is none."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and format errors all mean "not a checkpoint we read"
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path} is not a checkpoint this code reads (torch.load: "
                              f"{first_line})") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a checkpoint this code reads: it holds a "
                              f"{type(checkpoint).__name__}, not a dict")
    return checkpoint


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as err:  # damaged in a checkpoint saved without checksums
        raise CheckpointError(f"{path} is damaged: {err}") from err


def _config_value(value: object) -> object:
    """An unpickled OmegaConf config as plain dicts, lists and values (interpolations and "???"
    stay strings, as OmegaConf.to_container leaves them)."""
    if isinstance(value, _ConfigObject):  # a container's "_content" or a value node's "_val"
        return _config_value(value.state.get("_content", value.state.get("_val")))
    if isinstance(value, dict):
        return {k: _config_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_config_value(v) for v in value]
    return value


def _plain(args: object) -> dict:
    """A checkpoint's args as a plain dict: argparse.Namespace, OmegaConf config or dict."""
    if isinstance(args, argparse.Namespace):
        return vars(args)
    value = _config_value(args)
    return value if isinstance(value, dict) else {}


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DDP checkpoints prefix every key with `module.`."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def layout_of(state: dict[str, torch.Tensor]) -> str:
    """Which model code wrote this state dict, from its key names."""
    if any(".attn.self_attention." in k for k in state):
        return USM_AUTHORS
    if "norm_f.weight" in state and any(".mixer.dt_proj.weight" in k for k in state):
        return ZIGMA_COMPVIS
    return OURS


class _Reader:
    """Hands out a foreign state dict's tensors and remembers which were used: the load is strict,
    so whatever no part of our model took (and is not a known-unused tensor) is an error."""

    def __init__(self, state: dict[str, torch.Tensor], layout: str):
        self.state, self.layout, self.used = state, layout, set()

    def __call__(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.state[key]

    def skip(self, *keys: str) -> None:
        self.used.update(keys)

    def check_all_used(self) -> None:
        left = sorted(self.state.keys() - self.used)
        if left:
            shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
            raise CheckpointError(f"{self.layout} checkpoint has tensors no part of our model "
                                  f"takes: {shown}")


#################################################################################
#                        The USM authors' release -> ours                        #
#################################################################################

_USM_BLOCK_KEYS = {  # the authors' names inside a block -> ours
    "attn.self_attention.in_proj.weight": "mixer.in_proj.weight",
    "attn.self_attention.conv2d.weight": "mixer.conv2d.weight",
    "attn.self_attention.conv2d.bias": "mixer.conv2d.bias",
    "attn.self_attention.x_proj_weight": "mixer.ssm.x_proj.weight",  # [1, R + 2N, Di]
    "attn.self_attention.dt_projs_weight": "mixer.ssm.dt_proj.weight",  # [1, Di, R]
    "attn.self_attention.dt_projs_bias": "mixer.ssm.dt_proj.bias",  # [1, Di]
    "attn.self_attention.A_logs": "mixer.ssm.A_log",
    "attn.self_attention.Ds": "mixer.ssm.D",
    "attn.self_attention.out_norm.weight": "mixer.out_norm.weight",
    "attn.self_attention.out_norm.bias": "mixer.out_norm.bias",
    "attn.self_attention.out_proj.weight": "mixer.out_proj.weight",
    "attn.skip_scale": "skip_scale",
    "adaLN_modulation.1.weight": "adaLN_modulation.1.weight",
    "adaLN_modulation.1.bias": "adaLN_modulation.1.bias",
    "skip.weight": "skip_linear.weight",
    "skip.bias": "skip_linear.bias",
    "mca.to_q.weight": "cross_attn.to_q.weight",
    "mca.to_out.0.weight": "cross_attn.to_out.weight",
    "mca.to_out.0.bias": "cross_attn.to_out.bias",
}
_USM_UNUSED = re.compile(r".*\.attn\.ln_1\.(weight|bias)")  # created, never called


def _indices(state: dict, prefix: str) -> list[int]:
    return sorted({int(m[1]) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))})


def _usm_stages(state: dict) -> tuple[list[tuple[int, list[int]]], list[tuple[int, list[int]]]]:
    """The authors' flat enc_blocks / dec_blocks lists as (sampler index, block indices) per
    stage: the encoder is blocks then a Conv2d per stage, the decoder an up-sampler then blocks."""
    encoder, blocks = [], []
    for i in _indices(state, "enc_blocks"):
        if f"enc_blocks.{i}.weight" in state:  # a Conv2d down-sampler ends the stage
            encoder.append((i, blocks))
            blocks = []
        else:
            blocks.append(i)
    if blocks or not encoder:
        raise CheckpointError(f"USM encoder with {len(blocks)} block(s) after its last "
                              "down-sampler: not a U our USM can build")
    decoder = []
    for i in _indices(state, "dec_blocks"):
        if f"dec_blocks.{i}.0.weight" in state:
            raise CheckpointError("USM with the authors' Conv2d + PixelShuffle up-sampler (no "
                                  "--use_convtranspose): their own forward cannot run it")
        if f"dec_blocks.{i}.weight" in state:  # a ConvTranspose2d up-sampler starts the stage
            decoder.append((i, []))
        elif decoder:
            decoder[-1][1].append(i)
    return encoder, decoder


def _class_table(table: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Our class table has num_classes + 1 rows (the last is the null class of guidance). A table
    trained without label dropout has no null row: a zero row is added (guidance then has no
    trained unconditional branch)."""
    if table.shape[0] == num_classes:
        return torch.cat([table, table.new_zeros(1, table.shape[1])])
    if table.shape[0] != num_classes + 1:
        raise CheckpointError(f"class table of {table.shape[0]} rows for {num_classes} classes")
    return table


def _top_level(take: _Reader, num_classes: int | None, null_row: bool, C: int
               ) -> tuple[dict, dict]:
    """Embedders and conditioning (the same names in both releases). The class count is the
    recorded one, else the table's rows less the null row, when the release trains one."""
    kwargs: dict = {}
    out = {f"x_embedder.proj.{p}": take(f"x_embedder.proj.{p}") for p in ("weight", "bias")}
    for i in (0, 2):
        for p in ("weight", "bias"):
            out[f"cond.t_embedder.mlp.{i}.{p}"] = take(f"t_embedder.mlp.{i}.{p}")
    _, in_channels, patch, _ = out["x_embedder.proj.weight"].shape
    kwargs.update(in_channels=in_channels, patch_size=patch, hidden_size=C)
    if "y_embedder.embedding_table.weight" in take.state:
        table = take("y_embedder.embedding_table.weight")
        num_classes = num_classes or table.shape[0] - int(null_row)
        out["cond.y_embedder.weight"] = _class_table(table, num_classes)
        kwargs["num_classes"] = num_classes
    return out, kwargs


def _grid_side(tokens: int, what: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(f"{what}: {tokens} tokens is not a square grid")
    return side


def _positional(take: _Reader, args_learned: bool | None, grid: int, C: int
                ) -> tuple[torch.Tensor, bool]:
    """(table, learned). Stored fixed tables are used as stored; when args do not say whether the
    table was learned, a table equal to the sin-cos one is taken as fixed."""
    if "pos_embed" not in take.state:  # CompVis use_pe 0: no positional embedding
        return torch.zeros(1, grid * grid, C), False
    table = take("pos_embed")
    if args_learned is None:
        args_learned = not torch.allclose(table.float(), sincos_pos_embed(grid, grid, C),
                                          atol=1e-5)
    return table, args_learned


def _from_usm_authors(state: dict, args: dict) -> tuple[str, dict, dict]:
    """(model name, constructor kwargs, our state dict) of an authors' USM state dict."""
    take = _Reader(state, USM_AUTHORS)
    C = state["x_embedder.proj.weight"].shape[0]
    # The authors' LabelEmbedder trains a null row (label dropout 0.1).
    out, kwargs = _top_level(take, args.get("num_classes"), True, C)
    encoder, decoder = _usm_stages(state)
    stages = [len(blocks) for _, blocks in encoder]
    if [len(blocks) for _, blocks in decoder] != stages[::-1]:
        raise CheckpointError(f"USM decoder stages {[len(b) for _, b in decoder]} do not mirror "
                              f"the encoder's {stages}")

    def block(src: str, dst: str) -> None:
        for key in [k for k in state if k.startswith(src + ".")]:
            name = key[len(src) + 1:]
            if _USM_UNUSED.fullmatch(key):
                take.skip(key)
            elif name in _USM_BLOCK_KEYS:
                value = take(key)
                out[f"{dst}.{_USM_BLOCK_KEYS[name]}"] = value[0] if name in (
                    "attn.self_attention.x_proj_weight", "attn.self_attention.dt_projs_weight",
                    "attn.self_attention.dt_projs_bias") else value
        if f"{src}.mca.to_k.weight" in state:  # our fused to_kv: k rows, then v rows
            out[f"{dst}.cross_attn.to_kv.weight"] = torch.cat(
                [take(f"{src}.mca.to_k.weight"), take(f"{src}.mca.to_v.weight")])

    def sampler(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = take(f"{src}.{p}")

    for s, (down, blocks) in enumerate(encoder):
        for j, i in enumerate(blocks):
            block(f"enc_blocks.{i}", f"enc_blocks.{s}.{j}")
        sampler(f"enc_blocks.{down}", f"downs.{s}")
    block("middle_block", "mid_block")
    for s, (up, blocks) in enumerate(decoder):
        sampler(f"dec_blocks.{up}", f"ups.{s}")
        for j, i in enumerate(blocks):
            block(f"dec_blocks.{i}", f"dec_blocks.{s}.{j}")
    for p in ("linear.weight", "linear.bias", "adaLN_modulation.1.weight",
              "adaLN_modulation.1.bias"):
        out[f"final_layer.{p}"] = take(f"final_layer.{p}")

    first = "enc_blocks.0.attn.self_attention"
    d_inner = state[f"{first}.conv2d.weight"].shape[0]
    text = f"{first.removesuffix('.attn.self_attention')}.mca.to_q.weight" in state
    if text:
        out["cond.context_proj.weight"] = take("y_embedder.weight")
        out["cond.context_proj.bias"] = take("y_embedder.bias")
        kwargs["context_dim"] = out["cond.context_proj.weight"].shape[1]
    elif "y_embedder.weight" in state:  # the unconditional model's unused Linear
        take.skip("y_embedder.weight", "y_embedder.bias")
    grid = _grid_side(state["pos_embed"].shape[1], "USM positional embedding")
    out["pos_embed"], learned = _positional(take, args.get("learn_pos_emb"), grid, C)
    out_channels = out["final_layer.linear.weight"].shape[0] // kwargs["patch_size"] ** 2
    kwargs.update(
        input_size=grid * kwargs["patch_size"], stages=tuple(stages), learn_pos_emb=learned,
        learn_sigma=out_channels == 2 * kwargs["in_channels"],
        skip_conn=any(".skip.weight" in k for k in state),
        skip_gate=state[f"{first}.in_proj.weight"].shape[0] == d_inner,
        use_convtranspose=True, d_state=state[f"{first}.A_logs"].shape[-1],
    )
    take.check_all_used()
    return _registry_name(USM, kwargs), kwargs, out


#################################################################################
#                           CompVis' Zigma -> ours                               #
#################################################################################

_ZIGMA_BLOCK_KEYS = {
    "mixer.in_proj.weight": "mixer.in_proj.weight",
    "mixer.conv1d.weight": "mixer.conv1d.weight",
    "mixer.conv1d.bias": "mixer.conv1d.bias",
    "mixer.x_proj.weight": "mixer.ssm.x_proj.weight",
    "mixer.dt_proj.weight": "mixer.ssm.dt_proj.weight",
    "mixer.dt_proj.bias": "mixer.ssm.dt_proj.bias",
    "mixer.A_log": "mixer.ssm.A_log",
    "mixer.D": "mixer.ssm.D",
    "mixer.out_proj.weight": "mixer.out_proj.weight",
    "norm.weight": "norm.weight",
    "adaLN_modulation.1.weight": "adaLN_modulation.1.weight",
    "adaLN_modulation.1.bias": "adaLN_modulation.1.bias",
    "msa.to_q.weight": "cross_attn.to_q.weight",
    "msa.to_out.0.weight": "cross_attn.to_out.weight",
    "msa.to_out.0.bias": "cross_attn.to_out.bias",
}


def _from_zigma_compvis(state: dict, args: dict) -> tuple[str, dict, dict]:
    """(model name, constructor kwargs, our state dict) of a CompVis ZigMa state dict."""
    params = args.get("model", {}).get("params", {}) if isinstance(args.get("model"), dict) else {}
    scan = params.get("scan_type", "zigzagN8")
    if scan != "zigzagN8":
        raise CheckpointError(f"Zigma scan_type {scan!r}: only zigzagN8 (8 zigzag paths, one per "
                              "layer) is built here")
    take = _Reader(state, ZIGMA_COMPVIS)
    C = state["x_embedder.proj.weight"].shape[0]
    # CompVis' LabelEmbedder has no label dropout, so no null row.
    out, kwargs = _top_level(take, params.get("num_classes"), False, C)
    depth = len(_indices(state, "blocks"))
    for i in range(depth):
        for name, ours in _ZIGMA_BLOCK_KEYS.items():
            if f"blocks.{i}.{name}" in state:
                out[f"blocks.{i}.{ours}"] = take(f"blocks.{i}.{name}")
        if f"blocks.{i}.msa.to_k.weight" in state:
            out[f"blocks.{i}.cross_attn.to_kv.weight"] = torch.cat(
                [take(f"blocks.{i}.msa.to_k.weight"), take(f"blocks.{i}.msa.to_v.weight")])
    out["norm_f.weight"] = take("norm_f.weight")
    out["final_layer.linear.weight"] = take("final_layer.linear.weight")
    out["final_layer.linear.bias"] = take("final_layer.linear.bias")
    if "blocks.0.msa.to_q.weight" in state:
        out["cond.context_proj.weight"] = take("y_embedder.weight")
        out["cond.context_proj.bias"] = take("y_embedder.bias")
        kwargs["context_dim"] = out["cond.context_proj.weight"].shape[1]
    img_dim = params.get("img_dim")
    grid = (_grid_side(state["pos_embed"].shape[1], "Zigma positional embedding")
            if "pos_embed" in state else img_dim // kwargs["patch_size"] if img_dim else None)
    if grid is None:
        raise CheckpointError("Zigma checkpoint without a positional embedding nor "
                              "args.model.params.img_dim: its token grid cannot be known")
    use_pe = params.get("use_pe")
    out["pos_embed"], learned = _positional(take, None if use_pe is None else use_pe == 2,
                                            grid, C)
    out_channels = out["final_layer.linear.weight"].shape[0] // kwargs["patch_size"] ** 2
    kwargs.update(input_size=grid * kwargs["patch_size"], depth=depth, learn_pos_emb=learned,
                  learn_sigma=out_channels == 2 * kwargs["in_channels"],
                  d_state=state["blocks.0.mixer.A_log"].shape[-1])
    take.check_all_used()
    return _registry_name(Zigma, kwargs), kwargs, out


#################################################################################
#                                 Shared                                         #
#################################################################################


def _registry_name(cls: type, kwargs: dict) -> str:
    """The registry entry that builds this architecture (its width, patch and stages / depth;
    the name then implies them), else the class name: sizes outside the registry still load."""
    for name, build in All_models.items():
        config = build.config
        if name.startswith(cls.__name__ + "-") and all(kwargs[k] == v for k, v in config.items()):
            for k in config:
                kwargs.pop(k)
            return name
    return cls.__name__


def build_model(name: str, model_kwargs: dict) -> nn.Module:
    """A registry entry (USM-B/1, ...) or, for off-registry sizes, the class with full kwargs."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
    if name in All_models:
        return All_models[name](**kwargs)
    if name in ("USM", "Zigma"):
        return {"USM": USM, "Zigma": Zigma}[name](**kwargs)
    raise CheckpointError(f"unknown model {name!r}; known: {', '.join(All_models)}")


# A diffusers pipeline folder (usm_diffusers.export): its index, and the transformer's config and
# EMA weights, our state dict under the model class's `net` attribute.
PIPELINE_INDEX = "model_index.json"
TRANSFORMER_CONFIG = "transformer/config.json"
TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
TRANSFORMER_PREFIX = "net."


def _read_pipeline(path: Path, weights: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, state dict) of an exported pipeline folder, read as JSON and safetensors (never a
    pickle). The included VAE / text encoder, if any, replaces the recorded one in meta["args"]:
    sample.py loads it."""
    if weights != "ema":
        raise KeyError(f"{path} has no 'model' weights, only 'ema' (a pipeline folder)")
    try:
        config = json.loads((path / TRANSFORMER_CONFIG).read_text())
        # "training" as recorded, for an export of the export
        meta = {**config["training"], "model": config["model"],
                "model_kwargs": config["model_kwargs"], "training": config["training"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a pipeline folder of usm_diffusers.export: "
                              f"{path / TRANSFORMER_CONFIG} unreadable ({err!r})") from err
    args = meta["args"] = dict(meta.get("args", {}))
    if (path / "vae" / "config.json").is_file():
        args["vae"] = str(path / "vae")
    if (path / "text_encoder" / "config.json").is_file():  # encoders.load_text_encoder reads it
        args["text_encoder"] = str(path)
    state = _load_safetensors(path / TRANSFORMER_WEIGHTS)
    return meta, {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in state.items()}


# What train.py's checkpoint folders hold (accelerate's save_state names;
# docs/cluster.md#checkpoints):
# the EMA is the first object registered for checkpointing. The authors' save_state folders
# prepare the EMA as a second model instead.
MODEL_FILE, EMA_FILE = "model.safetensors", "custom_checkpoint_0.pkl"
AUTHORS_EMA_FILE = "model_1.safetensors"


def _read_folder(path: Path, weights: str) -> dict[str, torch.Tensor]:
    """The state dict of a save_state folder: the EMA (ours, else the authors') when asked and
    there, else the model; checked against the folder's checksums when it has a meta.json."""
    names = [EMA_FILE, AUTHORS_EMA_FILE] if weights == "ema" else []
    name = next((n for n in [*names, MODEL_FILE] if (path / n).exists()), None)
    if name is None:
        raise FileNotFoundError(f"{path} has no {MODEL_FILE}" + (
            f" nor {EMA_FILE} / {AUTHORS_EMA_FILE} (EMA)" if weights == "ema" else ""))
    if (path / META_FILE).exists():  # the authors' save_state folders have none
        verify_checkpoint(path, [name])
    if name.endswith(".safetensors"):
        return _load_safetensors(path / name)
    return _state_dict(torch_load(path / name), path / name)


def _state_dict(state: dict, path: Path) -> dict[str, torch.Tensor]:
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a checkpoint this code reads: no state dict (a dict "
                              "of tensors) in it")
    return state


def _read_file(path: Path, weights: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(what the file records besides weights, the chosen state dict) of a .pt file:
    {"ema", "model", "opt", "args", ...} or a bare state dict."""
    raw = torch_load(path)
    keys = ("ema", "model") if weights == "ema" else ("model",)
    state = next((raw[k] for k in keys if isinstance(raw.get(k), dict)), None)
    if state is None:
        if weights == "model" and isinstance(raw.get("ema"), dict):
            raise KeyError(f"{path} has no 'model' weights, only 'ema'")
        state, raw = raw, {}  # a bare state dict
    return ({k: v for k, v in raw.items() if k not in ("model", "ema", "opt")},
            _state_dict(state, path))


def load_checkpoint(path: str | os.PathLike, weights: str = "ema") -> tuple[dict, dict]:
    """(meta, state dict) of any checkpoint we read, in our format: meta as train.py's meta.json
    ({"model", "model_kwargs", "args", "step"}, what the checkpoint records) plus "source" (ours,
    usm-authors or zigma-compvis); the state dict with our names. weights="ema" takes the EMA
    when there is one, else the model."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    path = local_checkpoint(path)  # an hf:// name: the file in the Hugging Face cache
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} not found: give a .pt file or a checkpoint "
                                "folder, e.g. results/000-USM-B-1/checkpoints/step-0010000")
    if (path / PIPELINE_INDEX).is_file():
        return _read_pipeline(path, weights)
    if path.is_dir():
        raw = read_meta(path) if (path / META_FILE).exists() else {}
        state = _read_folder(path, weights)
    else:
        raw, state = _read_file(path, weights)
    state = _strip_module(state)
    args = _plain(raw.get("args"))
    layout = layout_of(state)
    if layout == OURS:
        meta = {key: raw[key] for key in ("model", "step", "args", "model_kwargs", "fid")
                if key in raw}
        if "model" not in meta and "model" in args:  # DiT-style .pt files name it in args
            meta["model"] = args["model"]
        if isinstance(meta.get("args"), argparse.Namespace):
            meta["args"] = args
        return {**meta, "source": OURS}, state
    convert = _from_usm_authors if layout == USM_AUTHORS else _from_zigma_compvis
    name, kwargs, state = convert(state, args)
    meta_args = {"model": name, "vae": args.get("vae") or "ema", "objective": "rf",
                 "num_classes": kwargs.get("num_classes", 0),
                 "image_size": kwargs["input_size"] * 8, "learn_pos_emb": kwargs["learn_pos_emb"],
                 **{k: kwargs[k] for k in ("skip_conn", "use_convtranspose", "stages", "skip_gate")
                    if k in kwargs}}
    return {"model": name, "model_kwargs": kwargs, "args": meta_args, "source": layout,
            "step": raw.get("train_steps")}, state


def load_model(path: str | os.PathLike, weights: str = "ema") -> nn.Module:
    """The model of any checkpoint we read (ours, the USM authors', CompVis' Zigma), strictly
    loaded, in eval mode, without gradients: call it as model(x, t, y=None, context=None) with t
    in [0, 1]."""
    meta, state = load_checkpoint(path, weights)
    if "model_kwargs" not in meta or "model" not in meta:
        raise CheckpointError(f"{path} does not record its model (no model_kwargs); load its "
                              "state dict into a model you build: download.find_model")
    model = build_model(meta["model"], {**meta["model_kwargs"], "use_checkpoint": False})
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write any checkpoint we read as one of ours: a .pt with "model" and "ema" (what the source
    has), "model_kwargs" and "args" (sample.py --ckpt reads it)."""
    meta, ema = load_checkpoint(src, "ema")
    try:
        _, model = load_checkpoint(src, "model")
    except KeyError:
        model = ema
    dst = Path(dst)
    record = {"model": model, "ema": ema, "model_kwargs": meta["model_kwargs"],
              "args": {**meta.get("args", {}), "model": meta["model"]},
              "source": meta["source"]}
    tmp = dst.with_name(f".{dst.name}.tmp")
    torch.save(record, tmp)
    os.replace(tmp, dst)
    return dst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert a USM / Zigma checkpoint (ours, the USM "
                                "authors', CompVis') into one of ours, or export it as a "
                                "diffusers pipeline folder.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write <src> as our .pt checkpoint <dst>")
    c.add_argument("src")
    c.add_argument("dst")
    e = sub.add_parser("export", help="write <src> as a diffusers pipeline folder <dst> "
                       "(docs/diffusers.md)")
    e.add_argument("src")
    e.add_argument("dst")
    e.add_argument("--include-vae", action="store_true",
                   help="copy the VAE into <dst>/vae (default: name its Hub repository)")
    e.add_argument("--include-text-encoder", action="store_true",
                   help="copy the CLIP text encoder and tokenizer into <dst> (default: name its "
                        "Hub repository)")
    e.add_argument("--license", default="other",
                   help="the model card's license (a Hub license id; default: other)")
    args = p.parse_args(argv)
    try:
        if args.command == "export":
            from usm_diffusers import export  # imports diffusers: only for this command

            dst = export(args.src, args.dst, args.include_vae, args.include_text_encoder,
                         args.license)
        else:
            dst = convert(args.src, args.dst)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"loader.py: error: {err}")
    meta, _ = load_checkpoint(dst)
    print(f"Wrote {dst}: {meta['model']} {meta['model_kwargs']}")


if __name__ == "__main__":
    main()
