"""The Fashion-MNIST experiment: its classifier as a Frechet-distance feature extractor, and the
study's helpers and its --quick mode end to end (train.py, sample.py, both distances,
the report, reruns)."""

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


def test_budgets_are_equal_time_in_each_models_steps():
    args = fashion_mnist.parse_args(["--budget-minutes", "4", "--budgets-of", "1", "2", "4"])
    assert fashion_mnist.budget_steps(args, 0.3) == [200, 400, 800]  # 60 s / 0.3 s = 200
    assert fashion_mnist.budget_steps(args, 0.5) == [120, 240, 480]
    with pytest.raises(SystemExit):
        fashion_mnist.parse_args(["--budgets-of", "2", "1"])


def test_welch_t_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = [70.1, 74.3, 72.0], [80.2, 77.9, 85.0, 79.5]
    expected = stats.ttest_ind(a, b, equal_var=False).statistic
    assert fashion_mnist.welch_t(a, b) == pytest.approx(expected, rel=1e-12)


def test_training_folder_leaves_out_the_held_out_images(tmp_path):
    for index in (0, 58_999, 59_000, 59_999):
        image = tmp_path / "src" / "train" / f"c{index % 2}" / f"{index:05d}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"png")
    args = fashion_mnist.parse_args(["--data-path", str(tmp_path / "src"), "--work-dir",
                                     str(tmp_path / "work"), "--held-out", "1000"])
    out = fashion_mnist.training_folder(args)
    assert sorted(p.name for p in (out / "train").glob("*/*.png")) == ["00000.png", "58999.png"]
    assert fashion_mnist.training_folder(args) == out  # a rerun finds the links in place


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_SOURCE.is_dir(), reason="needs dataset-fashion-mnist")
def test_quick_study_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "MODELS", {"USM-T/4": ("USM-T/4", [])})  # one is enough
    data = export_fashion_mnist(tmp_path / "data", limit_per_class=2)
    argv = ["--quick", "--data-path", str(data), "--work-dir", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"), "--parallel", "2"]
    fashion_mnist.main(argv)

    result = json.loads((tmp_path / "out" / "fashion_mnist.json").read_text())
    steps = result["steps"]["USM-T/4"]
    assert steps == [1, 2]  # --quick: budgets of one and two steps
    sweep = result["sweep"]
    assert [r["lr"] for r in sweep] == [1e-3, 3e-3] and all(r["step"] == 2 for r in sweep)
    assert result["lr"]["USM-T/4"] == min(sweep, key=lambda r: r["classifier"])["lr"]
    runs = result["runs"]  # 2 seeds x 2 budgets, at the chosen rate, scored on test images
    assert sorted((r["seed"], r["step"]) for r in runs) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(r["lr"] == result["lr"]["USM-T/4"] for r in runs)
    for row in result["table"]:
        scores = [r["classifier"] for r in runs if r["step"] == row["steps"]]
        assert row["classifier"][0] == pytest.approx(np.mean(scores))
        assert row["classifier"][1] == pytest.approx(np.std(scores, ddof=1))
        assert math.isfinite(row["fid"][0]) and row["fid"][0] > 0
    # the trainings read the train split less the held-out images
    assert all("--data-path " + str(tmp_path / "work" / "data") in r["train_command"]
               for r in runs)
    with Image.open(tmp_path / "out" / "fashion_mnist.png") as plot:
        assert plot.width > 500
    with Image.open(tmp_path / "out" / result["grids"]["USM-T/4"]) as grid:  # a row per class
        assert grid.height > 9 * grid.width
    assert "| USM-T/4 |" in (tmp_path / "out" / "fashion_mnist.md").read_text()

    fashion_mnist.main(argv)  # a rerun reuses every training, sample and score
    logs = "".join(p.read_text() for p in (tmp_path / "work").glob("*/commands.log"))
    assert logs.count("train.py") == 3 and logs.count("sample.py") == 5
    assert json.loads((tmp_path / "out" / "fashion_mnist.json").read_text())["runs"] == runs
