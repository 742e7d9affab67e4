"""Captions (digits, image folders with a metadata.jsonl or metadata.csv) and held-out
compositions (data.holdout): captions stay with their images through chunked decoding,
skip_bad and the split; held-out combinations land in validation only."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import aigc.data.images as image_data
from aigc.config import load_config
from aigc.data.images import load_image_set, split_indices
from aigc.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, generate_shapes
from aigc.errors import ConfigError, DataError
from aigc.tasks.images import ImageDataConfig, prepare, validation_holdout_mask

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_digits_are_captioned_by_their_class():
    ds = load_image_set("digits", image_size=8)
    assert len(ds.captions) == len(ds) == 1797
    for y, text in zip(ds.labels["class"].tolist(), ds.captions, strict=True):
        assert text == f"a handwritten {WORDS[y]}"


# --------------------------------------------------------------------------- image folders


def write_folder(root: Path, fmt: str, per_class: int = 6) -> dict[int, str]:
    """Two class folders of 8x8 solid images whose red value 10*i + 5 numbers them, and a
    metadata file (rows shuffled, captions with commas and quotes) captioning each.
    Returns {red value: caption}."""
    rows, by_red = [], {}
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            i = c * per_class + j
            red = 10 * i + 5
            Image.new("RGB", (8, 8), (red, 60 * c, 7)).save(root / name / f"{j}.png")
            by_red[red] = f'{name[:-1]} number {i}, "quoted"'
            rows.append({"file_name": f"{name}/{j}.png", "text": by_red[red], "extra": i})
    rows = [rows[k] for k in np.random.default_rng(0).permutation(len(rows))]
    write_metadata(root, fmt, rows)
    return by_red


def write_metadata(root: Path, fmt: str, rows: list[dict]) -> Path:
    if fmt == "jsonl":
        path = root / "metadata.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path = root / "metadata.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_folder_captions_follow_their_images_through_prepare(tmp_path, monkeypatch, fmt):
    by_red = write_folder(tmp_path / "pets", fmt)
    monkeypatch.setattr(image_data, "CHUNK_BYTES", 8 * 8 * 3 * 5)  # chunks of 5 images
    d = ImageDataConfig(source=str(tmp_path / "pets"), image_size=8, val_fraction=0.25)
    data = prepare(d, tmp_path / "run", seed=3)
    captions = data.meta["captions"]
    assert data.n_train == 9 and len(data.val_images) == 3 and len(captions) == 12
    for k in range(12):  # every stored image, train then validation, by its pixels
        red, green = int(data.images[k, 0, 0, 0]), int(data.images[k, 0, 0, 1])
        assert captions[k] == by_red[red]
        assert data.labels[k, 0] == green // 60  # the class folder's label is kept too
    assert data.classes == {"class": ["cats", "dogs"]}
    assert f"metadata.{fmt}" in data.meta["source"]


def test_captions_with_skip_bad_and_split_folders(tmp_path):
    root = tmp_path / "pets"
    by_red = write_folder(root, "jsonl", per_class=3)
    (root / "cats" / "broken.png").write_bytes(b"not a png")
    meta = root / "metadata.jsonl"
    meta.write_text(meta.read_text() + '{"file_name": "cats/broken.png", "text": "bad"}\n')
    with pytest.raises(DataError, match=r"broken\.png.*cannot decode"):
        load_image_set(root, image_size=8)
    ds = load_image_set(root, image_size=8, skip_bad=True)
    assert ds.skipped == 1 and len(ds) == 6 and "bad" not in ds.captions
    assert ds.captions == [by_red[int(x)] for x in ds.images[:, 0, 0, 0]]

    # train/ and test/ folders, one metadata file above them naming both
    split = tmp_path / "split"
    rows = []
    for part, n in (("train", 3), ("test", 2)):
        (split / part).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(split / part / f"{i}.png")
            rows.append({"file_name": f"{part}/{i}.png", "text": f"{part} {i}"})
    write_metadata(split, "csv", rows)
    assert load_image_set(split, image_size=8).captions == ["train 0", "train 1", "train 2"]
    assert load_image_set(split, image_size=8, split="test").captions == ["test 0", "test 1"]


def test_a_folder_without_metadata_is_read_as_before(tmp_path):
    write_folder(tmp_path, "jsonl", per_class=2)
    (tmp_path / "metadata.jsonl").unlink()
    ds = load_image_set(tmp_path, image_size=8)
    assert ds.captions is None and ds.labels["class"].tolist() == [0, 0, 1, 1]
    assert "captions" not in ds.source


GOOD = '{"file_name": "a.png", "text": "an A"}'

# (metadata.jsonl lines, the message expected); a.png and b.png exist, both need captions
JSONL_FAULTS = {
    "not json": ([GOOD, '{"file_name": "b.png", text: 1}'], r"metadata\.jsonl, line 2: not JSON"),
    "not an object": ([GOOD, '["b.png", "a B"]'], r"line 2: a list, not a JSON object"),
    "no file_name": ([GOOD, '{"text": "a B"}'], r"line 2: no 'file_name'"),
    "no text": ([GOOD, '{"file_name": "b.png"}'], r"line 2: b\.png has no text"),
    "text not a string": ([GOOD, '{"file_name": "b.png", "text": 7}'], r"line 2: .*not a string"),
    "empty caption": ([GOOD, '{"file_name": "b.png", "text": " \\t "}'], r"line 2: .*empty"),
    "missing image": (
        [GOOD, '{"file_name": "b.png", "text": "a B"}', '{"file_name": "c.png", "text": "C"}'],
        r"line 3: c\.png does not exist",
    ),
    "climbs out": ([GOOD, '{"file_name": "../b.png", "text": "a B"}'], r"line 2: .*outside"),
    "absolute": ([GOOD, '{"file_name": "/tmp/b.png", "text": "a B"}'], r"line 2: .*outside"),
    "duplicate": (
        [GOOD, '{"file_name": "b.png", "text": "B"}', '{"file_name": "./a.png", "text": "A"}'],
        r"line 3: a\.png is named again \(first on line 1\)",
    ),
    "uncaptioned image": ([GOOD], r"b\.png has no caption in .*metadata\.jsonl"),
    "not an image": (
        [GOOD, '{"file_name": "b.png", "text": "B"}', '{"file_name": "notes.txt", "text": "x"}'],
        r"line 3: notes\.txt is not one of the images",
    ),
}


@pytest.mark.parametrize("fault", list(JSONL_FAULTS))
def test_jsonl_faults_name_the_file_and_line(tmp_path, fault):
    lines, message = JSONL_FAULTS[fault]
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as err:
        load_image_set(tmp_path, image_size=8)
    assert str(tmp_path / "metadata.jsonl") in str(err.value)
    assert str(err.value).count("\n") <= 1


CSV_FAULTS = {
    "no text column": ("file_name,caption\na.png,A\nb.png,B\n", r"line 1: .*no 'text' column"),
    "no file_name column": ("image,text\na.png,A\n", r"line 1: .*no 'file_name' column"),
    "unquoted comma": ("file_name,text\na.png,A\nb.png,a B, asleep\n", r"line 3: 3 fields"),
    "short row": ("file_name,text\na.png,A\nb.png\n", r"line 3: b\.png has no text"),
    "empty caption": ('file_name,text\na.png,A\nb.png," "\n', r"line 3: .*empty"),
    "line after a multi-line caption": (
        'file_name,text\na.png,"two\nlines"\nb.png,\n',
        r"line 4: the caption of b\.png is empty",
    ),
    "empty file": ("", r"metadata\.csv is empty"),
}


@pytest.mark.parametrize("fault", list(CSV_FAULTS))
def test_csv_faults_name_the_file_and_line(tmp_path, fault):
    text, message = CSV_FAULTS[fault]
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "metadata.csv").write_text(text)
    with pytest.raises(DataError, match=message) as err:
        load_image_set(tmp_path, image_size=8)
    assert str(tmp_path / "metadata.csv") in str(err.value)


def test_csv_quoted_commas_and_both_metadata_files(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "metadata.csv").write_text(
        '\ufefffile_name,text,source\na.png,"an A, small",x\nb.png,"a ""B""",y\n'
    )
    assert load_image_set(tmp_path, image_size=8).captions == ["an A, small", 'a "B"']
    (tmp_path / "metadata.jsonl").write_text(GOOD + "\n")
    with pytest.raises(DataError, match=r"both metadata\.jsonl and metadata\.csv"):
        load_image_set(tmp_path, image_size=8)


