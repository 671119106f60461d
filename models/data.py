"""Image datasets for the autoencoders: CIFAR-10, SVHN, local folders / .npz files, the bundled sample.

Every dataset yields ``(image, label)`` with ``image`` a float32 tensor (3, 32, 32) in [0, 1] and
``label`` an int (-1 where the source has none). CIFAR-10 and SVHN are read through torchvision and
then held in memory as uint8, which trains several times faster than decoding PIL images per item.

Sources (:func:`load_dataset`):

* ``"cifar10"``: torchvision's CIFAR-10 under ``root``; downloaded when missing and the network allows,
  otherwise the bundled 2,000 / 500 image sample is used instead, with a warning saying so.
* ``"svhn"``: torchvision's SVHN (``train`` / ``test`` split) under ``root``; no fallback.
* ``"sample"``: the bundled CIFAR-10 sample (``models/assets/cifar10_sample_2k.npz``).
* ``"synthetic"``: procedurally generated smooth colour images (no files needed).
* a path to an ``.npz`` file with ``x`` (N, 32, 32, 3) uint8 and optional ``y`` (or ``x_train`` /
  ``x_test`` pairs, chosen by ``train``), or to a folder in torchvision ``ImageFolder`` layout
  (``root/class_name/image.png``; images are converted to RGB and resized to 32 x 32). Only an ``.npz``
  with ``x_test`` has a test split of its own (:func:`has_test_split`); for one with only ``x`` and for
  a folder ``train=False`` gives the same images as ``train=True``.
"""

from __future__ import annotations

import logging
import os
import socket
import zipfile
import zlib
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = [
    "ImageArrayDataset",
    "SAMPLE_PATH",
    "DatasetUnavailable",
    "load_dataset",
    "load_npz",
    "load_image_folder",
    "load_cifar10",
    "load_svhn",
    "synthetic_images",
    "describe_source",
    "dataset_label",
    "has_test_split",
    "source_of",
]

log = logging.getLogger("vqfast.models")

SAMPLE_PATH = Path(__file__).resolve().parent / "assets" / "cifar10_sample_2k.npz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Long enough for a slow mirror, short enough that an offline machine falls back quickly.
_DOWNLOAD_TIMEOUT_S = 30.0
BUILTIN_SOURCES = ("cifar10", "svhn", "sample", "synthetic")
IMAGE_SHAPE_HWC = (32, 32, 3)


_WARNED: set[str] = set()  # fallback warnings already given in this process


class DatasetUnavailable(RuntimeError):
    """A dataset could neither be found on disk nor downloaded."""


_INT64_MAX = int(np.iinfo(np.int64).max)


def _native_byte_order(array: np.ndarray) -> np.ndarray:
    """``array`` in this machine's byte order: torch refuses big-endian arrays (as written on another
    machine, or with dtype '>i8') with a message that names neither the file nor the array."""
    if array.dtype.isnative:
        return array
    return array.astype(array.dtype.newbyteorder("="))


