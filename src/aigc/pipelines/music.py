"""The symbolic-music pipeline: a chorale GPT composes four-part chorales, returned as
chorales (aigc.data.music.Chorale), MIDI files and rendered audio."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from aigc.errors import RequestError
from aigc.pipelines.base import AudioOutput, Pipeline, check_count

MAX_BARS = 64
DEFAULT_BARS = 8


@dataclass
class MusicOutput:
    """Composed chorales, with the seed that fixes them; ``midi()`` and ``audio()`` give
    them as files and as sound."""

    chorales: list[Any]
    seed: int | None
    tempo: float
    sample_rate: int
    watermark: str | None = None  # a key that marks the rendered audio (not the MIDI)

    def midi(self) -> list[bytes]:
        """Each chorale as the bytes of a standard MIDI file (one track per voice)."""
        from aigc.data.music import midi_bytes

        return [midi_bytes(c, self.tempo) for c in self.chorales]

    def audio(self) -> AudioOutput:
        """Each chorale rendered by aigc.data.music.render, with its MIDI file; the sound
        marked with ``watermark`` where there is one (aigc.safety.audio_watermark)."""
        from aigc.data.music import render

        waves = [render(c, self.sample_rate, self.tempo) for c in self.chorales]
        out = AudioOutput(waves, self.sample_rate, self.seed, self.midi())
        if self.watermark is not None:
            from aigc.safety.audio_watermark import mark_output

            out = mark_output(out, self.watermark)
        return out


class MusicPipeline(Pipeline):
    """A trained chorale model: ``generate`` composes, ``evaluate`` measures."""

    kind = "music"
    verbs = frozenset({"compose"})

    def generate(
        self,
        n: int = 1,
        bars: int = DEFAULT_BARS,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        watermark: str | None = None,
    ) -> MusicOutput:
        """n chorales of ``bars`` bars of 4/4 from the start token. The seed fixes them
        (chorale i does not depend on n); temperature 0 is greedy; ``top_k`` keeps the
        k likeliest tokens at each draw; ``watermark``: a key that marks their rendered
        sound (``audio()``; MIDI files carry no mark). RequestError naming a bad argument."""
        from aigc.pipelines.image import check_watermark

        check_count(n, limit=256)
        check_watermark(watermark)
        if isinstance(bars, bool) or not isinstance(bars, int) or not 1 <= bars <= MAX_BARS:
            raise RequestError(f"bars={bars!r} must be an integer in [1, {MAX_BARS}]")
        if (isinstance(temperature, bool) or not isinstance(temperature, int | float)
                or not 0 <= temperature <= 10 or math.isnan(temperature)):  # fmt: skip
            raise RequestError(f"temperature={temperature!r} must be a number in [0, 10]")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or top_k < 1):  # fmt: skip
            raise RequestError(f"top_k={top_k!r} must be a positive integer")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed < 2**63):  # fmt: skip
            raise RequestError(f"seed={seed!r} must be an integer in [0, 2**63)")
        d = self.config.data
        with torch.inference_mode():
            chorales = self.task.generate(self.model, n, bars, seed, float(temperature), top_k,
                                          self.device)  # fmt: skip
        return self.postprocess(MusicOutput(chorales, seed, d.tempo, d.sample_rate, watermark))

    def format_eval(self, result: dict[str, Any]) -> str:
        """NLL per note against the floor, then the music checks beside the real rates."""
        lines = [f"{self.run.path} at step {result['step']}"]
        if "nll_per_note" in result:
            lines.append(f"  held-out NLL {result['nll_per_note']:.3f} nats/note; "
                         f"{result['ngram_floor']:.3f} for the 3-gram floor "
                         f"({result['below_floor']:+.1%} below it)")  # fmt: skip
        if "sample_in_key" in result:
            for key, what in (("in_key", "notes in the key"), ("in_range", "notes in range"),
                              ("parallels", "parallel 5ths/8ves per move")):  # fmt: skip
                lines.append(f"  {what:<30} samples {result['sample_' + key]:.2%}, "
                             f"real chorales {result['real_' + key]:.2%}")  # fmt: skip
        return "\n".join(lines)
