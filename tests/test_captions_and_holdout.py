"""Captions (digits, image folders with a metadata.jsonl or metadata.csv): captions stay
with their images through chunked decoding, skip_bad and the split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import aigc.data.images as image_data
from aigc.data.images import load_image_set
from aigc.errors import DataError
from aigc.tasks.images import ImageDataConfig, prepare

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
