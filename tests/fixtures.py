"""Shared test helpers: tiny image folders, a tiny COCO captions folder, and tiny randomly
initialised VAE / CLIP text models saved from configs (no downloads anywhere)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def _write_image(path: Path, rng: np.random.Generator, size: int, mode: str) -> None:
    channels = 1 if mode == "L" else 3
    pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


def make_image_folder(
    root: str | Path,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 5,
    size: int = 16,
    mode: str = "RGB",
    val_per_class: int = 2,
    seed: int = 0,
    held_out: str = "val",
) -> Path:
    """An ImageFolder data set: root/{train,<held_out>}/<class>/<i>.png with random pixels."""
    root, rng = Path(root), np.random.default_rng(seed)
    for split, count in (("train", per_class), (held_out, val_per_class)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _write_image(folder / f"{i:03d}.png", rng, size, mode)
    return root


def make_coco_folder(
    root: str | Path, n_train: int = 6, n_val: int = 2, size: int = 16, seed: int = 0,
    layout: str = "authors",
) -> Path:
    """A COCO captions data set with three captions per image, in the COCO captions format (images
    + annotations lists): the USM authors' layout, root/{train,val}/*.jpg with
    root/annotations/{train,val}.json, or (layout="2014") COCO 2014's as its archives extract,
    root/{train2014,val2014}/COCO_<split>2014_<id>.jpg with
    root/annotations/captions_{train,val}2014.json."""
    root, rng = Path(root), np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("val", n_val)):
        folder, annotation_file = {
            "authors": (split, f"{split}.json"),
            "2014": (f"{split}2014", f"captions_{split}2014.json"),
        }[layout]
        (root / folder).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            file_name = (f"{split}_{i:012d}.jpg" if layout == "authors"
                         else f"COCO_{split}2014_{100 + i:012d}.jpg")
            _write_image(root / folder / file_name, rng, size, "RGB")
            images.append({"id": 100 + i, "file_name": file_name, "width": size, "height": size})
            for j in range(3):
                caption = f"image {i} of {split}, caption number {j}"
                annotations.append(
                    {"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": caption}
                )
        with open(root / "annotations" / annotation_file, "w") as f:
            json.dump({"images": images, "annotations": annotations}, f)
    return root


def make_hub_cache(
    cache: str | Path, repo_id: str, files: dict[str, bytes], commit: str,
    refs: tuple[str, ...] = ("main",),
) -> Path:
    """A Hugging Face Hub cache holding one commit of a model repository, laid out as
    huggingface_hub lays it out: <cache>/models--<owner>--<repo>/blobs/<file's SHA-256> (the
    content), snapshots/<commit>/<path in repo> (a relative symlink to the blob) and
    refs/<branch or tag> (the commit hash). Returns the snapshot folder."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path_in_repo, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / path_in_repo
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def save_tiny_vae(folder: str | Path) -> Path:
    """A randomly initialised AutoencoderKL with the SD VAE's interface (RGB in, 4 latent channels,
    8x downsampling) but tiny widths."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(folder)
    return Path(folder)


def _byte_symbols() -> list[str]:
    """The 256 characters byte-level BPE uses for the 256 bytes (GPT-2's table): printable bytes
    stand for themselves, the others are moved to code points from 256 up."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    return [chr(b) for b in sorted(printable)] + [chr(256 + i) for i in range(256 - len(printable))]


def save_tiny_clip(folder: str | Path, hidden_size: int = 32) -> Path:
    """A randomly initialised CLIP text model and a character-level CLIP tokenizer (a BPE with no
    merges over the byte alphabet), saved with save_pretrained so load_text_encoder reads it."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
