"""Dataset loaders, exercised on small files written here in each dataset's own on-disk format."""

from __future__ import annotations

import logging
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from vqfast.models import data as data_mod
from vqfast.models.data import DatasetUnavailable, load_cifar10, load_dataset, load_npz, load_svhn


pytestmark = pytest.mark.usefixtures("single_thread")


def _images(n: int, seed: int) -> np.ndarray:
    """Random uint8 images (n, 32, 32, 3) with distinct channels (so a channel mix-up is visible)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _as_chw_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(2, 0, 1).float() / 255.0


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision verifies the md5 of the real archives' files; files written here only need to exist."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    def exists(fpath: str, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(svhn, "check_integrity", exists)


def _write_cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """CIFAR-10's python layout: pickled dicts with 'data' (N, 3072) as R, G, B planes and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for b in range(1, 6):
        x = _images(per_batch, seed=b)
        y = [(b + i) % 10 for i in range(per_batch)]
        planes = x.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {b} of 5", "data": planes, "labels": y,
                         "filenames": [f"img{b}_{i}.png" for i in range(per_batch)]}, f)
        train_x.append(x)
        train_y += y
    test_x = _images(per_batch, seed=99)
    test_y = [7] * per_batch
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1",
                     "data": test_x.transpose(0, 3, 1, 2).reshape(per_batch, 3072), "labels": test_y}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(data_mod.CIFAR10_CLASSES), "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f)
    return np.concatenate(train_x), train_y, test_x, test_y


def test_cifar10_python_batches_load_through_torchvision(tmp_path: Path, skip_md5: None) -> None:
    train_x, train_y, test_x, test_y = _write_cifar10(tmp_path)
    ds = load_cifar10(tmp_path, train=True, download=False)
    assert len(ds) == 15 and ds.classes[0] == "airplane"
    for i in (0, 7, 14):
        img, label = ds[i]
        assert img.dtype == torch.float32 and img.shape == (3, 32, 32)
        torch.testing.assert_close(img, _as_chw_float(train_x[i]))
        assert label == train_y[i]
    test = load_dataset("cifar10", train=False, root=tmp_path, download=False)
    assert len(test) == 3
    torch.testing.assert_close(test[2][0], _as_chw_float(test_x[2]))
    assert test[2][1] == test_y[2]



def test_a_root_starting_with_a_tilde_is_the_home_folders(tmp_path: Path, skip_md5: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # As a shell leaves it in --data-root=~/data: read under the home folder, not a folder named '~'.
    from scipy.io import savemat

    home = tmp_path / "home"
    _write_cifar10(home / "data")
    savemat(home / "data" / "test_32x32.mat", {"X": _images(2, seed=5).transpose(1, 2, 3, 0),
                                               "y": np.array([[1], [2]], dtype=np.uint8)})
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("cifar10", train=False, root="~/data", download=False, fallback=False)) == 3
    assert len(load_dataset("svhn", train=False, root="~/data", download=False)) == 2
    assert not (tmp_path / "~").exists()


def test_svhn_mat_file_loads_through_torchvision(tmp_path: Path, skip_md5: None) -> None:
    from scipy.io import savemat

    x = _images(6, seed=5)
    y = np.array([[10], [1], [2], [3], [10], [9]], dtype=np.uint8)  # SVHN stores digit 0 as 10
    savemat(tmp_path / "test_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": y})
    ds = load_svhn(tmp_path, train=False, download=False)
    assert len(ds) == 6
    assert [ds[i][1] for i in range(6)] == [0, 1, 2, 3, 0, 9]
    torch.testing.assert_close(ds[3][0], _as_chw_float(x[3]))
    via_source = load_dataset("svhn", train=False, root=tmp_path, download=False, limit=4)
    assert len(via_source) == 4


def test_missing_svhn_without_download_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="SVHN") as caught:
        load_dataset("svhn", train=False, root=tmp_path, download=False)
    # The command line's spelling of the setting, not torchvision's advice about a Python argument.
    assert "--no-download" in str(caught.value) and "download=True" not in str(caught.value)