class ImageArrayDataset(Dataset):
    """In-memory uint8 images (N, 3, H, W) + integer labels, served as float tensors in [0, 1]."""

    def __init__(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None,
                 channels_last: bool = False, name: str = "images", classes: tuple[str, ...] | None = None) -> None:
        images = torch.as_tensor(_native_byte_order(np.asarray(images)))
        if channels_last:
            images = images.permute(0, 3, 1, 2)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name}: expected RGB images (N, 3, H, W) or (N, H, W, 3), got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"{name}: expected uint8 pixels, got {images.dtype}")
        self.images = images.contiguous()
        if labels is None:
            self.labels = torch.full((len(images),), -1, dtype=torch.int64)
        else:
            labels = _native_byte_order(np.asarray(labels))
            if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
                raise ValueError(f"{name}: labels must be integers, got {labels.dtype}")
            # Labels are held as int64: larger unsigned ones would wrap round to negative numbers.
            if labels.dtype.kind == "u" and labels.size and int(labels.max()) > _INT64_MAX:
                raise ValueError(f"{name}: labels must fit in a 64-bit signed integer (at most {_INT64_MAX}), "
                                 f"got {int(labels.max())}; number the classes from 0")
            # One label per image. (N, 1) is how Keras's CIFAR-10 stores them; anything else flattened
            # was reported as a count mismatch ("10 images but 20 labels" for (10, 2)).
            if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
                raise ValueError(f"{name}: labels must be one integer per image, shape (N,) (or (N, 1)), got "
                                 f"shape {labels.shape}")
            self.labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
            if len(self.labels) != len(images):
                raise ValueError(f"{name}: {len(images)} images but {len(self.labels)} labels")
            if self.labels.numel() and int(self.labels.min()) < -1:
                raise ValueError(f"{name}: labels must be class numbers >= 0, or -1 for an image without one, got "
                                 f"{int(self.labels.min())}")
        self.name = name
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A DataLoader batch in one indexing and one conversion (per-image ``__getitem__`` calls took
        a third of a second per 10,000 images, about as long as a GPU epoch of the VQ-VAE)."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images.index_select(0, index).float().div_(255.0)
        return list(zip(images.unbind(0), self.labels.index_select(0, index).tolist()))

    def __repr__(self) -> str:
        return f"ImageArrayDataset({self.name}, n={len(self)})"


def _npz_arrays(path: Path, train: bool) -> tuple[str, np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    try:
        return _read_npz(path, train)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path} is not a readable .npz file ({_error_name(exc)}: {exc})") from None


def _error_name(exc: BaseException) -> str:
    """``zlib.error``, ``zipfile.BadZipFile``, ``OSError``: ``exc``'s class, with its module unless built in."""
    cls = type(exc)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError:  # numpy's message here is about unpickling, which is never done
        raise ValueError(f"{path} is not an .npz archive") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an .npz archive (it holds a single array)")
    return archive


