"""POST /v1/audio/denoise: an uploaded audio file denoised by a denoising run, returned
as a WAV or FLAC file of the same sample rate and length. The form follows OpenAI's
audio uploads (``file`` and ``model``, multipart); the body's size is bounded by the
middleware, the audio's length by MAX_SECONDS."""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from aigc.errors import RequestError
from aigc.serve.schemas import ApiError

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

    def work() -> bytes:
        import soundfile as sf

        out = pipe.denoise(data, max_seconds=MAX_SECONDS)
        buf = io.BytesIO()
        kind, subtype, _ = FORMATS[fmt]
        sf.write(buf, out.waveforms[0], out.sample_rate, format=kind, subtype=subtype)
        return buf.getvalue()

    try:
        body = await service.on_model_thread(served, work, service.deadline())
    except RequestError as e:
        raise ApiError(400, str(e), param="file") from None
    return Response(body, media_type=FORMATS[fmt][2],
                    headers={"x-aigc-created": str(int(time.time()))})  # fmt: skip