# --------------------------------------------------------------------------- held-out compositions

N_SHAPES = 400


def shapes_config(**kw) -> ImageDataConfig:
    return ImageDataConfig(source="shapes", n=N_SHAPES, image_size=8, **kw)


def test_holdout_moves_exactly_the_matching_images_to_validation(tmp_path):
    held = ["colour=red,shape=circle", "size=large, position=centre"]
    data = prepare(shapes_config(holdout=held), tmp_path / "held", seed=5)
    plain = prepare(shapes_config(), tmp_path / "plain", seed=5)

    # which images match, counted from the generator's own labels, by name
    ds = generate_shapes(N_SHAPES, image_size=8, seed=5)
    names = [
        (SHAPES[s], COLOURS[c], SIZES[z], POSITIONS[p])
        for s, c, z, p in zip(
            *(ds.labels[a] for a in ("shape", "colour", "size", "position")), strict=True
        )
    ]
    match = np.array([(c == "red" and s == "circle") or (z == "large" and p == "centre")
                      for s, c, z, p in names])  # fmt: skip
    train, val = split_indices(N_SHAPES, 0.1, 5)
    assert 0 < match.sum() < N_SHAPES // 4
    assert data.meta["holdout"] == [
        {"colour": "red", "shape": "circle"},
        {"size": "large", "position": "centre"},
    ]
    assert data.meta["n_holdout"] == match.sum()
    assert data.meta["holdout_moved"] == match[train].sum()
    assert data.n_train == len(train) - match[train].sum()
    assert len(data.val_images) == len(val) + match[train].sum()

    # the training images are the plain run's, less the matching ones, in the same order
    kept = np.concatenate(
        [train[~match[train]], np.sort(np.concatenate([val, train[match[train]]]))]
    )
    assert np.array_equal(data.images, ds.images[kept])
    assert data.meta["captions"] == [ds.captions[i] for i in kept]
    assert np.array_equal(plain.images, ds.images[np.concatenate([train, val])])

    mask = validation_holdout_mask(data.meta, np.asarray(data.labels))
    assert np.array_equal(mask, match[kept[data.n_train :]])
    assert mask.sum() == match.sum()
    assert not validation_holdout_mask(plain.meta, np.asarray(plain.labels)).any()
    for k in np.flatnonzero(mask):  # the captions say the same
        text = data.meta["captions"][data.n_train + k]
        assert "red circle" in text or ("large" in text and "centre" in text)

    again = prepare(shapes_config(holdout=held), tmp_path / "again", seed=5)
    assert (tmp_path / "again/images.npy").read_bytes() == (
        tmp_path / "held/images.npy"
    ).read_bytes()
    assert again.meta == data.meta