def _npz_array(data: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        array = data[key]
    except ValueError as exc:
        if _is_object_array(data, key):  # loading it would mean unpickling, which is never done
            raise ValueError(f"{path}: {key!r} is an object array ({exc}); store numbers (images as uint8) "
                             f"and class names as strings") from None
        raise ValueError(f"{path}: the array {key!r} is damaged ({exc}); write the file again") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        # Compressed members are only decompressed (and their checksums checked) when read.
        raise ValueError(f"{path}: the array {key!r} is damaged ({_error_name(exc)}: {exc}); write the file "
                         f"again") from None
    if not isinstance(array, np.ndarray):
        # numpy hands back the raw bytes of a member that is not in .npy format.
        raise ValueError(f"{path}: {key!r} is not a NumPy array (its entry in the archive is not in .npy "
                         f"format); write the file with numpy.savez or numpy.savez_compressed")
    return array


def _is_object_array(data: np.lib.npyio.NpzFile, key: str) -> bool:
    """Whether the .npy header of ``key`` in ``data`` declares a dtype holding Python objects (False
    where the header itself cannot be read)."""
    member = f"{key}.npy" if f"{key}.npy" in data.zip.namelist() else key
    try:
        with data.zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            _, _, dtype = read_header(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error):  # damaged, not an object array
        return False
    return bool(dtype.hasobject)


def _class_names(data: np.lib.npyio.NpzFile, path: Path) -> tuple[str, ...]:
    names = _npz_array(data, "class_names", path)
    if names.ndim != 1:
        raise ValueError(f"{path}: 'class_names' must be a 1-D array of names, one per class, got shape "
                         f"{names.shape}; store it as e.g. np.array(['cat', 'dog'])")
    return tuple(str(c) for c in names)


def _read_npz(path: Path, train: bool) -> tuple[str, np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    with _open_npz(path) as data:
        keys = set(data.files)
        split, other = ("train", "test") if train else ("test", "train")
        if f"x_{split}" in keys:
            key = f"x_{split}"
            if f"y_{split}" not in keys and "y" in keys and "x" not in keys:
                # Labels under a bare 'y' beside split images (and no 'x' of their own) would be silently dropped.
                raise ValueError(f"{path} has images in 'x_{split}' and labels in 'y': name the labels of each "
                                 f"split after its images ('y_train', 'y_test'), or store one set as 'x' and 'y'")
            y = _npz_array(data, f"y_{split}", path) if f"y_{split}" in keys else None
        elif "x" in keys:
            key = "x"
            y = _npz_array(data, "y", path) if "y" in keys else None
        elif f"x_{other}" in keys:
            raise ValueError(f"{path} has 'x_{other}' but no 'x_{split}' array")
        else:
            raise ValueError(f"{path}: expected arrays 'x' (N, 32, 32, 3) uint8 and 'y', found {sorted(keys)}")
        x = _npz_array(data, key, path)
        classes = _class_names(data, path) if "class_names" in keys else None
    return key, x, y, classes


def load_npz(path: str | Path, train: bool = True) -> ImageArrayDataset:
    """Images from an ``.npz`` with ``x`` (N, 32, 32, 3) uint8 and ``y`` (N,), or ``x_train``/``x_test``."""
    path = Path(path)
    key, x, y, classes = _npz_arrays(path, train)
    # The models' fully connected layers and the per-pixel metrics are built for 32 x 32 RGB.
    if x.ndim == 4 and x.shape[1:] == (IMAGE_SHAPE_HWC[2], *IMAGE_SHAPE_HWC[:2]):
        raise ValueError(f"{path}: {key!r} holds channels-first images, shape {tuple(x.shape)}; store them "
                         f"channels-last, (N, 32, 32, 3), e.g. as x.transpose(0, 2, 3, 1)")
    if x.ndim == 3 and x.shape[1:] == IMAGE_SHAPE_HWC[:2] or x.ndim == 4 and x.shape[1:] == (*IMAGE_SHAPE_HWC[:2], 1):
        raise ValueError(f"{path}: {key!r} holds greyscale images, shape {tuple(x.shape)}; the models take RGB, "
                         f"(N, 32, 32, 3): repeat the channel, e.g. np.repeat(x.reshape(len(x), 32, 32, 1), 3, "
                         f"axis=3) (an ImageFolder directory is converted automatically)")
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE_HWC:
        raise ValueError(f"{path}: {key!r} must hold 32 x 32 RGB images, shape (N, 32, 32, 3), got "
                         f"{tuple(x.shape)}; the models take 32 x 32 inputs, so resize the images first (an "
                         f"ImageFolder directory is resized automatically)")
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: {key!r} must be uint8, got {x.dtype}")
    return ImageArrayDataset(x, y, channels_last=True, name=str(path), classes=classes)


def has_test_split(source: str | Path) -> bool:
    """Whether ``source`` has held-out test images of its own.

    An ``.npz`` with only ``x`` (or only ``x_train``) and an ImageFolder directory have one set of images:
    ``load_dataset(source, train=False)`` returns those same images (or fails), not held-out ones.
    """
    src = checked_source(source)
    if src in BUILTIN_SOURCES:
        return True
    path = Path(src).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz":
        try:
            with _open_npz(path) as data:
                return "x_test" in data.files
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error):
            return False  # unreadable: loading it reports why
    return False


def load_image_folder(path: str | Path, size: int = 32) -> Dataset:
    """A torchvision ``ImageFolder`` (``path/class/img.ext``), resized to ``size`` x ``size``, as tensors."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    _refuse_link_loops(Path(path))
    try:
        folder = datasets.ImageFolder(str(path), transform=transform, loader=_load_rgb)
    except FileNotFoundError as exc:
        raise ValueError(_image_folder_problem(Path(path), exc)) from None
    # Every file's header is read now (a few seconds for 50,000 images), so that an unreadable file
    # stops the run before training rather than in the middle of an epoch.
    for file, _ in folder.samples:
        try:
            with _open_image(file) as img:  # parses the header only; its own refusals name the file
                # Pixels of a signed or 32-bit integer image may lie outside what _load_rgb can scale: those
                # (rare) images are decoded now, so that such a file stops the run here, not mid-epoch.
                if img.mode.startswith("I") and img.mode not in _UNSIGNED_16_BIT_MODES:
                    _integer_pixels(img, file)
        except OSError as exc:
            raise ValueError(f"{file} is not a readable image ({exc}); remove it or replace it") from None
    return folder


def _refuse_link_loops(root: Path) -> None:
    """Refuse a symbolic link below ``root`` to a folder that leads back to the link (e.g. ``a/loop -> ..``).

    torchvision follows links to folders: through such a loop it read each image once per pass, until
    the path grew too long (1 image became 41 samples), and with two such links the walk took
    exponential time. Links to files, and to folders elsewhere, are kept.
    """
    def walk(folder: str, walked: tuple[str, ...]) -> None:
        # ``walked``: the real paths of the folders that lead from ``root`` down to ``folder``.
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return  # skipped, as os.walk (which torchvision uses) skips a folder it cannot list
        for entry in entries:
            try:
                if not entry.is_dir():
                    continue
                is_link = entry.is_symlink()
            except OSError:
                continue
            real = os.path.realpath(entry.path)
            # A link to a folder that is, or holds, one of those being walked reaches this link again.
            if is_link and any(os.path.commonpath((real, w)) == real for w in walked):
                raise ValueError(f"{entry.path} is a symbolic link to {real}, a folder that leads back to the "
                                 f"link (a loop: the images there would be read again and again); remove the "
                                 f"link or point it elsewhere")
            walk(entry.path, (*walked, real))

    if root.is_dir():
        walk(str(root), (os.path.realpath(root),))


# PIL modes of unsigned 16-bit greyscale, whose every value _load_rgb can scale to 8 bits.
_UNSIGNED_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _integer_pixels(img, path: str) -> np.ndarray:
    """The pixels of an integer greyscale image (PIL mode I...), refused outside the 16-bit range."""
    pixels = np.asarray(img, dtype=np.float64)
    if pixels.max(initial=0) > 65535 or pixels.min(initial=0) < 0:
        raise ValueError(f"{path}: integer pixels outside the 16-bit range (0 to 65535); rescale it or remove it")
    return pixels


def _image_folder_problem(path: Path, exc: FileNotFoundError) -> str:
    """What is wrong with ``path``, whose loading as an ImageFolder raised ``exc``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

    layout = (f"An image folder needs ImageFolder layout, the images in subfolders (one per class, e.g. "
              f"{path / 'all' / 'img.png'}), not at its top")
    try:
        classes, _ = find_classes(str(path))
    except FileNotFoundError:
        # torchvision's "Couldn't find any class folder" does not say what layout it wanted; a folder of
        # images without class folders is the common case.
        return f"{path}: {exc} {layout}"

    def holds_images(folder: Path) -> bool:
        # As torchvision looks for them: anywhere below the class folder, by extension.
        return any(has_file_allowed_extension(name, IMG_EXTENSIONS)
                   for _, _, names in os.walk(folder, followlinks=True) for name in names)

    empty = [c for c in classes if not holds_images(path / c)]
    if not empty:
        return f"{path}: {exc}"
    # torchvision joins the class names with ", ", which a name may itself contain.
    names = ", ".join(repr(c) for c in empty)
    msg = (f"{path}: the class folder{'s' if len(empty) > 1 else ''} {names} hold{'' if len(empty) > 1 else 's'} "
           f"no image with a supported extension ({', '.join(IMG_EXTENSIONS)}); every class folder needs at least "
           f"one image: add images or remove {'those folders' if len(empty) > 1 else 'that folder'}")
    if any(p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS) for p in path.iterdir()):
        msg += f". {layout}"
    return msg


