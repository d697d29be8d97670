"""Data sets, per-sample randomness, the latent cache and the frozen encoders."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

import numpy as np
import pytest
import torch
from PIL import Image

from data import (
    CorruptImageError,
    DataError,
    build_dataset,
    cache_latents,
    collate,
    drop_labels,
    is_coco,
    latent_cache_path,
    pick_captions,
    random_flip,
    random_view,
)
from encoders import decode_latents, encode_images, load_text_encoder, load_vae
from tests.fixtures import (
    make_coco_folder,
    make_image_folder,
    save_tiny_clip,
    save_tiny_vae,
)


def test_image_folder_items_labels_and_range(tmp_path):
    root = make_image_folder(tmp_path, classes=("a", "b", "c"), per_class=2, size=12)
    dataset, classes = build_dataset(root, "train", image_size=8, channels=None)
    assert classes == ["a", "b", "c"] and len(dataset) == 6
    image, label = dataset[5]
    assert image.shape == (3, 8, 8) and label == 2
    assert image.min() >= -1 and image.max() <= 1
    images, labels = collate([dataset[0], dataset[3]])
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1]


def test_grayscale_is_detected_and_small_images_are_padded_not_enlarged(tmp_path):
    root = make_image_folder(tmp_path, classes=("x",), per_class=1, size=6, mode="L")
    dataset, _ = build_dataset(root, "train", image_size=8, channels=None)
    image, _ = dataset[0]
    assert image.shape == (1, 8, 8)
    pixels = np.asarray(Image.open(dataset.samples[0][0]), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(image[0, 1:7, 1:7], torch.from_numpy(pixels), atol=1e-6)
    assert (image[0, 0] == -1).all() and (image[0, :, -1] == -1).all()  # black border
    rgb, _ = build_dataset(root, "train", image_size=8, channels=3)
    assert rgb[0][0].shape == (3, 8, 8)


def test_large_images_are_resized_then_center_cropped(tmp_path):
    (tmp_path / "train").mkdir()
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, 8:24] = 255  # a white centre square between black side bands
    Image.fromarray(pixels).save(tmp_path / "train" / "wide.png")
    dataset, classes = build_dataset(tmp_path, "train", image_size=8, channels=None)
    assert classes == []  # a flat folder: one unnamed class
    image, label = dataset[0]
    assert label == 0 and image.shape == (3, 8, 8)
    assert image.min() > 0.5  # only the white centre survives (bicubic blurs its edge a bit)


def test_coco_items_hold_every_caption(tmp_path):
    root = make_coco_folder(tmp_path, n_train=3, n_val=1)
    dataset, classes = build_dataset(root, "train", image_size=8, channels=None)
    assert classes == [] and len(dataset) == 3
    image, captions = dataset[1]
    assert image.shape == (3, 8, 8)
    assert captions == [f"image 1 of train, caption number {j}" for j in range(3)]
    _, conditions = collate([dataset[0], dataset[1]])
    assert conditions[1] == captions


@pytest.mark.parametrize("classes, held_out", [
    (("cat", "dog", "wild"), "val"),   # AFHQ, afhq.zip: train/ and val/
    (("cat", "dog", "wild"), "test"),  # AFHQ v2, afhq_v2.zip: train/ and test/
    (("female", "male"), "val"),       # CelebA-HQ, celeba_hq.zip
])
def test_paper_image_folders_as_distributed(tmp_path, classes, held_out):
    root = make_image_folder(tmp_path, classes=classes, per_class=3, val_per_class=2, size=12,
                             held_out=held_out)
    train, names = build_dataset(root, "train", image_size=8, channels=None)
    val, _ = build_dataset(root, "val", image_size=8, channels=None)
    assert names == list(classes) and len(train) == 3 * len(classes)
    assert len(val) == 2 * len(classes)
    assert {Path(p).parent.parent.name for p, _ in val.samples} == {held_out}
    assert [label for _, label in val.samples] == [c for c in range(len(classes)) for _ in "ab"]


def test_coco_2014_as_distributed(tmp_path):
    root = make_coco_folder(tmp_path, n_train=3, n_val=2, layout="2014")
    assert is_coco(root)
    train, classes = build_dataset(root, "train", image_size=8, channels=None)
    val, _ = build_dataset(root, "val", image_size=8, channels=None)
    assert classes == [] and len(train) == 3 and len(val) == 2
    assert [Path(p).relative_to(root).as_posix() for p, _ in val.samples] == [
        "val2014/COCO_val2014_000000000100.jpg", "val2014/COCO_val2014_000000000101.jpg"]
    image, captions = train[2]
    assert image.shape == (3, 8, 8)
    assert captions == [f"image 2 of train, caption number {j}" for j in range(3)]
    (root / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(DataError, match="captions_val2014.json"):
        build_dataset(root, "val", image_size=8, channels=None)


def test_captions_are_drawn_per_image_and_dropped_for_guidance():
    torch.manual_seed(0)
    batch = [["a", "b", "c", "d"]] * 64
    picked = pick_captions(batch, drop_prob=0.0)
    assert len(picked) == 64 and set(picked) == {"a", "b", "c", "d"}  # not one caption per batch
    assert pick_captions(batch, drop_prob=1.0) == [""] * 64
    assert 0 < pick_captions(batch, drop_prob=0.5).count("") < 64


def test_label_dropout_uses_the_null_class():
    torch.manual_seed(0)
    labels = torch.arange(10).repeat(10)
    assert torch.equal(drop_labels(labels, 10, 0.0), labels)
    assert (drop_labels(labels, 10, 1.0) == 10).all()
    dropped = drop_labels(labels, 10, 0.5)
    kept = dropped != 10
    assert 0 < kept.sum() < 100 and torch.equal(dropped[kept], labels[kept])


def test_flips_are_per_image():
    torch.manual_seed(0)
    images = torch.randn(64, 3, 4, 4)
    flipped = random_flip(images)
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    pairs = torch.stack([images, images.flip(-1)], dim=1)
    view = random_view(pairs)
    same = (view == images).flatten(1).all(1)
    mirrored = (view == images.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_bad_folders_give_clear_messages(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(tmp_path / "missing", "train", 8, None)
    with pytest.raises(DataError, match="no train/ folder"):
        build_dataset(tmp_path, "train", 8, None)
    (tmp_path / "train" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        build_dataset(tmp_path, "train", 8, None)


def test_corrupt_files_are_named_or_removed(tmp_path):
    root = make_image_folder(tmp_path, classes=("a",), per_class=3)
    bad = root / "train" / "a" / "001.png"
    bad.write_bytes(b"not a png")
    dataset, _ = build_dataset(root, "train", 8, channels=None)
    with pytest.raises(CorruptImageError, match="001.png"):
        dataset[1]
    assert dataset.remove_corrupt() == [str(bad)]
    assert len(dataset) == 2 and all(dataset[i][0].shape == (3, 8, 8) for i in range(2))


def test_tiny_vae_round_trip_shapes(tmp_path):
    vae = load_vae(str(save_tiny_vae(tmp_path / "vae")), "cpu")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = encode_images(vae, x)
    assert z.shape == (2, 4, 4, 4)
    images = decode_latents(vae, z)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    assert load_vae("none", "cpu") is None


def test_text_encoder_gives_last_hidden_states(tmp_path):
    encoder = load_text_encoder(str(save_tiny_clip(tmp_path / "clip", hidden_size=32)), "cpu")
    states = encoder(["a red bird", "", "a red bird"])
    assert states.shape == (3, 77, 32) and encoder.hidden_size == 32
    assert torch.equal(states[0], states[2]) and not torch.equal(states[0], states[1])
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_latent_cache_holds_image_and_mirror_and_is_reused(tmp_path):
    vae = load_vae(str(save_tiny_vae(tmp_path / "vae")), "cpu")
    with torch.no_grad():  # a near-zero posterior variance makes the encoding deterministic
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30
    root = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2, size=32)
    dataset, _ = build_dataset(root, "train", image_size=32, channels=None)
    path = latent_cache_path(tmp_path / "cache", dataset, "tiny")
    cached = cache_latents(dataset, vae, path, batch_size=3, num_workers=0, seed=0)
    assert path.is_file() and len(cached) == 4
    pair, label = cached[3]
    assert pair.shape == (2, 4, 4, 4) and label == 1
    image = dataset[3][0][None]
    # the mirror image is flipped BEFORE encoding: not the mirror of the image's latents
    expected = torch.cat([encode_images(vae, image), encode_images(vae, image.flip(-1))])
    assert torch.allclose(pair, expected, atol=1e-5)
    assert not torch.allclose(pair[1], pair[0].flip(-1), atol=1e-3)
    mtime = path.stat().st_mtime_ns
    again = cache_latents(dataset, vae, path, batch_size=3, num_workers=0, seed=0)
    assert path.stat().st_mtime_ns == mtime and torch.equal(again[3][0], pair)
