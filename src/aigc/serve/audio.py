"""The audio routes.

POST /v1/audio/denoise: an uploaded audio file denoised by a denoising run, returned as
a WAV or FLAC file of the same sample rate and length. The form follows OpenAI's audio
uploads (``file`` and ``model``, multipart); the body's size is bounded by the
middleware, the audio's length by MAX_SECONDS.

POST /v1/audio/speech: OpenAI's text-to-speech body (``model``, ``input``, ``voice``,
``response_format``, ``speed``) answered by a run that speaks (a spoken-digit run says
one digit), as a WAV or FLAC file, marked inaudibly (aigc.safety.audio_watermark) when
the server has a watermark key."""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from aigc.errors import RequestError
from aigc.serve.moderation import screen_prompts
from aigc.serve.schemas import ApiError, SpeechRequest

if TYPE_CHECKING:
    from aigc.serve.service import Service

MAX_SECONDS = 600.0  # of one uploaded file
FORMATS = {"wav": ("WAV", "PCM_16", "audio/wav"), "flac": ("FLAC", "PCM_16", "audio/flac")}
FIELDS = ("model", "response_format")


async def denoise_audio(service: Service, request: Request) -> Response:
    """The answer to POST /v1/audio/denoise."""
    from starlette.datastructures import UploadFile

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "/v1/audio/denoise takes multipart/form-data: the audio as a file "
                       "field named file, the model as a text field", code="invalid_content_type")  # fmt: skip
    try:
        form = await request.form(max_files=2, max_fields=10)
    except Exception as e:  # starlette's MultiPartException or HTTPException: a bad form
        detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e)
        raise ApiError(400, f"cannot read the form: {detail}", code="invalid_form") from None
    fields: dict[str, str] = {}
    data: bytes | None = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "file" or data is not None:
                raise ApiError(400, f"{key}: give one audio file, as the field named file",
                               param=key)  # fmt: skip
            data = await value.read()
        elif key in FIELDS and key not in fields:
            fields[key] = value
        else:
            raise ApiError(400, f"{key} is not a field of /v1/audio/denoise (fields: file, "
                           f"{', '.join(FIELDS)})", param=key, code="unknown_parameter")  # fmt: skip
    if data is None:
        raise ApiError(400, "give the audio as a file field named file", param="file")
    if "model" not in fields:
        raise ApiError(400, "give the model (a served run's name)", param="model")
    fmt = fields.get("response_format", "wav")
    if fmt not in FORMATS:
        raise ApiError(400, f"response_format={fmt!r}: choose wav or flac",
                       param="response_format")  # fmt: skip
    served = service.model(fields["model"], "denoise")
    pipe = served.generator
    return await _audio_answer(
        service, served, lambda: pipe.denoise(data, max_seconds=MAX_SECONDS), fmt, "file"
    )


async def _audio_answer(service: Service, served, produce, fmt: str, param: str) -> Response:
    """produce() (an AudioOutput) on the model's thread, its first clip encoded as ``fmt``;
    a RequestError becomes a 400 about ``param``."""

    def work() -> bytes:
        import soundfile as sf

        out = produce()
        buf = io.BytesIO()
        kind, subtype, _ = FORMATS[fmt]
        sf.write(buf, out.waveforms[0], out.sample_rate, format=kind, subtype=subtype)
        return buf.getvalue()

    try:
        body = await service.on_model_thread(served, work, service.deadline())
    except RequestError as e:
        raise ApiError(400, str(e), param=param) from None
    return Response(body, media_type=FORMATS[fmt][2],
                    headers={"x-aigc-created": str(int(time.time()))})  # fmt: skip


MAX_INPUT = 4096  # characters of text to speak, as OpenAI's limit


async def speak_text(service: Service, body: SpeechRequest) -> Response:
    """The answer to POST /v1/audio/speech."""
    fmt = body.response_format or "wav"
    if fmt not in FORMATS:
        raise ApiError(400, f"response_format={fmt!r}: this server writes wav or flac",
                       param="response_format")  # fmt: skip
    if body.instructions:
        raise ApiError(400, "instructions are not read by these voices; leave them out",
                       param="instructions")  # fmt: skip
    if not body.input.strip():
        raise ApiError(400, "input is empty: give the text to speak", param="input")
    if len(body.input) > MAX_INPUT:
        raise ApiError(400, f"input has {len(body.input):,} characters; the most is {MAX_INPUT:,}",
                       param="input")  # fmt: skip
    body.input = (await screen_prompts(service, [body.input], "input"))[0]  # --moderation
    served = service.models.get(body.model)
    served = service.model(body.model, served.kind if served is not None and
                           "speak" in served.generator.verbs else "spoken")  # fmt: skip
    pipe = served.generator
    return await _audio_answer(
        service,
        served,
        lambda: pipe.speak(
            body.input,
            voice=body.voice,
            speed=body.speed,
            seed=body.seed,
            watermark=service.settings.watermark_key,
        ),
        fmt,
        "input",
    )