def _open_image(path: str):
    """``PIL.Image.open(path)``, refusing what the loader cannot turn into 8-bit RGB: a floating-point
    image, and one over PIL's size limit (its error is not an OSError, so the CLI would show a
    traceback)."""
    from PIL import Image

    try:
        img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if img.mode == "F":
        img.close()
        raise ValueError(f"{path}: floating-point images are not supported; save it with 8-bit pixels")
    return img


def _load_rgb(path: str):
    """An image file as 8-bit RGB. 16-bit greyscale (PIL modes I;16 / I) is scaled down to 8 bits: PIL's
    own conversion clips it, which turned almost every pixel of such an image white."""
    from PIL import Image

    with _open_image(path) as img:
        try:
            if img.mode.startswith("I"):
                img = Image.fromarray(np.round(_integer_pixels(img, path) / 257.0).astype(np.uint8))
            return img.convert("RGB")
        except OSError as exc:
            # Damage past the header shows only here, mid-training: PIL's message does not say which file.
            raise ValueError(f"{path}: {exc}; remove or replace this image") from None


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


# Downloads that already failed in this process, by (dataset, root): a run loads its training and
# test splits separately and should not wait for (and report) the same network failure twice.
_FAILED_DOWNLOADS: dict[tuple[str, str], str] = {}