def test_no_holdout_prepares_the_same_data_and_meta(tmp_path):
    """An empty holdout changes nothing; one that matches no image moves nothing and only
    adds its own keys to meta.json (the fixtures of tests/test_compat.py check the rest)."""
    plain = prepare(shapes_config(), tmp_path / "plain", seed=2)
    prepare(shapes_config(holdout=[]), tmp_path / "empty", seed=2)
    assert (tmp_path / "plain/meta.json").read_bytes() == (
        tmp_path / "empty/meta.json"
    ).read_bytes()
    assert not any(k.startswith(("holdout", "n_holdout")) for k in plain.meta)
    ds = generate_shapes(N_SHAPES, image_size=8, seed=2)
    # a combination of all four attributes that no image has
    columns = (ds.labels[a] for a in ("shape", "colour", "size", "position"))
    combos = set(zip(*columns, strict=True))
    free = next(
        (a, b, e, f)
        for a in range(len(SHAPES))
        for b in range(len(COLOURS))
        for e in range(len(SIZES))
        for f in range(len(POSITIONS))
        if (a, b, e, f) not in combos
    )
    item = (
        f"shape={SHAPES[free[0]]},colour={COLOURS[free[1]]},size={SIZES[free[2]]},"
        f"position={POSITIONS[free[3]]}"
    )
    none = prepare(shapes_config(holdout=[item]), tmp_path / "none", seed=2)
    for f in ("images.npy", "labels.npy"):
        assert (tmp_path / "none" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes()
    extra = {"holdout", "holdout_moved", "n_holdout"}
    assert none.meta["holdout_moved"] == none.meta["n_holdout"] == 0
    assert {k: v for k, v in none.meta.items() if k not in extra} == plain.meta
    digest = hashlib.sha256(np.ascontiguousarray(plain.images).tobytes()).hexdigest()
    assert digest == plain.meta["sha256"] == none.meta["sha256"]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (
            ["texture=rough"],
            r"'texture=rough': no attribute 'texture' \(the data has shape, colour",
        ),
        (["colour=puce,shape=circle"], r"'colour' has no class 'puce' \(it has red, green, blue"),
    ],
)
def test_holdout_unknown_names_are_config_errors(tmp_path, items, message):
    with pytest.raises(ConfigError, match=message):
        prepare(shapes_config(holdout=items), tmp_path, seed=0)
    assert not (tmp_path / "images.npy").exists()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([""], r"data\.holdout: '' is empty"),
        (["  "], r"is empty"),
        (["colour"], r"'colour' is not attribute=class"),
        (["colour=red,"], r"'colour=red,': '' is not attribute=class"),
        (["=red"], r"'=red' is not attribute=class"),
        (["colour=red,colour=blue"], r"names 'colour' twice"),
    ],
)
def test_malformed_holdout_fails_when_the_config_is_read(items, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"family": "gan", "data": {"holdout": items}})