def test_missing_cifar10_falls_back_to_the_bundled_sample(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vqfast.models"):
        ds = load_dataset("cifar10", train=True, root=tmp_path, download=False)
    assert len(ds) == 2000
    assert "bundled CIFAR-10 sample" in caplog.text
    assert "--no-download" in caplog.text and "download=True" not in caplog.text
    with pytest.raises(DatasetUnavailable, match="CIFAR-10"):
        load_dataset("cifar10", root=tmp_path, download=False, fallback=False)


def test_failed_download_falls_back_with_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    import torchvision.datasets as tvd

    calls = []

    def offline(self) -> None:
        calls.append(self.root)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    with caplog.at_level(logging.WARNING, logger="vqfast.models"):
        ds = load_dataset("cifar10", train=False, root=tmp_path, download=True)
    assert calls, "the download path was not taken"
    assert len(ds) == 500
    assert "could not be downloaded" in caplog.text and "name resolution" in caplog.text


def test_a_failed_download_leaves_no_empty_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    def offline(self) -> None:
        Path(self.root).mkdir(parents=True, exist_ok=True)  # as torchvision's download does first
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    kept.mkdir()
    for root in (fresh, kept):
        load_dataset("cifar10", train=False, root=root, download=True)
    assert not fresh.exists()  # made by the failed download: removed
    assert kept.is_dir()  # there before: left alone


def test_bundled_sample() -> None:
    train = load_dataset("sample", train=True)
    test = load_dataset("sample", train=False)
    assert (len(train), len(test)) == (2000, 500)
    img, label = train[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0.05
    assert 0 <= label < 10
    assert train.classes is not None and len(train.classes) == 10
    assert len(load_dataset("sample", limit=100)) == 100


def test_npz_with_x_and_y(tmp_path: Path) -> None:
    x = _images(10, seed=3)
    y = np.arange(10) % 4
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)
    ds = load_dataset(str(path))
    assert len(ds) == 10
    torch.testing.assert_close(ds[4][0], _as_chw_float(x[4]))
    assert ds[5][1] == 1
    # without labels
    np.savez(tmp_path / "nolabels.npz", x=x)
    assert load_npz(tmp_path / "nolabels.npz")[0][1] == -1


def test_npz_with_wrong_contents_is_rejected(tmp_path: Path) -> None:
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 32, 32, 3), dtype=np.float32), y=np.zeros(2))
    with pytest.raises(ValueError, match="uint8"):
        load_dataset(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="'x'"):
        load_dataset(str(tmp_path / "keys.npz"))
    np.savez(tmp_path / "count.npz", x=np.zeros((2, 32, 32, 3), dtype=np.uint8), y=np.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        load_dataset(str(tmp_path / "count.npz"))
    np.savez(tmp_path / "names.npz", x=np.zeros((2, 32, 32, 3), dtype=np.uint8), y=np.array(["cat", "dog"]))
    with pytest.raises(ValueError, match="labels must be integers"):
        load_dataset(str(tmp_path / "names.npz"))
    # Two labels per image: a shape to fix, not a count ("10 images but 20 labels").
    np.savez(tmp_path / "pairs.npz", x=np.zeros((10, 32, 32, 3), dtype=np.uint8), y=np.zeros((10, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"one integer per image, shape \(N,\).*\(10, 2\)"):
        load_dataset(str(tmp_path / "pairs.npz"))
    # Split images with one bare 'y': whose labels they are is unclear, and they would be dropped.
    np.savez(tmp_path / "bare_y.npz", x_train=np.zeros((2, 32, 32, 3), dtype=np.uint8), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="images in 'x_train' and labels in 'y'"):
        load_dataset(str(tmp_path / "bare_y.npz"))
    np.savez(tmp_path / "negative.npz", x=np.zeros((2, 32, 32, 3), dtype=np.uint8), y=np.array([0, -2]))
    with pytest.raises(ValueError, match="labels must be class numbers >= 0, or -1 for an image without one, got -2"):
        load_dataset(str(tmp_path / "negative.npz"))
    np.savez(tmp_path / "unlabelled.npz", x=np.zeros((2, 32, 32, 3), dtype=np.uint8), y=np.array([3, -1]))
    assert [load_dataset(str(tmp_path / "unlabelled.npz"))[i][1] for i in range(2)] == [3, -1]
    # Training images in 'x' with their 'y', test images in 'x_test' without labels: both splits load.
    np.savez(tmp_path / "x_and_x_test.npz", x=np.zeros((3, 32, 32, 3), dtype=np.uint8), y=np.arange(3),
             x_test=np.zeros((2, 32, 32, 3), dtype=np.uint8))
    assert len(load_dataset(str(tmp_path / "x_and_x_test.npz"), train=False)) == 2
    assert [load_dataset(str(tmp_path / "x_and_x_test.npz"))[i][1] for i in range(3)] == [0, 1, 2]
    # (N, 1), as Keras's CIFAR-10 stores its labels, is one per image
    np.savez(tmp_path / "column.npz", x=np.zeros((3, 32, 32, 3), dtype=np.uint8), y=np.array([[2], [0], [1]]))
    assert [load_dataset(str(tmp_path / "column.npz"))[i][1] for i in range(3)] == [2, 0, 1]


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    x = _images(4, seed=8)
    for cls, idx in (("cats", [0, 1]), ("dogs", [2, 3])):
        (tmp_path / cls).mkdir()
        for i in idx:
            Image.fromarray(x[i]).save(tmp_path / cls / f"{i}.png")
    # a larger greyscale image must come out as 32 x 32 RGB
    Image.fromarray(np.full((64, 48), 200, dtype=np.uint8), mode="L").save(tmp_path / "dogs" / "big.png")
    ds = load_dataset(str(tmp_path))
    assert len(ds) == 5
    labels = sorted(ds[i][1] for i in range(5))
    assert labels == [0, 0, 1, 1, 1]
    for i in range(5):
        assert ds[i][0].shape == (3, 32, 32)
    first = ds[0][0]  # cats/0.png, lossless PNG at native size
    torch.testing.assert_close(first, _as_chw_float(x[0]))


def test_a_folder_of_images_without_class_folders_names_the_layout(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(_images(1, seed=3)[0]).save(tmp_path / "0.png")
    with pytest.raises(ValueError, match="ImageFolder layout"):
        load_dataset(str(tmp_path))
    # With a class folder, but the image still at the top: both are said.
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="'empty_class' holds no image.*ImageFolder layout"):
        load_dataset(str(tmp_path))


def test_a_class_folder_without_images_is_named_without_the_layout_hint(tmp_path: Path) -> None:
    # The layout is right; only the files in one class folder are not images ImageFolder reads.
    from PIL import Image

    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.txt").write_text("not an image")
    (tmp_path / "dogs").mkdir()
    Image.fromarray(_images(1, seed=4)[0]).save(tmp_path / "dogs" / "0.png")
    with pytest.raises(ValueError) as err:
        load_dataset(str(tmp_path))
    msg = str(err.value)
    assert "class folder 'cats' holds no image with a supported extension" in msg and ".png" in msg, msg
    assert "dogs" not in msg and "ImageFolder layout" not in msg, msg


def test_a_limited_image_folder_spans_its_classes(tmp_path: Path) -> None:
    # A folder's images come sorted by class: the first ones would all be the first class.
    from PIL import Image

    x = _images(12, seed=9)
    for c, cls in enumerate(("a", "b", "c")):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(x[4 * c + i]).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path), limit=3)
    assert sorted(ds[i][1] for i in range(3)) == [0, 1, 2]
    assert len(load_dataset(str(tmp_path), limit=12)) == 12
    # The other sources keep their first images.
    first = load_dataset("sample", limit=5)
    assert torch.equal(first[4][0], load_dataset("sample")[4][0])


def test_synthetic_evaluation_uses_the_runs_seed(tmp_path: Path) -> None:
    # The test split of seed s is drawn from s + 1: evaluated with another seed, a run trained with
    # seed 1 was scored on its own training images.
    from vqfast.models.train import _load_eval_source

    train = load_dataset("synthetic", train=True, limit=64, seed=1)
    scored, _ = _load_eval_source("synthetic", "test", str(tmp_path), False, 64, seed=1)
    assert not torch.equal(train[0][0], scored[0][0])
    assert torch.equal(scored[0][0], load_dataset("synthetic", train=False, limit=64, seed=1)[0][0])


def test_image_folder_scales_16_bit_greyscale(tmp_path: Path) -> None:
    # PIL's own conversion to RGB clips 16-bit values at 255: such an image came out almost all white.
    from PIL import Image

    (tmp_path / "scans").mkdir()
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "scans" / "ramp.png")
    assert Image.open(tmp_path / "scans" / "ramp.png").mode.startswith("I")
    image = load_dataset(str(tmp_path))[0][0]
    expected = torch.from_numpy(np.round(ramp / 257.0) / 255.0).float()
    for channel in image:
        torch.testing.assert_close(channel, expected)