def _open_torchvision(factory, name: str, root: Path, download: bool):
    """``factory(download=False)``; if the files are missing and ``download``, retry with download."""
    try:
        return factory(download=False)
    except RuntimeError:
        if not download:
            # Not torchvision's text: it says "use download=True", a Python argument, to people on the
            # command line, where the setting is --no-download.
            raise DatasetUnavailable(f"{name} is not under {root} (or is damaged there) and downloading is off "
                                     "(--no-download)") from None
    key = (name.split(" ")[0], str(root.resolve()))
    if key in _FAILED_DOWNLOADS:
        raise DatasetUnavailable(_FAILED_DOWNLOADS[key])
    root_existed = root.exists()
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            return factory(download=True)
    except Exception as exc:  # urllib, socket, SSL and checksum errors all mean "not available here"
        message = f"{name} is not under {root} (or is damaged there) and could not be downloaded: {type(exc).__name__}: {exc}"
        _FAILED_DOWNLOADS[key] = message
        if not root_existed:
            # The download made the folder; a failed one leaves nothing behind (rmdir: only if empty).
            with suppress(OSError):
                root.rmdir()
        raise DatasetUnavailable(message) from exc


def load_cifar10(root: str | Path = "data", train: bool = True, download: bool = True) -> ImageArrayDataset:
    """CIFAR-10 through ``torchvision.datasets.CIFAR10`` (raises :class:`DatasetUnavailable`)."""
    from torchvision import datasets

    root = Path(root).expanduser()
    ds = _open_torchvision(lambda download: datasets.CIFAR10(str(root), train=train, download=download),
                           "CIFAR-10", root, download)
    return ImageArrayDataset(ds.data, ds.targets, channels_last=True,
                             name=f"cifar10-{'train' if train else 'test'}", classes=tuple(ds.classes))


