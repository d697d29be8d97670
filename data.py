"""Training data: image folders, COCO captions, and a cache of VAE latents.

Two kinds of data sets are read, each in the layouts it is distributed in (docs/training.md#data,
docs/upstream.md#data-layout):
- an ImageFolder: <data>/train/<class>/*.png and <data>/val/... (torchvision's layout: AFHQ's
  afhq.zip, CelebA-HQ's celeba_hq.zip). AFHQ v2 names its held-out split test/: it stands in for a
  missing val/. A split folder holding the images directly counts as a single class;
- COCO captions: the USM authors' <data>/{train,val}/*.jpg with <data>/annotations/{train,val}.json,
  or COCO 2014 as its archives extract, <data>/{train2014,val2014}/*.jpg with
  <data>/annotations/captions_{train,val}2014.json.

Datasets return (image in [-1, 1], condition), the condition being a class index or the list of all
captions of the image. Everything random about a sample (horizontal flip, which caption, dropout for
guidance) is decided in the training loop by the helpers at the bottom, on the training process's
RNG: that RNG is saved in every checkpoint, so a resumed run draws exactly what an uninterrupted run
would have drawn, whatever the number of data-loader workers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from encoders import encode_images, vae_downsample_factor

Condition = int | list[str]


class DataError(ValueError):
    """The data folder is missing, empty or not in a layout we read."""


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded; the message names the file."""


# (image folder, annotation file) of a COCO captions split, in the layouts above.
COCO_LAYOUTS = (("{split}", "annotations/{split}.json"),
                ("{split}2014", "annotations/captions_{split}2014.json"))
# Where a split's images are when the split has no folder of its own name.
SPLIT_ALIASES = {"val": ("test",)}


def coco_files(data_path: str | Path, split: str) -> tuple[Path, Path] | None:
    """(image folder, annotation file) of the first COCO layout whose annotation file exists."""
    for folder, annotation_name in COCO_LAYOUTS:
        annotation_file = Path(data_path) / annotation_name.format(split=split)
        if annotation_file.is_file():
            return Path(data_path) / folder.format(split=split), annotation_file
    return None


def is_coco(data_path: str | Path) -> bool:
    return coco_files(data_path, "train") is not None


def _split_folder(data_path: str | Path, split: str) -> Path:
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise DataError(f"data folder {data_path} does not exist")
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        if (data_path / name).is_dir():
            return data_path / name
    raise DataError(
        f"no {split}/ folder in {data_path}: expected an image folder with train/ and val/ "
        "(or test/) subfolders, or COCO captions (train/, val/, annotations/{train,val}.json, "
        "or train2014/, val2014/, annotations/captions_{train,val}2014.json)"
    )


