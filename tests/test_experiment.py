"""The Fashion-MNIST experiment: its classifier as a Frechet-distance feature extractor, and the
script's --quick mode end to end (train.py, sample.py, both distances, the report, reruns)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from download import FASHION_MNIST_SOURCE, export_fashion_mnist
from evaluate_fid import compute_statistics, frechet_distance
from experiments import fashion_mnist
from experiments.classifier import FEATURE_DIM, accuracy, train_classifier


def two_class_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 28x28 images: class 0 has a bright left half, class 1 a bright right half."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, :, :, 14 * label:14 * label + 14] += 180
    return images, labels


def test_classifier_learns_and_its_features_separate_sets():
    images, labels = two_class_images(256, seed=0)
    test, test_labels = two_class_images(100, seed=1)
    model = train_classifier(images, labels, epochs=3, batch_size=32)
    assert accuracy(model, test, test_labels) > 0.95

    mu, sigma = compute_statistics(test, model.features)
    assert mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM)
    same = frechet_distance(*compute_statistics(two_class_images(100, seed=2)[0], model.features),
                            mu, sigma)
    only_class_0 = compute_statistics(two_class_images(200, seed=3)[0][::2], model.features)
    assert same < 0.2 * frechet_distance(*only_class_0, mu, sigma)  # a missing class is seen


@pytest.mark.skipif(not FASHION_MNIST_SOURCE.is_dir(), reason="needs dataset-fashion-mnist")
def test_quick_experiment_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "RUNS", {"USM-T/2": ("USM-T/2", [])})  # one run is enough
    data = export_fashion_mnist(tmp_path / "data", limit_per_class=2)
    argv = ["--quick", "--data-path", str(data), "--work-dir", str(tmp_path / "work"),
            "--out", str(tmp_path / "out")]
    fashion_mnist.main(argv)

    result = json.loads((tmp_path / "out" / "fashion_mnist.json").read_text())
    (run,) = result["runs"]
    assert run["params"] > 0 and run["gflops"] > 0
    assert math.isfinite(run["fid"]) and run["fid"] > 0 and run["fd_classifier"] > 0
    with Image.open(tmp_path / "out" / run["grid"]) as grid:  # one row per class, 1 column
        assert grid.height > 9 * grid.width
    assert "| USM-T/2 |" in (tmp_path / "out" / "fashion_mnist.md").read_text()
    with np.load(tmp_path / "work" / "usm-t-2" / "samples-10.npz") as samples:
        assert samples["arr_0"].shape == (10, 32, 32, 3)

    fashion_mnist.main(argv)  # a rerun reuses the trained model, samples and scores
    log = (tmp_path / "work" / "usm-t-2" / "commands.log").read_text()
    assert log.count("train.py") == 1 and log.count("sample.py") == 1
    assert json.loads((tmp_path / "out" / "fashion_mnist.json").read_text())["runs"] == [run]
