"""The spoken-word pipeline: a diffusion run on spoken-digit pictures, heard as sound.

``pipe(n, labels=..., ...)`` is the diffusion pipeline's call (log-mel pictures, with
its samplers, steps and guidance); ``generate`` and ``speak`` turn the pictures into
one-second waveforms by Griffin-Lim and return an AudioOutput."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from aigc.errors import RequestError
from aigc.pipelines.base import AudioOutput
from aigc.pipelines.diffusion import DiffusionPipeline


class SpokenPipeline(DiffusionPipeline):
    """A trained spoken-digit model: ``generate(n, labels="seven")`` says a digit."""

    kind: ClassVar[str] = "spoken"
    verbs: ClassVar[frozenset[str]] = frozenset({"generate", "diffuse", "speak"})

    @property
    def sample_rate(self) -> int:
        from aigc.data.speech import SAMPLE_RATE

        return SAMPLE_RATE

    def to_audio(self, pictures: torch.Tensor, seed: int | None = None) -> AudioOutput:
        """(n, 1, H, W) pictures in [-1, 1] -> AudioOutput of n one-second clips."""
        from aigc.data.speech import pictures_to_waves

        iters = int(self.config.data.vocoder_iters)
        waves = pictures_to_waves(pictures.detach().cpu(), iters=iters, seed=seed or 0)
        return AudioOutput(list(waves), self.sample_rate, seed)

    def generate(
        self,
        n: int = 8,
        labels: Any = None,
        seed: int | None = None,
        output: str = "audio",
        watermark: str | None = None,
        **kw: Any,
    ) -> Any:
        """n clips of the ``labels`` asked for (a digit's name or index; None draws
        them), with __call__'s keywords (num_inference_steps, guidance_scale,
        scheduler, callback). ``output="audio"`` gives an AudioOutput; "tensor" the
        pictures (n, 1, H, W) in [-1, 1], as DiffusionPipeline.generate. ``watermark``: a
        key that marks the clips inaudibly (aigc.safety.audio_watermark; audio only)."""
        from aigc.pipelines.image import check_watermark

        if output not in ("audio", "tensor"):
            raise RequestError(f"output={output!r}: choose audio or tensor")
        if watermark is not None and output != "audio":
            raise RequestError("watermark= marks the sound; ask for output='audio'")
        check_watermark(watermark)
        pictures = self(n, labels=labels, seed=seed, **kw).images
        if output == "tensor":
            return pictures
        return self.postprocess(self.to_audio(pictures, seed), watermark)

    def speak(
        self,
        text: str,
        voice: str | None = None,
        speed: float | None = None,
        seed: int | None = None,
        n: int = 1,
        watermark: str | None = None,
        **kw: Any,
    ) -> AudioOutput:
        """``text`` one digit ("seven" or "7"), or for a run on a folder of audio files
        one of its classes (case aside): n one-second clips of it, in a voice the model
        draws (``voice`` None or "any") and at its one speed (``speed`` None or 1).
        ``watermark``: a key that marks them (as ``generate``). RequestError for other
        text, voices or speeds."""
        from aigc.data.speech import DIGITS

        if voice not in (None, "any"):
            raise RequestError(f"voice={voice!r}: this model draws the voice itself; give "
                               "voice 'any' or leave it out")  # fmt: skip
        if speed not in (None, 1, 1.0):
            raise RequestError(f"speed={speed!r}: this model says a {self.task.word} at one "
                               "speed (1)")  # fmt: skip
        names = list(self.task.meta["classes"][self.task.word])
        word = str(text).strip().rstrip(".!?").lower()
        if self.task.embedded and word.isdigit() and len(word) == 1:
            word = DIGITS[int(word)]
        said = [name for name in names if name.lower() == word]
        if not said:
            listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            digits = " (or 0-9)" if self.task.embedded else ""
            raise RequestError(f"{text!r}: this model says one {self.task.word}: {listed}{digits}")
        return self.generate(n, labels=said[0], seed=seed, watermark=watermark, **kw)

    def format_eval(self, result: dict[str, Any]) -> str:
        head = f"{self.run.path} at step {result['step']}"
        if "sampler" in result:
            head += f", sampled by {result['sampler']} in {result['sample_steps']} steps"
            if "guidance" in result:
                head += f" at guidance {result['guidance']:g}"
        lines = [head, f"  {result['samples']:,} generated clips, heard by the audio judge "
                        f"(its accuracy on clips it never heard: {result['judge_accuracy']:.1%}):"]  # fmt: skip
        skip = {"step", "samples", "judge_accuracy", "sampler", "sample_steps", "guidance",
                "variant"}  # fmt: skip
        lines += [f"    {k:<30} {v:.4f}" for k, v in result.items()
                  if k not in skip and isinstance(v, int | float)]  # fmt: skip
        return "\n".join(lines)