def test_holdout_from_the_command_line_is_one_combination():
    config = load_config({"family": "gan"}, ["data.holdout=colour=red,shape=circle"])
    assert config.data.holdout == ["colour=red,shape=circle"]


def test_holdout_needs_labels_and_training_images(tmp_path):
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    flat = ImageDataConfig(source=str(tmp_path), image_size=8, holdout=["class=a"])
    with pytest.raises(ConfigError, match=r"'class=a': .* has no labels"):
        prepare(flat, tmp_path / "run1", seed=0)

    folder = tmp_path / "two"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / c / f"{i}.png")
    both = ImageDataConfig(source=str(folder), image_size=8, holdout=["class=a", "class=b"])
    with pytest.raises(ConfigError, match=r"matches 6 of the 6 images.*no training images"):
        prepare(both, tmp_path / "run2", seed=0)
    one = prepare(ImageDataConfig(source=str(folder), image_size=8, holdout=["class=a"]),
                  tmp_path / "run3", seed=0)  # fmt: skip
    train, _ = split_indices(6, 0.1, 0)  # files 0-2 are class a, 3-5 class b
    assert one.n_train == (train >= 3).sum() and (one.split_labels("train")[:, 0] == 1).all()
    assert validation_holdout_mask(one.meta, one.labels).sum() == 3

    unselected = shapes_config(labels=["shape"], holdout=["colour=red"])
    with pytest.raises(ConfigError, match=r"'colour' is not in data\.labels=\['shape'\]"):
        prepare(unselected, tmp_path / "run4", seed=0)