def test_image_folder_refuses_integer_pixels_outside_16_bits_when_loaded(tmp_path: Path) -> None:
    """A 32-bit integer image with values past 65535 (or below 0) cannot be scaled to 8 bits: it stops
    the loading of the folder (before training), naming the file."""
    from PIL import Image

    (tmp_path / "scans").mkdir()
    fine = np.tile(np.linspace(0, 65535, 32).astype(np.int32), (32, 1))
    Image.fromarray(fine).save(tmp_path / "scans" / "fine.tif")
    assert Image.open(tmp_path / "scans" / "fine.tif").mode == "I"
    assert len(load_dataset(str(tmp_path))) == 1  # in range: loads (and is scaled, as 16-bit images are)
    for name, bad in (("big.tif", 70000), ("negative.tif", -5)):
        pixels = fine.copy()
        pixels[3, 4] = bad
        Image.fromarray(pixels).save(tmp_path / "scans" / name)
        with pytest.raises(ValueError, match=f"{name}: integer pixels outside the 16-bit range"):
            load_dataset(str(tmp_path))
        (tmp_path / "scans" / name).unlink()


def test_image_folder_with_an_unreadable_file_fails_when_loaded(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "cats").mkdir()
    Image.fromarray(_images(1, seed=9)[0]).save(tmp_path / "cats" / "good.png")
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png at all" * 20)
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        load_dataset(str(tmp_path))
    (tmp_path / "cats" / "broken.png").unlink()
    Image.fromarray(np.zeros((32, 32), dtype=np.float32)).save(tmp_path / "cats" / "depth.tif")
    with pytest.raises(ValueError, match="depth.tif: floating-point images are not supported"):
        load_dataset(str(tmp_path))