def load_svhn(root: str | Path = "data", train: bool = False, download: bool = True) -> ImageArrayDataset:
    """SVHN through ``torchvision.datasets.SVHN`` (``train`` or ``test`` split; digit 0 has label 0)."""
    from torchvision import datasets

    root = Path(root).expanduser()
    split = "train" if train else "test"
    mat_file = root / f"{split}_32x32.mat"
    try:
        ds = _open_torchvision(lambda download: datasets.SVHN(str(root), split=split, download=download),
                               f"SVHN ({split})", root, download)
    except ValueError as exc:  # torchvision's reordering of an 'X' that is not 4-D
        raise ValueError(f"{mat_file}: {exc}; expected SVHN's layout, 'X' of shape (32, 32, 3, N)") from None
    # torchvision reorders 'X' (H, W, 3, N) to (N, 3, H, W) without looking at its size.
    if ds.data.shape[1:] != (IMAGE_SHAPE_HWC[2], *IMAGE_SHAPE_HWC[:2]):
        n, c, h, w = ds.data.shape
        raise ValueError(f"{mat_file}: 'X' must hold 32 x 32 RGB images, shape (32, 32, 3, N), got {(h, w, c, n)}; "
                         f"the models take 32 x 32 inputs")
    return ImageArrayDataset(ds.data, ds.labels, name=f"svhn-{split}", classes=tuple(str(i) for i in range(10)))


def synthetic_images(n: int = 512, seed: int = 0, size: int = 32) -> ImageArrayDataset:
    """Smooth random images: a colour gradient plus a few soft discs, labelled by disc count - 1.

    Deterministic for a given ``seed``; meant for smoke runs where no image files are available.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = torch.empty(n, 3, size, size)
    labels = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        angle = torch.rand((), generator=g) * 6.2832
        t = (torch.cos(angle) * xx + torch.sin(angle) * yy + 1.5) / 3.0
        img = c0 * (1 - t) + c1 * t
        k = int(torch.randint(1, 4, (), generator=g))
        for _ in range(k):
            cx, cy = torch.rand(2, generator=g)
            radius = 0.1 + 0.2 * torch.rand((), generator=g)
            mask = torch.sigmoid((radius - ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()) * 40.0)
            img = img * (1 - mask) + torch.rand(3, 1, 1, generator=g) * mask
        images[i] = img
        labels[i] = k - 1
    as_uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageArrayDataset(as_uint8, labels, name=f"synthetic-{seed}")


def load_sample(train: bool = True) -> ImageArrayDataset:
    """The bundled CIFAR-10 sample: 2,000 training and 500 test images."""
    ds = load_npz(SAMPLE_PATH, train=train)
    ds.name = f"cifar10-sample-{'train' if train else 'test'}"
    return ds


def dataset_label(ds: Dataset, source: str = "") -> str:
    """What a dataset really is (e.g. ``cifar10-sample-train`` after a fallback), for logs and titles."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    name = getattr(ds, "name", None)
    if name:
        return Path(name).name if "/" in str(name) else str(name)
    root = getattr(ds, "root", None)
    return Path(root).name if root else (describe_source(source) if source else type(ds).__name__)


def describe_source(source: str) -> str:
    """A short, file-name-safe label for a data source (used in output file names)."""
    source = checked_source(source)
    if source in BUILTIN_SOURCES:
        return source
    # Resolved: "." or "../imgs/" name no file ("eval--all.csv"), the folder they point at does.
    p = Path(source).expanduser().resolve()
    # A folder's whole name: "cats.2023" and "cats.2024" are two folders, not two files named "cats".
    return (p.name if p.is_dir() or not p.suffix else p.stem) or "data"


def checked_source(source: str | Path, option: str | None = None) -> str:
    """``source`` as a string, refused when empty: as a path, "" would mean the current folder.
    ``option``: the command-line option it came from, which the message names."""
    src = str(source)
    if not src.strip():
        what = f"{option} is empty ({src!r})" if option else f"empty data source {src!r}"
        raise ValueError(f"{what}: give cifar10, svhn, sample, synthetic, or the path of a folder of images or "
                         f"an .npz file ('.' for the current folder)")
    return src


def _unwrapped(ds: Dataset) -> tuple[Dataset, list[int] | range]:
    """The dataset under ``ds``'s ``Subset``s, and the index there of each image of ``ds``."""
    index: list[int] | range = range(len(ds))
    while isinstance(ds, Subset):
        index = [int(ds.indices[i]) for i in index]
        ds = ds.dataset
    return ds, index