def image_folder_samples(data_path: str | Path, split: str) -> tuple[list, list[str]]:
    """[(path, class index)] and the class names (sorted folder names, as torchvision does)."""
    folder = _split_folder(data_path, split)
    if any(entry.is_dir() for entry in folder.iterdir()):
        classes, class_to_idx = find_classes(folder)
        samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    else:
        classes = []
        samples = [
            (str(p), 0) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMG_EXTENSIONS
        ]
    if not samples:
        raise DataError(f"no images found in {folder} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return samples, classes


def coco_samples(data_path: str | Path, split: str) -> list[tuple[str, list[str]]]:
    """[(path, all captions of the image)] from the split's annotation file (COCO captions
    format)."""
    files = coco_files(data_path, split)
    if files is None:
        expected = " or ".join(str(Path(data_path) / name.format(split=split))
                               for _, name in COCO_LAYOUTS)
        raise DataError(f"missing COCO annotation file {expected}")
    folder, annotation_file = files
    if not folder.is_dir():
        raise DataError(f"no {folder.name}/ folder in {data_path} for {annotation_file.name}")
    with open(annotation_file) as f:
        coco = json.load(f)
    captions = defaultdict(list)
    for annotation in coco["annotations"]:
        captions[annotation["image_id"]].append(annotation["caption"].strip())
    samples = [
        (str(folder / image["file_name"]), captions[image["id"]])
        for image in coco["images"]
        if captions[image["id"]]
    ]
    if not samples:
        raise DataError(f"no captioned images listed in {annotation_file}")
    return samples


def image_mode(samples: list[tuple[str, Condition]]) -> str:
    """PIL mode to load a data set in: "L" when its first readable image is single-channel, else
    "RGB" (unreadable files are left to the --on-corrupt policy)."""
    for path, _ in samples:
        try:
            with Image.open(path) as image:
                return "L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"
        except (OSError, ValueError, SyntaxError):
            continue
    return "RGB"


def load_image(path: str, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError, SyntaxError) as err:  # what PIL raises on bad or truncated files
        raise CorruptImageError(f"cannot read image {path}: {err}") from err


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shrink the shorter side to `size` and crop the centre square, as DiT does. Smaller images
    are never enlarged: they are padded with black instead (28x28 Fashion-MNIST -> 32x32), which
    keeps their pixels exact."""
    if min(image.size) > size:
        scale = size / min(image.size)
        new_size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return TF.center_crop(image, [size, size])


class ImageDataset(Dataset):
    """Image files with one condition each; yields (image tensor in [-1, 1], condition)."""

    def __init__(self, samples: list[tuple[str, Condition]], image_size: int, mode: str):
        self.samples, self.image_size, self.mode = list(samples), image_size, mode

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Condition]:
        path, condition = self.samples[index]
        image = center_crop(load_image(path, self.mode), self.image_size)
        return TF.normalize(TF.to_tensor(image), [0.5], [0.5]), condition

    def remove_corrupt(self) -> list[str]:
        """Decode every file once and drop those that fail; returns their paths. The processes
        share the work and agree on the result, so every process keeps the same sample list."""
        state = PartialState()
        bad = []
        for path, _ in self.samples[state.process_index :: state.num_processes]:
            try:
                load_image(path, self.mode)
            except CorruptImageError:
                bad.append(path)
        bad = sorted(gather_object(bad))
        drop = set(bad)
        self.samples = [s for s in self.samples if s[0] not in drop]
        if not self.samples:
            raise DataError("every image file is corrupt")
        return bad


def build_dataset(
    data_path: str | Path, split: str, image_size: int, channels: int | None
) -> tuple[ImageDataset, list[str]]:
    """The train or val split and its class names ([] for COCO or a flat folder). channels=None
    reads grayscale data as one channel and anything else as RGB."""
    if is_coco(data_path):
        samples, classes = coco_samples(data_path, split), []
    else:
        samples, classes = image_folder_samples(data_path, split)
    mode = image_mode(samples) if channels is None else {1: "L", 3: "RGB"}[channels]
    return ImageDataset(samples, image_size, mode), classes


def collate(batch: list[tuple[torch.Tensor, Condition]]) -> tuple[torch.Tensor, Condition]:
    """Stack images; class indices become a LongTensor, caption lists stay a list of lists."""
    images, conditions = zip(*batch, strict=True)
    if isinstance(conditions[0], int):
        return torch.stack(images), torch.tensor(conditions)
    return torch.stack(images), list(conditions)


#################################################################################
#                                Latent cache                                    #
#################################################################################


class LatentDataset(Dataset):
    """Pre-encoded latents (N, 2, C, h, w): each image and its mirror image, with its condition."""

    def __init__(self, latents: np.ndarray, conditions: list[Condition]):
        self.latents, self.conditions = latents, conditions

    def __len__(self) -> int:
        return len(self.conditions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Condition]:
        return torch.from_numpy(np.array(self.latents[index])), self.conditions[index]


def latent_cache_path(cache_dir: str | Path, dataset: ImageDataset, vae_name: str) -> Path:
    """One file per (image list, size, VAE): a changed data set or setting gets a new file."""
    key = json.dumps([vae_name, dataset.image_size, dataset.mode, [p for p, _ in dataset.samples]])
    return Path(cache_dir) / f"latents-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"


@torch.no_grad()
def cache_latents(
    dataset: ImageDataset, vae, path: Path, batch_size: int, num_workers: int, seed: int
) -> LatentDataset:
    """Encode every image and its horizontal flip once (flipping must happen before the VAE, as in
    DiT's feature extraction) into a .npy file read back memory-mapped, so data sets larger than
    RAM work. The processes encode disjoint shards into one file, written under a temporary name
    and renamed when complete. The VAE posterior is sampled once per image, with a fixed seed."""
    state = PartialState()
    conditions = [condition for _, condition in dataset.samples]
    if not path.exists():
        tmp = path.with_name(f".tmp-{path.name}")
        if state.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            size = dataset.image_size // vae_downsample_factor(vae)
            shape = (len(dataset), 2, vae.config.latent_channels, size, size)
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape).flush()
        state.wait_for_everyone()
        latents = np.load(tmp, mmap_mode="r+")
        shard = list(range(state.process_index, len(dataset), state.num_processes))
        loader = DataLoader(
            torch.utils.data.Subset(dataset, shard),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate,
        )
        with torch.random.fork_rng(devices=[state.device] if state.device.type == "cuda" else []):
            torch.manual_seed(seed + state.process_index)
            done = 0
            for images, _ in loader:
                images = images.to(state.device)
                z = encode_images(vae, torch.cat([images, images.flip(-1)]))
                pairs = torch.stack(z.chunk(2), dim=1).float().cpu().numpy()
                latents[shard[done : done + len(images)]] = pairs
                done += len(images)
        latents.flush()
        del latents
        state.wait_for_everyone()
        if state.is_main_process:
            os.replace(tmp, path)
        state.wait_for_everyone()
    return LatentDataset(np.load(path, mmap_mode="r"), conditions)


#################################################################################
#                 Per-sample randomness (drawn in the training loop)             #
#################################################################################


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image of a (B, C, H, W) batch with probability 1/2."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_view(pairs: torch.Tensor) -> torch.Tensor:
    """From cached (B, 2, C, h, w) latent pairs (image, mirror image) pick one per sample."""
    flip = (torch.rand(pairs.shape[0], device=pairs.device) < 0.5).long()
    return pairs[torch.arange(pairs.shape[0], device=pairs.device), flip]


def drop_labels(labels: torch.Tensor, num_classes: int, drop_prob: float) -> torch.Tensor:
    """Replace labels by the null class `num_classes` with probability drop_prob, so the model
    also learns the unconditional prediction classifier-free guidance needs."""
    drop = torch.rand(labels.shape[0], device=labels.device) < drop_prob
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def pick_captions(caption_lists: list[list[str]], drop_prob: float) -> list[str]:
    """One caption chosen at random for each image (the released code drew one index for the whole
    batch), replaced by the empty caption with probability drop_prob for guidance."""
    picks = torch.rand(len(caption_lists)).tolist()
    drops = (torch.rand(len(caption_lists)) < drop_prob).tolist()
    return [
        "" if drop else captions[int(pick * len(captions))]
        for captions, pick, drop in zip(caption_lists, picks, drops, strict=True)
    ]
