"""Image sources: embedded digits and shapes, image folders, MNIST IDX, CIFAR binary, helpers."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aigc.data.images as image_data
from aigc.data.images import (
    ImageSet,
    image_grid,
    image_stream,
    load_image_set,
    random_flip,
    save_png,
    split_indices,
    to_tensor,
    to_uint8,
)
from aigc.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, caption, generate_shapes
from aigc.errors import ConfigError, DataError
from aigc.tasks.images import ImageDataConfig, prepare


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Streams in chunks of a few images and file blocks of 7 bytes, so that small test
    sources cross every chunk and block boundary."""
    monkeypatch.setattr(image_data, "CHUNK_BYTES", 5000)
    monkeypatch.setattr(image_data, "_READ_BLOCK", 7)


# --------------------------------------------------------------------------- digits


def test_digits_all_images_resized_with_ten_classes():
    ds = load_image_set("digits")
    assert ds.images.shape == (1797, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels["class"].dtype == np.int64
    assert set(ds.labels["class"].tolist()) == set(range(10))
    assert ds.classes["class"] == [str(i) for i in range(10)]
    assert ds.images.min() <= 5 and ds.images.max() >= 250  # most of 0..255
    assert (ds.images[..., 0] == ds.images[..., 2]).all()  # grey repeated to RGB
    assert ds.is_labelled and ds.skipped == 0


def test_digits_size_channels_and_fresh_arrays():
    a = load_image_set(None, image_size=16, channels=1)
    assert a.images.shape == (1797, 16, 16, 1)
    a.images[:] = 0  # the cached raw data must not change
    a.labels["class"][:] = 0
    b = load_image_set("digits", image_size=8, channels=1)
    assert b.images.shape == (1797, 8, 8, 1) and b.images.max() == 255
    assert b.labels["class"].max() == 9 and b.images.flags.writeable


# --------------------------------------------------------------------------- shapes

# Reference colours of the names, independent of the generator's palette.
REF_RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "orange": (255, 165, 0),
    "white": (255, 255, 255),
}


@pytest.fixture(scope="module")
def shapes2000() -> ImageSet:
    return generate_shapes(2000, seed=3)


def test_shapes_deterministic_in_seed_and_prefix_stable():
    a, b, c = (
        generate_shapes(300, seed=0),
        generate_shapes(300, seed=0),
        generate_shapes(300, seed=1),
    )
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions
    assert a.images.tobytes() != c.images.tobytes()
    first = generate_shapes(50, seed=0)
    assert np.array_equal(first.images, a.images[:50])
    big = generate_shapes(50, image_size=64, seed=0)  # same layout at another size
    assert big.images.shape == (50, 64, 64, 3) and big.captions == first.captions


def test_shapes_labels_in_range_all_values_and_captions(shapes2000):
    ds = shapes2000
    assert ds.images.shape == (2000, 32, 32, 3) and len(ds) == 2000
    for key, names in (
        ("shape", SHAPES),
        ("colour", COLOURS),
        ("size", SIZES),
        ("position", POSITIONS),
    ):
        assert ds.classes[key] == list(names)
        assert ds.labels[key].dtype == np.int64
        assert set(ds.labels[key].tolist()) == set(range(len(names)))
    assert caption(0, 0, 0, 0) == "a small red circle at the top left"
    assert caption(2, 2, 1, 4) == "a large blue triangle in the centre"
    for i in range(0, 2000, 7):
        s, c, z, p = (int(ds.labels[k][i]) for k in ("shape", "colour", "size", "position"))
        text = ds.captions[i]
        assert text == caption(s, c, z, p)
        assert text.startswith(f"a {SIZES[z]} {COLOURS[c]} {SHAPES[s]} ")
        assert text.endswith(f" the {POSITIONS[p]}")
    with pytest.raises(ValueError, match="colour"):
        caption(0, len(COLOURS), 0, 0)