def source_indices(ds: Dataset) -> list[int]:
    """The index of each image of ``ds`` in the set it was cut from by ``Subset`` (``limit`` of a folder,
    :func:`evenly_spaced`): an .npz's row, a folder's position in its sorted file list."""
    return list(_unwrapped(ds)[1])


def image_files(ds: Dataset) -> list[str] | None:
    """The file each image of ``ds`` was read from (its path inside the folder), for a folder source
    (``ImageFolder``, possibly cut by ``Subset``); None for sources that are not files (arrays)."""
    ds, index = _unwrapped(ds)
    samples = getattr(ds, "samples", None)
    root = getattr(ds, "root", None)
    if samples is None or root is None:
        return None
    return [os.path.relpath(samples[i][0], root) for i in index]


def source_of(ds: Dataset, source: str) -> str:
    """The source ``ds`` really came from: ``"sample"`` where ``"cifar10"`` fell back to the bundled sample."""
    base = ds
    while isinstance(base, Subset):
        base = base.dataset
    if str(source) == "cifar10" and str(getattr(base, "name", "")).startswith("cifar10-sample"):
        return "sample"
    return str(source)


def load_dataset(source: str = "cifar10", train: bool = True, root: str | Path = "data", download: bool = True,
                 limit: int | None = None, seed: int = 0, fallback: bool = True) -> Dataset:
    """The dataset named by ``source`` (see the module docstring), optionally cut to ``limit`` images.

    ``fallback``: when CIFAR-10 is neither on disk nor downloadable, warn and use the bundled sample
    rather than fail, so training runs on any machine. ``limit`` keeps the first ``limit`` images of
    CIFAR-10, SVHN, the sample and .npz files (stored in no particular class order), and ``limit``
    evenly spaced ones of a folder, whose images come sorted by class (the first ones would be one class).
    """
    src = checked_source(source)
    by_class = False  # a folder's images come sorted by class
    if src == "cifar10":
        try:
            ds: Dataset = load_cifar10(root, train=train, download=download)
        except DatasetUnavailable as exc:
            if not fallback:
                raise
            if str(exc) in _WARNED:
                log.info("CIFAR-10 unavailable: using the bundled sample")
            else:
                _WARNED.add(str(exc))
                log.warning("%s\n-> using the bundled CIFAR-10 sample instead (%s): 2,000 training / 500 "
                            "test images; numbers are not comparable with full CIFAR-10 runs.", exc,
                            SAMPLE_PATH.name)
            ds = load_sample(train)
    elif src == "svhn":
        ds = load_svhn(root, train=train, download=download)
    elif src == "sample":
        ds = load_sample(train)
    elif src == "synthetic":
        n = 2048 if train else 512
        ds = synthetic_images(n if limit is None else max(1, min(n, limit)), seed=seed if train else seed + 1)
    else:
        path = Path(src).expanduser()
        if path.is_dir():
            ds = load_image_folder(path)
            by_class = True
        elif path.is_file() and path.suffix.lower() == ".npz":
            ds = load_npz(path, train=train)
        elif path.exists():
            raise ValueError(f"{src}: expected a folder of images (ImageFolder layout) or an .npz file")
        else:
            raise FileNotFoundError(f"data source {src!r} is neither cifar10, svhn, sample, synthetic, "
                                    f"nor an existing folder / .npz file")
    if len(ds) == 0:
        raise ValueError(f"data source {src!r} has no images")
    if limit is not None and limit < len(ds):
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        ds = evenly_spaced(ds, limit) if by_class else Subset(ds, range(limit))
    return ds


def evenly_spaced(ds: Dataset, n: int) -> Dataset:
    """``n`` images of ``ds`` spread evenly over it (``n`` < ``len(ds)``): a folder lists its classes in
    turn, so its first ``n`` images could be one class."""
    return Subset(ds, [i * len(ds) // n for i in range(n)])