def test_image_damaged_past_its_header_names_its_file_when_read(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "cats").mkdir()
    Image.fromarray(_images(1, seed=9)[0]).save(tmp_path / "cats" / "good.png")
    data = (tmp_path / "cats" / "good.png").read_bytes()
    (tmp_path / "cats" / "cut.png").write_bytes(data[: len(data) // 2])
    ds = load_dataset(str(tmp_path))  # the header is fine: found when the pixels are read
    with pytest.raises(ValueError, match=r"cut\.png: .*remove or replace"):
        for i in range(len(ds)):
            ds[i]


def test_unknown_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither"):
        load_dataset(str(tmp_path / "nothing-here"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="folder of images"):
        load_dataset(str(tmp_path / "file.txt"))


def test_synthetic_source_is_deterministic() -> None:
    a = load_dataset("synthetic", limit=8, seed=3)
    b = load_dataset("synthetic", limit=8, seed=3)
    c = load_dataset("synthetic", limit=8, seed=4)
    assert torch.equal(a[5][0], b[5][0])
    assert not torch.equal(a[5][0], c[5][0])
    assert a[0][0].shape == (3, 32, 32)


def test_npz_images_must_be_32x32_rgb(tmp_path: Path) -> None:
    for shape in ((2, 64, 64, 3), (2, 32, 32, 4), (2, 16, 16), (2, 3, 64, 64)):
        np.savez(tmp_path / "bad.npz", x=np.zeros(shape, dtype=np.uint8))
        with pytest.raises(ValueError, match="32 x 32 RGB") as info:
            load_dataset(str(tmp_path / "bad.npz"))
        assert str(shape) in str(info.value)
    # The right images in the other layout: told how to store them, not to resize them.
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"channels-first images, shape \(2, 3, 32, 32\).*transpose\(0, 2, 3, 1\)"):
        load_dataset(str(tmp_path / "bad.npz"))
    # Greyscale images of the right size: told to repeat the channel, not to resize.
    for shape in ((2, 32, 32), (2, 32, 32, 1)):
        np.savez(tmp_path / "bad.npz", x=np.zeros(shape, dtype=np.uint8))
        with pytest.raises(ValueError, match=r"greyscale images, shape \(2, 32, 32(, 1)?\).*repeat the channel") as info:
            load_dataset(str(tmp_path / "bad.npz"))
        assert "resize" not in str(info.value)
    np.savez(tmp_path / "pairs.npz", x_train=_images(2, seed=0), x_test=np.zeros((2, 16, 16, 3), dtype=np.uint8))
    assert len(load_dataset(str(tmp_path / "pairs.npz"), train=True)) == 2
    with pytest.raises(ValueError, match="'x_test'.*\\(2, 16, 16, 3\\)"):
        load_dataset(str(tmp_path / "pairs.npz"), train=False)


def test_which_sources_have_a_test_split(tmp_path: Path) -> None:
    for name in ("cifar10", "svhn", "sample", "synthetic"):
        assert data_mod.has_test_split(name)
    np.savez(tmp_path / "pairs.npz", x_train=_images(2, seed=0), x_test=_images(2, seed=1))
    np.savez(tmp_path / "single.npz", x=_images(2, seed=0))
    np.savez(tmp_path / "train_only.npz", x_train=_images(2, seed=0))
    assert data_mod.has_test_split(tmp_path / "pairs.npz")
    assert not data_mod.has_test_split(tmp_path / "single.npz")
    assert not data_mod.has_test_split(tmp_path / "train_only.npz")
    (tmp_path / "folder" / "cls").mkdir(parents=True)
    assert not data_mod.has_test_split(tmp_path / "folder")
    # one set of images: train=False gives the same ones back, or says there are none
    single = load_dataset(str(tmp_path / "single.npz"), train=False)
    assert torch.equal(single[1][0], load_dataset(str(tmp_path / "single.npz"))[1][0])
    with pytest.raises(ValueError, match="has 'x_train' but no 'x_test'"):
        load_dataset(str(tmp_path / "train_only.npz"), train=False)


def test_source_of_tells_a_cifar10_fallback_apart(tmp_path: Path) -> None:
    fallback = load_dataset("cifar10", train=False, root=tmp_path, download=False, limit=5)
    assert data_mod.source_of(fallback, "cifar10") == "sample"
    assert data_mod.source_of(load_dataset("sample", limit=5), "sample") == "sample"
    assert data_mod.source_of(load_dataset("synthetic", limit=5), "synthetic") == "synthetic"


def test_unreadable_npz_is_a_clear_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "good.npz", x=_images(4, seed=0))
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:300])
    (tmp_path / "text.npz").write_text("not an archive\n")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    for name in ("truncated", "text", "array"):
        with pytest.raises(ValueError, match=f"{name}.npz is not a"):
            load_dataset(str(tmp_path / f"{name}.npz"))
        assert not data_mod.has_test_split(tmp_path / f"{name}.npz")


