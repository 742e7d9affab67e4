"""The sample writer table: what the trainer writes, the report finds again."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from aigc.data.audio import read_audio
from aigc.samples import SAMPLE_KINDS, AudioSample, MidiSample, find_samples, write_samples


class Recorder:
    """Stands in for TensorBoard's SummaryWriter: records what was logged."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def add_text(self, tag, text, step):
        self.calls.append(("text", tag, step))

    def add_image(self, tag, image, step, dataformats):
        assert dataformats == "HWC"
        self.calls.append(("image", tag, step))

    def add_audio(self, tag, snd_tensor, step, sample_rate):
        assert snd_tensor.shape[0] == 1 and float(snd_tensor.abs().max()) <= 1.0
        self.calls.append(("audio", tag, step, sample_rate))


def test_each_kind_is_written_and_found_again(tmp_path):
    grid = np.random.default_rng(0).integers(0, 256, (6, 10, 3), np.uint8)
    grey = np.zeros((4, 4, 1), np.uint8)
    tone = np.sin(np.arange(800) / 5).astype(np.float32) * 0.5
    clip = AudioSample(tone, 8000)
    tb = Recorder()
    for step in (20, 10):
        samples = {"a": "one", "b": "two", "grid 1": grid, "g": grey, "say/seven": clip,
                   "tune": MidiSample(b"MThd" + bytes([step]))}  # fmt: skip
        write_samples(tmp_path, step, samples, tb)
    assert (tmp_path / "step-00000010.txt").read_text() == "=== a ===\none\n\n=== b ===\ntwo\n"
    with Image.open(tmp_path / "step-00000020-grid_1.png") as im:
        assert np.array_equal(np.asarray(im), grid)
    found = find_samples(tmp_path)
    assert set(found) == {k.name for k in SAMPLE_KINDS}
    assert [s for s, _ in found["text"][""]] == [10, 20]
    assert sorted(found["image"]) == ["g", "grid_1"]
    assert [s for s, _ in found["image"]["grid_1"]] == [10, 20]
    assert ("text", "samples/a", 20) in tb.calls and ("image", "samples/grid 1", 10) in tb.calls
    assert [s for s, _ in found["audio"]["say_seven"]] == [10, 20]
    back, rate = read_audio(tmp_path / "step-00000010-say_seven.wav")
    assert rate == 8000
    np.testing.assert_allclose(back, tone, atol=1 / 32768 + 1e-7)
    assert ("audio", "samples/say/seven", 20, 8000) in tb.calls
    assert [s for s, _ in found["midi"]["tune"]] == [10, 20]
    assert ("text", "samples/tune", 10) in tb.calls  # TensorBoard: a note of the file
    assert (tmp_path / "step-00000020-tune.mid").read_bytes() == b"MThd\x14"
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_a_sample_of_no_known_kind_is_refused(tmp_path):
    with pytest.raises(TypeError, match="no sample kind accepts a list"):
        write_samples(tmp_path, 1, {"x": [1, 2]})
    assert find_samples(tmp_path / "missing") == {}