def test_shapes_generation_speed():
    t = time.perf_counter()
    ds = generate_shapes(10_000)
    print(f"\nshapes: 10,000 images of 32x32 in {time.perf_counter() - t:.2f} s")
    assert len(ds) == 10_000


def test_shapes_are_readable_by_independent_measurements(shapes2000):
    x = shapes2000.images.astype(np.float64)  # (N, S, S, 3)
    n, s = x.shape[:2]
    bright = x.max(axis=3)  # (N, S, S)
    peak = bright.max(axis=(1, 2), keepdims=True)
    lab = shapes2000.labels

    # Colour: mean of fully covered pixels, nearest reference colour after normalising brightness.
    core = bright >= 0.95 * peak
    mean = (x * core[..., None]).sum(axis=(1, 2)) / core.sum(axis=(1, 2))[:, None]
    ref = np.array([REF_RGB[name] for name in COLOURS], dtype=np.float64) / 255
    dist = ((mean / mean.max(axis=1, keepdims=True))[:, None, :] - ref[None]) ** 2
    assert (dist.sum(axis=2).argmin(axis=1) == lab["colour"]).mean() >= 0.97

    # Position: centre of mass of brightness, in which third of the image along x and y.
    coords = np.arange(s) + 0.5
    cx = (bright * coords[None, None, :]).sum(axis=(1, 2)) / bright.sum(axis=(1, 2))
    cy = (bright * coords[None, :, None]).sum(axis=(1, 2)) / bright.sum(axis=(1, 2))
    found = (cy // (s / 3)).astype(int) * 3 + (cx // (s / 3)).astype(int)
    assert (found == lab["position"]).mean() >= 0.97

    # Size: for each shape, every large one covers more pixels than any small one.
    area = (bright >= 0.5 * peak).sum(axis=(1, 2))
    for k in range(len(SHAPES)):
        small = area[(lab["shape"] == k) & (lab["size"] == 0)]
        large = area[(lab["shape"] == k) & (lab["size"] == 1)]
        assert small.max() < large.min(), SHAPES[k]

    # Anti-aliasing: edge pixels between background and full colour, in nearly every image.
    # (A square whose edges all fall near pixel boundaries is legitimately crisp: about 1 %.)
    edge = ((bright > 0.1 * peak) & (bright < 0.9 * peak)).sum(axis=(1, 2))
    assert (edge > 0).mean() >= 0.97 and edge.mean() > 10
    assert n == 2000


def test_shapes_through_load_image_set_greyscale():
    ds = load_image_set("shapes", n=12, seed=5, channels=1, image_size=24)
    assert ds.images.shape == (12, 24, 24, 1) and len(ds.captions) == 12
    assert ds.images.max() > 100


# --------------------------------------------------------------------------- image folders


def solid(colour, size=(20, 20), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def make_class_folder(root: Path) -> Path:
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "more").mkdir(parents=True)
    solid((200, 10, 10)).save(root / "cat" / "a.png")
    solid((10, 200, 10), (30, 30)).save(root / "cat" / "b.jpg", quality=95)
    solid((10, 10, 200), (16, 16)).save(root / "dog" / "c.webp", lossless=True)
    solid(128, (20, 20), mode="L").save(root / "dog" / "more" / "d.png")  # nested, greyscale
    (root / ".DS_Store").write_bytes(b"\0\1junk")  # hidden files and folders are ignored
    (root / ".cache").mkdir()
    (root / ".cache" / "x.bin").write_bytes(b"junk")
    (root / "dog" / ".hidden.png").write_bytes(b"junk")
    (root / "empty").mkdir()  # a folder without files is not a class
    (root / "README.md").write_text("about the data")  # metadata is ignored
    return root


def test_image_folder_classes_formats_rgb(tmp_path):
    ds = load_image_set(make_class_folder(tmp_path / "pets"), image_size=8)
    assert ds.classes == {"class": ["cat", "dog"]}
    assert ds.labels["class"].tolist() == [0, 0, 1, 1]
    assert ds.images.shape == (4, 8, 8, 3)
    assert np.abs(ds.images[0].astype(int) - (200, 10, 10)).max() <= 1  # PNG exact
    assert np.abs(ds.images[1].astype(int) - (10, 200, 10)).max() <= 6  # JPEG, lossy
    assert np.abs(ds.images[2].astype(int) - (10, 10, 200)).max() <= 1  # WebP lossless
    assert np.abs(ds.images[3].astype(int) - 128).max() <= 1  # grey -> RGB
    assert "2 classes" in ds.source and ds.skipped == 0
    assert ds.require_labels().tolist() == [0, 0, 1, 1]


def test_image_folder_greyscale_matches_pillow(tmp_path):
    ds = load_image_set(make_class_folder(tmp_path / "pets"), image_size=8, channels=1)
    assert ds.images.shape == (4, 8, 8, 1)
    expected = np.asarray(solid((200, 10, 10)).convert("L"))[0, 0]
    assert abs(int(ds.images[0, 4, 4, 0]) - int(expected)) <= 1


def test_array_sources_convert_to_grey_like_pillow(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_cifar10(tmp_path / "c", {"data_batch_1.bin": (pixels, [0, 1, 2, 3])})
    grey = load_image_set(tmp_path / "c", channels=1).images[..., 0]
    pil = np.stack([np.asarray(Image.fromarray(p).convert("L")) for p in pixels])
    assert np.array_equal(grey, pil)


def test_image_folder_unlabelled_and_conditional_check(tmp_path):
    for i in range(3):
        solid((i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    ds = load_image_set(tmp_path, image_size=16)
    assert len(ds) == 3 and ds.labels == {} and ds.classes == {}
    assert not ds.is_labelled and "unlabelled" in ds.source
    with pytest.raises(DataError, match=r"no labels.*sub-folder"):
        ds.require_labels()


def test_centre_crop_and_squash(tmp_path):
    # 120x40: red | green | blue thirds; the centred square is the green third.
    img = np.zeros((40, 120, 3), dtype=np.uint8)
    img[:, :40, 0] = img[:, 40:80, 1] = img[:, 80:, 2] = 255
    Image.fromarray(img).save(tmp_path / "wide.png")
    cropped = load_image_set(tmp_path, image_size=32, crop=True).images[0].astype(int)
    assert cropped[:, 4:28, 1].min() >= 250 and cropped[:, 4:28, [0, 2]].max() <= 5
    assert cropped[:, :, 1].mean() > 240
    squashed = load_image_set(tmp_path, image_size=30, crop=False).images[0].astype(int)
    assert squashed[:, 3, 0].min() >= 250 and squashed[:, 15, 1].min() >= 250
    assert squashed[:, 26, 2].min() >= 250


def test_corrupt_truncated_and_unsupported_files(tmp_path):
    root = make_class_folder(tmp_path / "pets")
    (root / "cat" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"broken\.png.*cannot decode"):
        load_image_set(root)
    ds = load_image_set(root, skip_bad=True)
    assert len(ds) == 4 and ds.skipped == 1

    (root / "cat" / "broken.png").unlink()
    full = (root / "cat" / "a.png").read_bytes()
    (root / "cat" / "cut.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"cut\.png"):
        load_image_set(root)

    (root / "cat" / "cut.png").unlink()
    (root / "dog" / "drawing.svg").write_text("<svg/>")
    with pytest.raises(DataError, match=r"drawing\.svg: unsupported"):
        load_image_set(root)
    assert load_image_set(root, skip_bad=True).skipped == 1


def test_empty_and_bad_folders(tmp_path):
    with pytest.raises(DataError, match="no images"):
        load_image_set(tmp_path)
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_set(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"x")
    with pytest.raises(DataError, match="none of its 1 files"):
        load_image_set(tmp_path, skip_bad=True)
    solid((1, 2, 3)).save(tmp_path / "sub" / "ok.png")
    with pytest.raises(DataError, match="directly in it"):
        load_image_set(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        load_image_set(tmp_path / "missing")


def test_image_folder_train_test_subfolders(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                solid((i, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    assert len(load_image_set(tmp_path, image_size=8)) == 6
    test = load_image_set(tmp_path, image_size=8, split="test")
    assert len(test) == 4 and test.classes["class"] == ["a", "b"]


def test_many_files_read_in_parallel_keep_order(tmp_path):
    for i in range(80):
        solid((i, 255 - i, 7), (10, 10)).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "050.png").write_bytes(b"bad")
    ds = load_image_set(tmp_path, image_size=10, skip_bad=True)
    assert ds.skipped == 1
    expected = [i for i in range(80) if i != 50]
    assert ds.images[:, 0, 0, 0].tolist() == expected
    with pytest.raises(DataError, match=r"050\.png"):
        load_image_set(tmp_path, image_size=10)


# --------------------------------------------------------------------------- MNIST IDX


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, prefix: str, images, labels, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    pairs = (
        (f"{prefix}-images-idx3-ubyte{suffix}", images),
        (f"{prefix}-labels-idx1-ubyte{suffix}", labels),
    )
    for name, array in pairs:
        data = idx_bytes(np.asarray(array))
        (folder / name).write_bytes(gzip.compress(data) if gz else data)
    return folder / pairs[0][0]


@pytest.mark.parametrize("small", [False, True], ids=["whole", "tiny-chunks"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_back_exactly(tmp_path, gz, small, request):
    if small:
        request.getfixturevalue("tiny_chunks")
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path, "train", train, [3, 1, 4, 1, 5], gz)
    write_idx(tmp_path, "t10k", test, [9, 2], gz)

    ds = load_image_set(path, image_size=28, channels=1)
    assert np.array_equal(ds.images[..., 0], train)
    assert ds.labels["class"].tolist() == [3, 1, 4, 1, 5]
    assert ds.classes["class"] == [str(i) for i in range(10)]

    folder = load_image_set(tmp_path, image_size=28, channels=1, split="test")
    assert np.array_equal(folder.images[..., 0], test) and folder.labels["class"].tolist() == [9, 2]
    rgb = load_image_set(tmp_path, image_size=32)
    assert rgb.images.shape == (5, 32, 32, 3)


@pytest.mark.parametrize("small", [False, True], ids=["whole", "tiny-chunks"])
def test_idx_truncated_wrong_magic_and_mismatched_labels(tmp_path, small, request):
    if small:
        request.getfixturevalue("tiny_chunks")
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path, "train", images, [0, 1, 2, 3], gz=False)
    expected = 16 + 4 * 28 * 28
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        DataError, match=rf"{path.name}: truncated.*{expected:,} bytes.*{expected - 100:,}"
    ):
        load_image_set(path)

    gz_path = write_idx(tmp_path / "gz", "train", images, [0, 1, 2, 3], gz=True)
    gz_path.write_bytes(gz_path.read_bytes()[:-30])
    with pytest.raises(DataError, match=rf"{gz_path.name}: truncated.*{expected:,} bytes"):
        load_image_set(gz_path)
    gz_path.write_bytes(gz_path.read_bytes()[:12])  # the gzip stream ends inside the header
    with pytest.raises(DataError, match=rf"{gz_path.name}: truncated.*header"):
        load_image_set(gz_path)
    gz_path.write_bytes(b"\x1f\x8b" + b"garbage" * 5)
    with pytest.raises(DataError, match=rf"{gz_path.name}: corrupt gzip"):
        load_image_set(gz_path)

    path.write_bytes(b"\0\0\x08\x01" + idx_bytes(images)[4:])  # labels magic on an images file
    with pytest.raises(DataError, match="magic"):
        load_image_set(path)

    write_idx(tmp_path, "train", images, [0, 1, 2], gz=False)
    with pytest.raises(DataError, match=r"3 labels but .* 4 images"):
        load_image_set(path)

    path.write_bytes(idx_bytes(images) + b"extra")
    with pytest.raises(DataError, match=rf"longer than its header says.*{expected + 5:,}"):
        load_image_set(path)


def test_idx_gzip_of_several_members_with_zero_padding(tmp_path, tiny_chunks):
    images = np.random.default_rng(5).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path, "train", images, [7, 8, 9], gz=True)
    data = idx_bytes(images)
    path.write_bytes(gzip.compress(data[:1000]) + b"\0" * 9 + gzip.compress(data[1000:]) + b"\0")
    ds = load_image_set(path, image_size=28, channels=1)
    assert np.array_equal(ds.images[..., 0], images) and ds.labels["class"].tolist() == [7, 8, 9]


# --------------------------------------------------------------------------- CIFAR binary


def cifar_record(labels: list[int], image: np.ndarray) -> bytes:
    """Label byte(s), then the red, green and blue 32x32 planes, as the CIFAR page describes."""
    planes = [image[:, :, c].tobytes() for c in range(3)]
    return bytes(labels) + b"".join(planes)


def write_cifar10(folder: Path, batches: dict, names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for filename, (images, labels) in batches.items():
        data = b"".join(cifar_record([y], img) for img, y in zip(images, labels, strict=True))
        (folder / filename).write_bytes(data)
    if names:
        (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    return folder


CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def test_cifar10_binary_reads_back_exactly(tmp_path):
    rng = np.random.default_rng(2)
    b1, b2, t = (rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8) for k in (3, 2, 1))
    folder = write_cifar10(
        tmp_path / "cifar-10-batches-bin",
        {
            "data_batch_2.bin": (b2, [8, 9]),
            "data_batch_1.bin": (b1, [0, 5, 1]),
            "test_batch.bin": (t, [7]),
        },
        CIFAR10_NAMES,
    )
    ds = load_image_set(folder)
    assert np.array_equal(ds.images, np.concatenate([b1, b2]))  # batches in numeric order
    assert ds.labels["class"].tolist() == [0, 5, 1, 8, 9]
    assert ds.classes["class"] == CIFAR10_NAMES
    test = load_image_set(folder, split="test")
    assert np.array_equal(test.images, t) and test.labels["class"].tolist() == [7]
    one = load_image_set(folder / "data_batch_2.bin", image_size=16, channels=1)
    assert one.images.shape == (2, 16, 16, 1) and one.labels["class"].tolist() == [8, 9]

    (folder / "batches.meta.txt").unlink()
    assert load_image_set(folder).classes["class"] == [str(i) for i in range(10)]


def test_cifar10_truncated_and_skip_bad(tmp_path):
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    folder = write_cifar10(
        tmp_path, {"data_batch_1.bin": (imgs, [1, 2]), "data_batch_2.bin": (imgs, [3, 4])}
    )
    bad = folder / "data_batch_2.bin"
    bad.write_bytes(bad.read_bytes()[:-73])  # 6146 - 73 = 6073 bytes
    with pytest.raises(
        DataError, match=r"data_batch_2\.bin: 6,073 bytes, expected a multiple of 3,073.*6,146"
    ):
        load_image_set(folder)
    ds = load_image_set(folder, skip_bad=True)
    assert ds.skipped == 1 and ds.labels["class"].tolist() == [1, 2]

    bad.write_bytes(cifar_record([42], imgs[0]))  # label out of range
    with pytest.raises(DataError, match="label 42"):
        load_image_set(folder)


def test_cifar100_binary_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    coarse, fine = [1, 19, 0], [99, 0, 42]
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    records = [cifar_record([c, f], img) for c, f, img in zip(coarse, fine, imgs, strict=True)]
    (folder / "train.bin").write_bytes(b"".join(records))
    (folder / "test.bin").write_bytes(records[0])
    (folder / "fine_label_names.txt").write_text("\n".join(f"fine{i}" for i in range(100)) + "\n")
    (folder / "coarse_label_names.txt").write_text(
        "\n".join(f"coarse{i}" for i in range(20)) + "\n"
    )

    ds = load_image_set(folder)
    assert np.array_equal(ds.images, imgs)
    assert ds.labels["class"].tolist() == fine and ds.labels["coarse"].tolist() == coarse
    assert ds.classes["class"][42] == "fine42" and ds.classes["coarse"][19] == "coarse19"
    assert len(load_image_set(folder, split="test")) == 1
    assert len(load_image_set(folder / "train.bin")) == 3

    (folder / "train.bin").write_bytes(b"".join(records)[:-1])
    with pytest.raises(DataError, match=r"train\.bin: 9,221 bytes, expected a multiple of 3,074"):
        load_image_set(folder)


def test_pickled_cifar_is_refused(tmp_path):
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    (py / "data_batch_1").write_bytes(b"\x80\x02}q\x00.")  # never unpickled
    for path in (py, py / "data_batch_1"):
        with pytest.raises(DataError, match=r"pickled Python version.*binary version"):
            load_image_set(path)
    renamed = tmp_path / "mycifar"
    py.rename(renamed)
    with pytest.raises(DataError, match="binary version"):
        load_image_set(renamed)
    c100 = tmp_path / "c100"
    c100.mkdir()
    for name in ("train", "test", "meta"):
        (c100 / name).write_bytes(b"\x80\x04.")
    with pytest.raises(DataError, match="binary version"):
        load_image_set(c100)


# --------------------------------------------------------------------------- prepared into a run


def in_memory_prepared(d: ImageDataConfig, seed: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """What preparing ``d`` gave when the set was read whole (aigc 0.1): images and labels,
    training images first, and the number of files skipped."""
    ds = load_image_set(
        d.source, image_size=d.image_size, channels=d.channels or 3, crop=d.crop,
        skip_bad=d.skip_bad, n=d.n, seed=seed,
    )  # fmt: skip
    pixels = ds.images
    if d.channels == 0 and pixels.shape[-1] == 3 and (pixels == pixels[..., :1]).all():
        pixels = pixels[..., :1]
    if d.binarize:
        pixels = np.where(pixels >= 128, 255, 0).astype(np.uint8)
    train, val = split_indices(len(pixels), d.val_fraction, seed)
    order = np.concatenate([train, val])
    labels = np.stack([ds.labels[a][order] for a in ds.labels], 1) if ds.labels else None
    return np.ascontiguousarray(pixels[order]), labels, ds.skipped


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def make_sources(root: Path) -> dict[str, Path]:
    """A class folder (nested, mixed sizes and a bad file), a flat grey folder, MNIST gzipped
    IDX and a CIFAR-10 folder, each of some dozens of images."""
    rng = np.random.default_rng(11)
    for c in ("ant", "bee", "cow"):
        for i in range(25):
            folder = root / "classes" / c / ("deep" if i % 4 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            h, w = rng.integers(12, 40, 2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    (root / "classes" / "bee" / "05b.png").write_bytes(b"not an image")
    (root / "grey").mkdir()
    for i in range(70):  # >= 64 files: decoded on the thread pool
        pixels = rng.integers(0, 256, (18, 18), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "grey" / f"{i:02d}.png")
    idx = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    write_idx(root / "mnist", "train", idx, rng.integers(0, 10, 50), gz=True)
    batches = {
        f"data_batch_{b}.bin": (rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
                                rng.integers(0, 10, 30).tolist())
        for b in (1, 2)
    }  # fmt: skip
    write_cifar10(root / "cifar", batches)
    return {k: root / k for k in ("classes", "grey", "mnist", "cifar")}


@pytest.mark.parametrize(
    "source, options",
    [
        ("classes", {"skip_bad": True, "image_size": 16}),
        ("classes", {"skip_bad": True, "image_size": 12, "channels": 1, "crop": False}),
        ("grey", {"image_size": 12}),  # channels 0: a grey source keeps one channel
        ("grey", {"image_size": 12, "channels": 3, "binarize": True}),
        ("mnist", {"image_size": 28}),
        ("cifar", {"val_fraction": 0.2, "image_size": 20}),
        ("shapes", {"n": 90, "image_size": 16, "binarize": True}),
    ],
)
def test_prepare_streams_the_arrays_the_whole_set_gave(tmp_path, monkeypatch, source, options):
    sources = make_sources(tmp_path / "src")
    d = ImageDataConfig(source=str(sources.get(source, source)), **options)
    images, labels, skipped = in_memory_prepared(d, seed=3)

    monkeypatch.setattr(image_data, "CHUNK_BYTES", 5000)  # a few images a chunk
    monkeypatch.setattr(image_data, "_READ_BLOCK", 7)
    data = prepare(d, tmp_path / "data", seed=3)
    files = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    assert files.pop("images.npy") == npy_bytes(images)  # header and pixels, bit for bit
    if labels is not None:
        assert files.pop("labels.npy") == npy_bytes(labels)
    meta = json.loads(files.pop("meta.json"))
    assert files == {}  # no scratch or temporary file is left
    assert meta["sha256"] == hashlib.sha256(images.tobytes()).hexdigest()
    assert meta["skipped"] == skipped == (1 if source == "classes" else 0)
    assert meta["spec"]["channels"] == images.shape[-1]
    assert meta["binary"] == bool(np.isin(images, (0, 255)).all())
    assert isinstance(data.images, np.memmap) and not data.images.flags.writeable


def test_prepare_holds_a_chunk_not_the_set(tmp_path, monkeypatch):
    for i in range(150):  # 150 x 64 x 64 x 3 = 1.8 MB decoded
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i:03d}.png")
    decoded = 150 * 64 * 64 * 3
    monkeypatch.setattr(image_data, "CHUNK_BYTES", 32 * 1024)  # about 3 images
    tracemalloc.start()  # numpy reports its arrays' memory to tracemalloc
    try:
        prepare(ImageDataConfig(source=str(tmp_path), image_size=64), tmp_path / "data", seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < decoded / 4, f"peak {peak:,} bytes for a set of {decoded:,}"


def test_a_failed_prepare_leaves_no_scratch_files(tmp_path):
    sources = make_sources(tmp_path / "src")
    with pytest.raises(DataError, match=r"05b\.png.*cannot decode"):
        prepare(ImageDataConfig(source=str(sources["classes"])), tmp_path / "data", seed=0)
    assert list((tmp_path / "data").iterdir()) == []


def test_image_stream_yields_chunks_then_what_they_are(tmp_path, tiny_chunks):
    sources = make_sources(tmp_path / "src")
    stream = image_stream(sources["classes"], image_size=16, skip_bad=True)
    chunks = list(stream)
    assert len(chunks) > 1 and all(len(c) <= 5000 // (16 * 16 * 3) for c in chunks)
    assert stream.info.skipped == 1 and stream.info.classes == {"class": ["ant", "bee", "cow"]}
    whole = load_image_set(sources["classes"], image_size=16, skip_bad=True)
    assert np.array_equal(np.concatenate(chunks), whole.images)
    assert np.array_equal(stream.info.labels["class"], whole.labels["class"])


# --------------------------------------------------------------------------- options and helpers


def test_bad_options_are_config_errors():
    for kwargs in ({"channels": 2}, {"image_size": 0}, {"split": "validation"}, {"n": 0}):
        with pytest.raises(ConfigError):
            load_image_set("shapes", **kwargs)


def test_to_tensor_to_uint8_round_trip():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    t = to_tensor(x)
    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert np.array_equal(to_uint8(t), x)
    clamped = to_uint8(torch.tensor([-3.0, 0.0, 2.0, float("nan")]).reshape(1, 1, 1, 4))
    assert clamped.ravel().tolist() == [0, 128, 255, 0]


def test_random_flip_flips_chosen_rows_deterministically():
    images = torch.randn(64, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    out = random_flip(images, np.random.default_rng(7))
    flipped = [bool(torch.equal(o, x.flip(-1))) for o, x in zip(out, images, strict=True)]
    kept = [bool(torch.equal(o, x)) for o, x in zip(out, images, strict=True)]
    assert all(
        f != k for f, k in zip(flipped, kept, strict=True)
    )  # each row exactly one of the two
    assert 16 <= sum(flipped) <= 48
    assert torch.equal(out, random_flip(images, np.random.default_rng(7)))
    assert not torch.equal(out, random_flip(images, np.random.default_rng(8)))


def test_image_grid_layout_and_save_png(tmp_path):
    images = np.stack([np.full((8, 6, 3), i * 20, dtype=np.uint8) for i in range(10)])
    grid = image_grid(images, nrow=4, pad=2)
    assert grid.shape == (3 * 10 + 2, 4 * 8 + 2, 3)
    assert (
        grid[2 + 10 : 2 + 10 + 8, 2 + 8 : 2 + 8 + 6] == 5 * 20
    ).all()  # image 5: row 1, column 1
    assert image_grid(images).shape == (3 * 10 + 2, 4 * 8 + 2, 3)  # default: ceil(sqrt(10)) a row
    assert image_grid(images[:2, :, :, 0], nrow=8, pad=0).shape == (8, 12, 1)

    save_png(grid, tmp_path / "out" / "grid.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "grid.png")), grid)
    save_png(grid[:, :, :1], tmp_path / "grey.png")
    assert np.asarray(Image.open(tmp_path / "grey.png")).shape == grid.shape[:2]


def test_split_indices_deterministic_disjoint_covering():
    train, val = split_indices(100, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    again = split_indices(100, 0.1, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, split_indices(100, 0.1, seed=1)[1])
    assert (
        len(split_indices(5, 0.01, seed=0)[1]) == 1 and len(split_indices(5, 0.0, seed=0)[1]) == 0
    )
    with pytest.raises(ConfigError, match="val_fraction"):
        split_indices(10, 1.0, seed=0)


def test_subset_keeps_labels_and_captions_aligned():
    ds = generate_shapes(20, seed=9)
    idx = np.array([3, 0, 7])
    sub = ds.subset(idx)
    assert len(sub) == 3 and np.array_equal(sub.images, ds.images[idx])
    assert sub.labels["colour"].tolist() == ds.labels["colour"][idx].tolist()
    assert sub.captions == [ds.captions[i] for i in idx]
    assert len(ds.subset(ds.labels["size"] == 1)) == int((ds.labels["size"] == 1).sum())


def test_shapes_draw_the_same_scenes_filled_or_outlined():
    from aigc.data.images import load_image_set
    from aigc.data.shapes import STYLES, generate_shapes

    filled = generate_shapes(64, 32, seed=3)
    outlined = generate_shapes(64, 32, seed=3, style="outlined")
    both = load_image_set("shapes-styled", image_size=32, n=64, seed=3)
    for a in ("shape", "colour", "size", "position"):
        assert np.array_equal(filled.labels[a], outlined.labels[a])
        assert np.array_equal(filled.labels[a], both.labels[a])
    assert "style" not in filled.labels and both.classes["style"] == list(STYLES)
    style = both.labels["style"]
    assert 0 < style.sum() < 64  # both styles drawn
    # an outline lies inside the filled shape's pixels, and leaves a large shape's middle dark
    lit_f, lit_o = filled.images.max(-1) > 0, outlined.images.max(-1) > 0
    assert not (lit_o & ~lit_f).any()
    large = np.flatnonzero(filled.labels["size"] == 1)
    ink = lambda images: images[large].astype(float).sum()  # noqa: E731
    assert ink(outlined.images) < 0.7 * ink(filled.images)
    for i in range(64):
        want = outlined.images[i] if style[i] else filled.images[i]
        assert np.array_equal(both.images[i], want)
        assert ("outlined" in both.captions[i]) == bool(style[i])
    assert outlined.captions[0].replace("outlined ", "") == filled.captions[0]
    assert load_image_set("shapes-outlined", image_size=32, n=4, seed=3).images.tobytes() == (
        outlined.images[:4].tobytes()
    )
