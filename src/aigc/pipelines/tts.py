"""The text-to-speech pipeline: text in, speech in one of the run's voices out.

flite's front end reads the text as phones (as espeak does for many neural voices);
the run's PhoneTTS says them; Griffin-Lim makes the sound. Digits are read one by one
("427" is "four two seven")."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from aigc.errors import DataError, RequestError
from aigc.pipelines.base import AudioOutput, Pipeline

MIN_SPEED, MAX_SPEED = 0.25, 4.0  # OpenAI's range for /v1/audio/speech


class TTSPipeline(Pipeline):
    """A trained text-to-speech run: ``speak(text, voice=..., speed=...)``."""

    kind = "speech"
    verbs = frozenset({"speak"})

    @property
    def voices(self) -> list[str]:
        return list(self.task.meta["voices"]) if self.task.meta else []

    @property
    def sample_rate(self) -> int:
        from aigc.tasks.tts import SAMPLE_RATE

        return SAMPLE_RATE

    def phones(self, text: str) -> list[str]:
        """The phones ``text`` is said with; RequestError for text it cannot say
        (characters, or phones never heard in training)."""
        from aigc.data.speech import normalise_text, phones_of

        try:
            said = phones_of(normalise_text(text))
        except DataError as e:
            raise RequestError(str(e)) from None
        seen = set(self.task.meta["phones_seen"])
        learnt = "its transcribed speech" if "folder" in self.task.meta else "digit strings"
        unknown = sorted({p for p in said if p not in seen})
        if unknown:
            raise RequestError(
                f"{text[:60]!r} needs the phones {', '.join(unknown)}, which this model never "
                f"heard in training: it says what it learnt ({learnt})"
            )
        return list(said)

    def speak(
        self,
        text: str,
        voice: str | None = None,
        speed: float | None = None,
        seed: int | None = None,
        watermark: str | None = None,
    ) -> AudioOutput:
        """``text`` said in ``voice`` (one of ``voices``; None: the last, "slt" in the
        recipe) at ``speed`` (0.25 to 4; 1 is the voice's own pace). Deterministic:
        ``seed`` fixes Griffin-Lim's starting phases. ``watermark``: a key that marks the
        sound inaudibly (aigc.safety.audio_watermark). RequestError naming what is wrong."""
        from aigc.safety.image_watermark import check_key
        from aigc.tasks.tts import encode_phones, mel_to_wave

        if watermark is not None:
            check_key(watermark)

        voices = self.voices
        if voice in (None, "any"):
            voice = "slt" if "slt" in voices else voices[-1]
        if voice not in voices:
            raise RequestError(f"voice={voice!r}: this model speaks in {', '.join(voices)}")
        speed = 1.0 if speed is None else speed
        if (
            isinstance(speed, bool)
            or not isinstance(speed, int | float)
            or not (MIN_SPEED <= speed <= MAX_SPEED)
        ):
            raise RequestError(f"speed={speed!r} must be a number in [{MIN_SPEED}, {MAX_SPEED}]")
        ids = encode_phones(self.phones(text))
        phones = torch.tensor([ids], dtype=torch.long, device=self.device)
        v = torch.tensor([voices.index(voice)], device=self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            mel, _dur = self.model.synthesise(phones, v, float(speed))
        wave = mel_to_wave(mel[0], int(self.config.data.vocoder_iters), seed or 0)
        samples = len(wave)
        peak = max(float(np.abs(wave).max()), 1e-9)
        wave = (wave * (0.9 / peak)).astype(np.float32)
        self.last_real_time_factor = (time.perf_counter() - start) / (samples / self.sample_rate)
        return self.postprocess(AudioOutput([wave], self.sample_rate, seed), watermark)

    def format_eval(self, result: dict[str, Any]) -> str:
        if "string_accuracy" not in result:  # a folder of speech: no judge of free text
            lines = [f"{self.run.path} at step {result['step']}, held-out recordings:"]
            for k in ("mel_l1", "duration_error_frames", "real_time_factor"):
                lines.append(f"  {k:<30} {result[k]:.4f}")
            return "\n".join(lines)
        lines = [f"{self.run.path} at step {result['step']}",
                 f"  held-out digit strings, words cut at the model's durations and named by "
                 f"the audio judge (its accuracy on unheard clips: {result['judge_accuracy']:.1%}):",
                 f"    {'':<22}{'model':>8}{'flite':>8}",
                 f"    {'strings all right':<22}{result['string_accuracy']:>8.1%}"
                 f"{result['string_accuracy_flite']:>8.1%}",
                 f"    {'digits right':<22}{result['digit_accuracy']:>8.1%}"
                 f"{result['digit_accuracy_flite']:>8.1%}"]  # fmt: skip
        for k in ("mel_l1", "duration_error_frames", "real_time_factor"):
            lines.append(f"  {k:<30} {result[k]:.4f}")
        return "\n".join(lines)