def test_npz_object_arrays_and_upper_case_suffixes(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "objects.npz"
    np.savez(path, x=images, class_names=np.array(["a", 1], dtype=object))
    # numpy's own message named neither the file nor the array.
    with pytest.raises(ValueError, match=r"objects\.npz: 'class_names' is an object array"):
        load_dataset(str(path))
    upper = tmp_path / "IMAGES.NPZ"
    np.savez(tmp_path / "IMAGES.npz", x=images)
    (tmp_path / "IMAGES.npz").rename(upper)
    assert len(load_dataset(str(upper))) == 5 and not data_mod.has_test_split(upper)


def test_sources_given_as_dot_or_with_a_trailing_slash_are_named_after_their_folder(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert data_mod.describe_source(".") == data_mod.describe_source("./") == "imgs"
    assert data_mod.describe_source("../imgs/") == "imgs"
    assert data_mod.describe_source("sample") == "sample"


def test_batches_come_whole_and_in_the_sampler_order():
    """``__getitems__`` builds a DataLoader batch at once; it must equal the per-image path, in the same
    order, also through a Subset."""
    from torch.utils.data import DataLoader, RandomSampler, Subset

    images, labels = _images(50, seed=3), np.arange(50) % 7
    ds = data_mod.ImageArrayDataset(images, labels, channels_last=True)
    for dataset in (ds, Subset(ds, list(range(3, 40)))):
        order = list(RandomSampler(dataset, generator=torch.Generator().manual_seed(4)))
        got = list(DataLoader(dataset, batch_size=8, sampler=order))
        for b, (x, y) in enumerate(got):
            chunk = order[8 * b: 8 * b + 8]
            expected = [dataset[i] for i in chunk]
            assert torch.equal(x, torch.stack([e[0] for e in expected]))
            assert y.tolist() == [e[1] for e in expected] and y.dtype == torch.int64
        assert sum(len(y) for _, y in got) == len(dataset)


def _zip_member_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of an .npy file, as numpy.savez stores each array in its zip archive."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    """An .npz written member by member, so that a member can hold what numpy.savez never writes."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def test_damaged_compressed_npz_names_the_file_and_the_array(tmp_path: Path) -> None:
    # Smooth images, so that the archive holds a real deflate stream for the damage to break.
    x = np.broadcast_to(np.arange(32, dtype=np.uint8)[None, :, None, None], (8, 32, 32, 3)).copy()
    path = tmp_path / "damaged.npz"
    np.savez_compressed(path, x=x)
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    for i in range(middle - 8, middle + 8):
        content[i] ^= 0x5A
    path.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=r"damaged\.npz: the array 'x' is damaged \((zlib\.error|zipfile\.BadZipFile)"):
        load_dataset(str(path))


def test_npz_member_that_is_not_an_npy_file_is_refused(tmp_path: Path) -> None:
    # numpy hands back such a member's raw bytes; the run failed later on "'bytes' object has no attribute 'ndim'".
    path = _write_zip(tmp_path / "garbage.npz", {"x.npy": _zip_member_bytes(_images(2, seed=0)), "y.npy": b"garbage"})
    with pytest.raises(ValueError, match=r"garbage\.npz: 'y' is not a NumPy array"):
        load_dataset(str(path))
    _write_zip(path, {"x.npy": b"garbage"})
    with pytest.raises(ValueError, match=r"garbage\.npz: 'x' is not a NumPy array"):
        load_dataset(str(path))


def test_npz_class_names_must_be_a_1d_array(tmp_path: Path) -> None:
    path = tmp_path / "names.npz"
    for names in (np.array("abc"), np.array([["a", "b"], ["c", "d"]])):
        np.savez(path, x=_images(2, seed=0), class_names=names)
        with pytest.raises(ValueError, match=r"names\.npz: 'class_names' must be a 1-D array of names") as caught:
            load_dataset(str(path))
        assert str(names.shape) in str(caught.value)
    np.savez(path, x=_images(2, seed=0), class_names=np.array(["cat", "dog"]))
    assert load_dataset(str(path)).classes == ("cat", "dog")


def test_damaged_npy_in_an_npz_is_not_called_an_object_array(tmp_path: Path) -> None:
    good = _zip_member_bytes(_images(3, seed=1))
    path = tmp_path / "broken.npz"
    header_end = good.index(b"\n") + 1
    bad_header = good[:10] + b"{garbage!!" + good[20:]
    for member in (bad_header, good[: header_end + 100]):  # a header numpy cannot parse; data cut short
        _write_zip(path, {"x.npy": member})
        with pytest.raises(ValueError, match=r"broken\.npz: the array 'x' is damaged") as caught:
            load_dataset(str(path))
        assert "object array" not in str(caught.value)
    # A real object array is still told apart, also when the archive is compressed.
    np.savez_compressed(path, x=_images(3, seed=1), y=np.array([1, "a", None], dtype=object))
    with pytest.raises(ValueError, match=r"broken\.npz: 'y' is an object array"):
        load_dataset(str(path))


def test_big_endian_labels_are_read_in_native_byte_order(tmp_path: Path) -> None:
    x = _images(3, seed=2)
    for dtype in (">i8", ">u2", ">i4"):
        path = tmp_path / f"labels{dtype[1:]}.npz"
        np.savez(path, x=x, y=np.array([3, 0, 2], dtype=dtype))
        ds = load_dataset(str(path))
        assert [ds[i][1] for i in range(3)] == [3, 0, 2], dtype
    # Images in another byte order than uint8: told what pixels are expected, not torch's byte-order text.
    with pytest.raises(ValueError, match="expected uint8 pixels"):
        data_mod.ImageArrayDataset(x.astype(">u2"), channels_last=True)


def test_unsigned_labels_beyond_int64_are_refused(tmp_path: Path) -> None:
    # Held as int64, 2**63 and up wrapped round to negative numbers.
    path = tmp_path / "huge.npz"
    np.savez(path, x=_images(2, seed=0), y=np.array([1, 2**63], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"huge\.npz: labels must fit in a 64-bit signed integer.*9223372036854775808"):
        load_dataset(str(path))
    np.savez(path, x=_images(2, seed=0), y=np.array([1, 2**63 - 1], dtype=np.uint64))  # the largest that fits
    assert load_dataset(str(path))[1][1] == 2**63 - 1


def test_folders_with_dots_keep_their_whole_name(tmp_path: Path) -> None:
    # "cats.2023" and "cats.2024" were both named "cats": their evaluation files replaced each other.
    for name in ("cats.2023", "cats.2024"):
        (tmp_path / name / "a").mkdir(parents=True)
    assert data_mod.describe_source(str(tmp_path / "cats.2023")) == "cats.2023"
    assert data_mod.describe_source(str(tmp_path / "cats.2024") + "/") == "cats.2024"
    np.savez(tmp_path / "cats.2023.npz", x=_images(1, seed=0))
    assert data_mod.describe_source(str(tmp_path / "cats.2023.npz")) == "cats.2023"  # a file: its stem


def test_an_empty_source_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "" as a path is the current folder: it was scanned as an image folder.
    from PIL import Image

    (tmp_path / "cls").mkdir()
    Image.fromarray(_images(1, seed=0)[0]).save(tmp_path / "cls" / "0.png")
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset(".")) == 1  # named explicitly, the current folder still loads
    for source in ("", "  "):
        with pytest.raises(ValueError, match="empty data source"):
            load_dataset(source)
        with pytest.raises(ValueError, match="empty data source"):
            data_mod.has_test_split(source)
        with pytest.raises(ValueError, match="empty data source"):
            data_mod.describe_source(source)


def test_a_symlink_loop_in_an_image_folder_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(_images(1, seed=0)[0]).save(root / "a" / "ok.png")
    Image.fromarray(_images(1, seed=1)[0]).save(root / "b" / "ok.png")
    # Followed by torchvision, this one link made 1 image into 41 samples.
    (root / "a" / "loop").symlink_to("..", target_is_directory=True)
    with pytest.raises(ValueError, match=r"a/loop is a symbolic link to .*imgs, a folder that leads back"):
        load_dataset(str(root))
    (root / "a" / "loop").unlink()
    # A loop through two links, each to a folder that does not hold it.
    (root / "a" / "to_b").symlink_to("../b", target_is_directory=True)
    (root / "b" / "to_a").symlink_to("../a", target_is_directory=True)
    with pytest.raises(ValueError, match=r"(to_a|to_b) is a symbolic link"):
        load_dataset(str(root))


def test_symlinked_files_and_folders_without_a_loop_still_load(tmp_path: Path) -> None:
    from PIL import Image

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i in range(2):
        Image.fromarray(_images(1, seed=i)[0]).save(elsewhere / f"{i}.png")
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "linked.png").symlink_to(elsewhere / "0.png")
    (root / "a" / "more").symlink_to(elsewhere, target_is_directory=True)  # a folder outside: no loop
    (root / "b").symlink_to(elsewhere, target_is_directory=True)  # a class folder that is a link
    ds = load_dataset(str(root))
    assert len(ds) == 5
    assert sorted(ds[i][1] for i in range(5)) == [0, 0, 0, 1, 1]


def test_svhn_mat_file_with_other_image_sizes_is_refused(tmp_path: Path, skip_md5: None) -> None:
    from scipy.io import savemat

    x = np.zeros((16, 16, 3, 4), dtype=np.uint8)  # SVHN's layout (H, W, 3, N), but 16 x 16
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.ones((4, 1), dtype=np.uint8)})
    with pytest.raises(ValueError, match=r"test_32x32\.mat: 'X' must hold 32 x 32 RGB images.*\(16, 16, 3, 4\)"):
        load_svhn(tmp_path, train=False, download=False)
