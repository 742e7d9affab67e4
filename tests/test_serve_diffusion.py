"""The HTTP service on diffusion runs: text-to-image through the official openai client,
diffusers' arguments as extensions, concurrent requests denoised in one batch with
each request's own pixels, and streamed previews in OpenAI's image-streaming events.

Servers run in a thread (test_serve.Server); what they return is compared with the
Python API's DiffusionPipeline for the same arguments.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

import aigc
from aigc.pipelines.image import image_output
from aigc.schedulers import SCHEDULERS
from aigc.serve.app import create_app
from aigc.serve.settings import ServeSettings

from .test_serve import SETTINGS, Server, _assert_openai_error, _pngs

openai = pytest.importorskip("openai")

# max_steps above the runs' 1000 training timesteps: the model's own limit applies
DIFFUSION_SETTINGS = {**SETTINGS, "max_steps": 5000}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def pipes(diffusion_runs):
    """The same runs through the Python API, to compare with."""
    return {name: aigc.load(path, device="cpu") for name, path in diffusion_runs.items()}


@pytest.fixture(scope="module")
def server(diffusion_runs):
    app = create_app(list(diffusion_runs.values()), ServeSettings(**DIFFUSION_SETTINGS))
    srv = Server(app)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def _u8(pipe_output) -> np.ndarray:
    """(n, H, W, C) uint8 of a pipeline's ImageOutput, as PNGs decode them."""
    return image_output(pipe_output.images, "uint8")


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_text_to_image_through_the_openai_client_is_the_python_apis(client, pipes):
    extra = {"num_inference_steps": 4, "seed": 0, "guidance_scale": 2.5,
             "negative_prompt": "a blue square", "scheduler": "ddim"}  # fmt: skip
    r = client.images.generate(model="t2i", prompt="a small red circle", n=2, size="32x32",
                               response_format="b64_json", extra_body=extra)  # fmt: skip
    got = np.stack(_pngs(r))
    expected = pipes["t2i"](2, prompt="a small red circle", negative_prompt="a blue square",
                            num_inference_steps=4, guidance_scale=2.5, scheduler="ddim", seed=0)  # fmt: skip
    assert got.shape == (2, 32, 32, 3) and np.array_equal(got, _u8(expected))
    # the run's defaults (its sampler, steps and guidance) when the extensions are left out
    default = np.stack(_pngs(client.images.generate(model="t2i", prompt="a large blue cross",
                                                    extra_body={"seed": 5})))  # fmt: skip
    assert np.array_equal(default, _u8(pipes["t2i"](1, prompt="a large blue cross", seed=5)))


def test_class_conditional_diffusion_reads_labels_from_the_prompt(client, pipes):
    r = client.images.generate(model="ddpm", prompt="7", n=3,
                               extra_body={"num_inference_steps": 3, "seed": 1, "guidance_scale": 2.0})  # fmt: skip
    expected = pipes["ddpm"](3, labels={"class": "7"}, num_inference_steps=3,
                             guidance_scale=2.0, seed=1)  # fmt: skip
    assert np.array_equal(np.stack(_pngs(r)), _u8(expected)[..., 0])


def test_models_list_a_diffusion_runs_choices_and_limits(client):
    cards = {m.id: m.model_extra["aigc"] for m in client.models.list().data}
    t2i, ddpm = cards["t2i"]["diffusion"], cards["ddpm"]["diffusion"]
    assert cards["t2i"]["kind"] == "image" and cards["t2i"]["family"] == "diffusion"
    assert t2i == {"text": True, "schedulers": sorted(SCHEDULERS), "scheduler": "dpm++2m",
                   "num_inference_steps": 2, "max_inference_steps": 1000,
                   "guidance_scale": 3.0, "max_guidance_scale": 50.0}  # fmt: skip
    assert not ddpm["text"] and cards["ddpm"]["conditional"]


LONG_CAPTION = "a small red circle at the top left " * 4  # past the encoder's 32 tokens

# fmt: off
BAD = [  # (body, status, param)
    ({"num_inference_steps": 0}, 400, "num_inference_steps"),
    ({"num_inference_steps": 1001}, 400, "num_inference_steps"),  # the model's 1000 timesteps
    ({"guidance_scale": -0.5}, 400, "guidance_scale"),
    ({"guidance_scale": 51}, 400, "guidance_scale"),
    ({"guidance_scale": "high"}, 422, "guidance_scale"),
    ({"scheduler": "euler_a"}, 400, "scheduler"),
    ({"prompt": LONG_CAPTION}, 400, "prompt"),
    ({"negative_prompt": LONG_CAPTION}, 400, "negative_prompt"),
    ({"size": "64x64"}, 400, "size"),
    ({"response_format": "url"}, 400, "response_format"),
    ({"n": 5}, 400, "n"),
    ({"seed": -1}, 400, "seed"),
    ({"labels": {"colour": "red"}}, 400, "labels"),
    ({"partial_images": 1}, 400, "partial_images"),  # without stream
    ({"stream": True, "partial_images": 3, "num_inference_steps": 2}, 400, "partial_images"),
    ({"stream": True, "partial_images": -1}, 400, "partial_images"),
    ({"num_inference_steps": 2.5}, 422, "num_inference_steps"),
    ({"eta": 0.5}, 422, "eta"),
    ({"model": "ddpm", "prompt": "7", "negative_prompt": "8"}, 400, "negative_prompt"),
    ({"model": "ddpm", "prompt": "class=11"}, 400, None),
]
# fmt: on


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_diffusion_requests_are_4xx_naming_the_field(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/images/generations",
                   json={"model": "t2i", "prompt": "a red circle", **body}, timeout=30)  # fmt: skip
    assert r.status_code == status, r.text
    _assert_openai_error(r.json(), param)


def test_error_messages_say_what_to_do(server):
    def message(**body) -> str:
        r = httpx.post(f"{server.url}/v1/images/generations",
                       json={"model": "t2i", "prompt": "a", **body}, timeout=30)  # fmt: skip
        return r.json()["error"]["message"]

    assert all(name in message(scheduler="euler_a") for name in SCHEDULERS)
    assert "1000" in message(num_inference_steps=1001)
    assert "shorten it" in message(prompt=LONG_CAPTION)  # the pipeline's own message


def _serve(diffusion_runs, **settings) -> Server:
    settings = {**DIFFUSION_SETTINGS, **settings}
    return Server(create_app([diffusion_runs["t2i"]], ServeSettings(**settings)))


def test_the_servers_max_steps_limits_num_inference_steps(diffusion_runs):
    srv = _serve(diffusion_runs, max_steps=8)
    try:
        body = {"model": "t2i", "prompt": "a", "num_inference_steps": 9}
        r = httpx.post(f"{srv.url}/v1/images/generations", json=body, timeout=30)
        assert r.status_code == 400 and "--max-steps" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/v1/images/generations", json={**body, "num_inference_steps": 8})
        assert r.status_code == 200
    finally:
        srv.close()


ASKS = [  # (prompt, n, extensions): one scheduler and step count, different everything else
    ("a small red circle", 1, {"seed": 1, "guidance_scale": 3.0}),
    (
        "a large blue square at the top left",
        2,
        {"seed": 2, "guidance_scale": 5.0, "negative_prompt": "a green cross"},
    ),
    ("", 1, {"seed": 3, "guidance_scale": 0.0}),
    ("a green triangle", 2, {"seed": 4}),
]


def test_concurrent_requests_are_denoised_in_one_batch_with_their_own_pixels(diffusion_runs):
    """Four requests that arrive together (within --image-wait-ms) are one denoising loop;
    each gets exactly the pixels it gets alone. A fifth of another scheduler gets a loop of
    its own."""
    total = sum(n for _, n, _ in ASKS) + 1
    srv = _serve(diffusion_runs, image_wait_ms=5000, max_image_batch=total)
    served = srv.app.state.aigc.models["t2i"]
    pipe, loops = served.generator, []
    run_batch = pipe.run_batch

    def counting(jobs, callback=None):
        calls = [0]

        def counted(i, count, x0):
            calls[0] += 1
            callback(i, count, x0)

        out = run_batch(jobs, counted)
        loops.append(([j.request.n for j in jobs], calls[0]))
        return out

    pipe.run_batch = counting
    steps = {"num_inference_steps": 5, "scheduler": "ddim"}
    client = srv.client()

    def ask(item):
        prompt, n, extra = item
        r = client.images.generate(model="t2i", prompt=prompt, n=n, extra_body={**steps, **extra})
        return np.stack(_pngs(r))

    other = ("a red cross", 1, {"seed": 5, "num_inference_steps": 3, "scheduler": "euler"})
    try:
        start = time.monotonic()
        together = list(ThreadPoolExecutor(5).map(ask, [*ASKS, other]))
        assert time.monotonic() - start < 4  # the gathering ended when the batch was full
        batched = sorted(loops)
        sample = srv.app.state.aigc.metrics.registry.get_sample_value
        assert sample("aigc_image_batch_size_count", {"model": "t2i"}) == 2
        assert sample("aigc_image_batch_size_sum", {"model": "t2i"}) == total
        served.diffusion.max_wait = 0  # alone, each request: no waiting for company
        loops.clear()
        alone = [ask(item) for item in [*ASKS, other]]
    finally:
        srv.close()
    # one loop of 5 steps for the four requests of ddim (their images together), one of
    # 3 for euler's
    assert [(sorted(ns), calls) for ns, calls in batched] == [([1], 3), ([1, 1, 2, 2], 5)]
    assert [len(ns) for ns, _ in loops] == [1] * 5
    for a, b in zip(together, alone, strict=True):
        assert np.array_equal(a, b)


def test_streaming_sends_previews_of_each_image_then_the_images(client, server, pipes):
    """OpenAI's image-streaming events through the openai client: partial_images previews
    per image (the pipeline's x_0 estimate at evenly spread steps), then the images."""
    kw = {"num_inference_steps": 6, "seed": 3, "scheduler": "ddim", "guidance_scale": 2.0}
    stream = client.images.generate(model="t2i", prompt="a blue circle", n=2, stream=True,
                                    partial_images=2, response_format="b64_json", extra_body=kw)  # fmt: skip
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    partial = [e.model_extra for e in events[:4]]  # aigc's extensions
    indices = [(e.partial_image_index, p["index"]) for e, p in zip(events, partial, strict=False)]
    assert indices == [(0, 0), (0, 1), (1, 0), (1, 1)]  # preview 0 of both images, then 1
    steps = [p["step"] for p in partial]
    assert steps == [2, 2, 4, 4] and {p["total_steps"] for p in partial} == {6}
    assert all(e.size == "32x32" and e.output_format == "png" for e in events)

    estimates = {}

    def record(i, count, x0):
        estimates[i] = x0.clone()

    expected = pipes["t2i"](2, prompt="a blue circle", callback=record, **kw)
    for e, p in zip(events[:4], partial, strict=True):
        want = image_output(estimates[p["step"]][p["index"] : p["index"] + 1], "uint8")[0]
        assert np.array_equal(_decode(e.b64_json), want)
    finals = np.stack([_decode(e.b64_json) for e in events[4:]])
    assert np.array_equal(finals, _u8(expected))
    assert [e.model_extra["index"] for e in events[4:]] == [0, 1]


def test_a_stream_is_server_sent_events_with_their_names(server):
    body = {"model": "t2i", "prompt": "a", "n": 1, "stream": True, "partial_images": 1,
            "num_inference_steps": 2}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    blocks = [b for b in text.split("\n\n") if b]
    names = [b.split("\n")[0] for b in blocks]
    assert names == ["event: image_generation.partial_image", "event: image_generation.completed"]
    data = [json.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
    assert [d["type"] for d in data] == ["image_generation.partial_image", "image_generation.completed"]  # fmt: skip
    assert data[0]["step"] == 1 and data[0]["total_steps"] == 2


def _slowed(srv: Server, seconds: float = 0.005) -> list[int]:
    """Makes each step of the t2i model's loops take at least `seconds` (so that 1000
    steps outlast the tests' limits on any machine); returns the steps, as they run."""
    served = srv.app.state.aigc.models["t2i"]
    steps, run_batch = [], served.generator.run_batch

    def slow(jobs, callback=None):
        def counted(i, count, x0):
            steps.append(i)
            time.sleep(seconds)
            callback(i, count, x0)

        return run_batch(jobs, counted)

    served.generator.run_batch = slow
    return steps


def test_a_diffusion_request_past_its_time_limit_gets_408_and_frees_the_model(diffusion_runs):
    srv = _serve(diffusion_runs, request_timeout_s=0.5)
    steps = _slowed(srv)
    try:
        body = {"model": "t2i", "prompt": "a", "num_inference_steps": 1000, "seed": 0}
        r = httpx.post(f"{srv.url}/v1/images/generations", json=body, timeout=30)
        assert r.status_code == 408
        _assert_openai_error(r.json())
        with httpx.stream("POST", f"{srv.url}/v1/images/generations",
                          json={**body, "stream": True}, timeout=30) as s:  # fmt: skip
            blocks = [b for b in s.read().decode().split("\n\n") if b]
        assert blocks[-1].startswith("event: error\n") and "request_timeout" in blocks[-1]
        # the abandoned loops stopped: a short request is answered at once
        start = time.monotonic()
        r = httpx.post(f"{srv.url}/v1/images/generations",
                       json={**body, "num_inference_steps": 2}, timeout=30)  # fmt: skip
        assert r.status_code == 200 and time.monotonic() - start < 2
        assert len(steps) < 1000 + 2  # neither long loop ran to its end
    finally:
        srv.close()


def test_shutdown_ends_waiting_and_running_diffusion_requests_with_an_answer(diffusion_runs):
    srv = _serve(diffusion_runs)
    service = srv.app.state.aigc
    _slowed(srv)
    body = {"model": "t2i", "prompt": "a", "num_inference_steps": 1000}
    try:
        results = {}

        def ask(name, stream):
            if stream:  # one step fewer: it waits behind the other, or runs while it waits
                with httpx.stream("POST", f"{srv.url}/v1/images/generations",
                                  json={**body, "stream": True, "num_inference_steps": 999},
                                  timeout=30) as r:  # fmt: skip
                    results[name] = r.read().decode()
            else:
                results[name] = httpx.post(f"{srv.url}/v1/images/generations", json=body,
                                           timeout=30)  # fmt: skip

        threads = [threading.Thread(target=ask, args=(k, k == "stream")) for k in ("whole", "stream")]  # fmt: skip
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(service.live) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        ended = []

        async def end():  # as the shutdown does, on the server's event loop
            ended.append(service.end_in_flight(0.0))

        loop = next(iter(service.live)).loop
        asyncio.run_coroutine_threadsafe(end(), loop).result(10)
        for t in threads:
            t.join(10)
    finally:
        srv.close()
    assert ended == [2]
    assert results["whole"].status_code == 503
    assert results["whole"].json()["error"]["code"] == "shutting_down"
    assert "event: error" in results["stream"] and "shutting_down" in results["stream"]


def test_a_full_diffusion_queue_answers_429_and_clients_that_leave_free_the_model(
    diffusion_runs,
):
    srv = _serve(diffusion_runs, queue_size=1, image_wait_ms=0)
    served = srv.app.state.aigc.models["t2i"]
    release, steps = threading.Event(), []
    run_batch = served.generator.run_batch

    def held(jobs, callback=None):  # the first loop holds at its first step until released
        def counted(i, count, x0):
            steps.append(i)
            release.wait(20)
            callback(i, count, x0)

        return run_batch(jobs, counted)

    served.generator.run_batch = held
    long = {"model": "t2i", "prompt": "a", "num_inference_steps": 1000}
    url = f"{srv.url}/v1/images/generations"
    try:
        pool = ThreadPoolExecutor(2)
        running = pool.submit(httpx.post, url, json=long, timeout=2)
        deadline = time.monotonic() + 10
        while not steps:  # the worker runs it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waiting = pool.submit(httpx.post, url, json=long, timeout=2)
        while srv.metric("aigc_queue_depth", model="t2i") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(url, json={**long, "num_inference_steps": 2}, timeout=10)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        _assert_openai_error(r.json())
        assert r.json()["error"]["code"] == "queue_full"
        for left in (running, waiting):  # both clients give up
            with pytest.raises(httpx.TimeoutException):
                left.result()
        time.sleep(0.2)  # the server sees them leave
        assert srv.metric("aigc_queue_depth", model="t2i") == 0
        release.set()
        # the loop of the one that ran stops at its next step, the other never starts
        r = httpx.post(url, json={**long, "num_inference_steps": 2}, timeout=10)
        assert r.status_code == 200
        assert steps == [1, 1, 2]  # the abandoned loop's first step, then the short one's
    finally:
        release.set()
        srv.close()


# --- editing: /v1/images/edits and /v1/images/variations ----------------------------------


def _png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


EDIT_IMAGE = (np.arange(32 * 32 * 3) % 256).astype(np.uint8).reshape(32, 32, 3)
EDIT_MASK = np.where(np.arange(32)[:, None] >= 20, 255, 0).astype(np.uint8).repeat(32, 1)


def test_edits_through_the_openai_client_are_the_python_apis_inpainting(client, pipes):
    r = client.images.edit(
        model="t2i", image=("in.png", _png_bytes(EDIT_IMAGE), "image/png"),
        mask=("mask.png", _png_bytes(EDIT_MASK), "image/png"), prompt="a small red circle", n=2,
        size="32x32", response_format="b64_json",
        extra_body={"seed": 4, "num_inference_steps": 6, "resample": 2, "reconstruction": 3},
    )  # fmt: skip
    got = np.stack(_pngs(r))
    want = pipes["t2i"].inpaint(EDIT_IMAGE, EDIT_MASK, prompt="a small red circle", n=2, seed=4,
                                num_inference_steps=6, resample=2, reconstruction=3)  # fmt: skip
    assert np.array_equal(got, _u8(want))
    assert np.array_equal(got[:, :20], np.broadcast_to(EDIT_IMAGE[:20], (2, 20, 32, 3)))
    # OpenAI's convention: the image's own transparent pixels, no mask
    rgba = np.dstack([EDIT_IMAGE, np.where(EDIT_MASK > 0, 0, 255).astype(np.uint8)])
    r = client.images.edit(
        model="t2i", image=("in.png", _png_bytes(rgba, "RGBA"), "image/png"),
        prompt="a small red circle", n=2, response_format="b64_json",
        extra_body={"seed": 4, "num_inference_steps": 6, "resample": 2, "reconstruction": 3},
    )  # fmt: skip
    assert np.array_equal(np.stack(_pngs(r)), got)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # create_variation
def test_variations_and_image_to_image_edits(client, pipes):
    r = client.images.create_variation(
        model="ddpm", image=("one.png", _png_bytes(EDIT_IMAGE[..., 0]), "image/png"), n=3,
        response_format="b64_json", extra_body={"seed": 2, "strength": 0.5},
    )  # fmt: skip
    want = pipes["ddpm"].img2img(EDIT_IMAGE[..., 0], strength=0.5, n=3, seed=2)
    assert np.array_equal(np.stack(_pngs(r)), _u8(want)[..., 0])
    # an edit without mask or transparency, with a strength: image-to-image to a prompt
    r = client.images.edit(
        model="t2i", image=("in.png", _png_bytes(EDIT_IMAGE), "image/png"),
        prompt="a large blue cross", response_format="b64_json",
        extra_body={"seed": 1, "strength": 0.3},
    )  # fmt: skip
    want = pipes["t2i"].img2img(EDIT_IMAGE, strength=0.3, prompt="a large blue cross", seed=1)
    assert np.array_equal(np.stack(_pngs(r)), _u8(want))


def test_an_edit_streams_previews_of_the_filling(server):
    files = {"image": ("in.png", _png_bytes(EDIT_IMAGE), "image/png"),
             "mask": ("m.png", _png_bytes(EDIT_MASK), "image/png")}  # fmt: skip
    data = {"model": "t2i", "prompt": "a red cross", "stream": "true", "partial_images": "2",
            "num_inference_steps": "4", "resample": "1"}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/images/edits", files=files, data=data,
                      timeout=60) as r:  # fmt: skip
        assert r.status_code == 200
        events = [line[len("event: ") :] for line in r.iter_lines() if line.startswith("event: ")]
    assert events == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]


# fmt: off
BAD_EDITS = [  # (form fields, files, status, param, words)
    ({}, {"mask": _png_bytes(np.zeros((16, 16), np.uint8))}, 400, "mask", "16x16"),
    ({}, {"mask": _png_bytes(np.zeros((32, 32), np.uint8))}, 400, None, "no pixel"),
    ({}, {"mask": _png_bytes(np.full((32, 32), 255, np.uint8))}, 400, None, "every pixel"),
    ({"strength": "0.5"}, {"mask": _png_bytes(EDIT_MASK)}, 400, "strength", "image-to-image"),
    ({"strength": "1.5"}, {}, 400, "strength", "(0, 1]"),
    ({"strength": "strong"}, {}, 400, "strength", "a number"),
    ({}, {"image": b"GIF89a but not really"}, 400, "image", "not an image"),
    ({}, {"image": _png_bytes(np.zeros((32, 48, 3), np.uint8))}, 400, "image", "square"),
    ({"resample": "3", "scheduler": "euler"}, {"mask": _png_bytes(EDIT_MASK)}, 400, "resample",
     "ddpm or ddim"),
    ({"num_inference_steps": "0"}, {}, 400, "num_inference_steps", "[1,"),
    ({"eta": "0.5"}, {}, 400, "eta", "not a field"),
    ({"quality": "hd"}, {}, 400, "quality", "not offered"),
    ({"model": "nobody"}, {}, 404, None, "nobody"),
]
# fmt: on


@pytest.mark.parametrize(("data", "files", "status", "param", "words"), BAD_EDITS)
def test_bad_edits_are_4xx_naming_the_field(server, data, files, status, param, words):
    form = {"model": "t2i", "prompt": "a red circle", **data}
    uploads = {"image": ("in.png", _png_bytes(EDIT_IMAGE), "image/png")}
    uploads.update({k: (f"{k}.png", v, "image/png") for k, v in files.items()})
    r = httpx.post(f"{server.url}/v1/images/edits", data=form, files=uploads, timeout=30)
    assert r.status_code == status, r.text
    _assert_openai_error(r.json(), param)
    assert words in r.json()["error"]["message"]


def test_an_edit_must_be_a_form_with_an_image(server):
    r = httpx.post(f"{server.url}/v1/images/edits", json={"model": "t2i", "prompt": "a"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/images/edits", data={"model": "t2i"},
                   files={"mask": ("m.png", _png_bytes(EDIT_MASK), "image/png")})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = httpx.post(f"{server.url}/v1/images/variations", data={"model": "t2i", "prompt": "a"},
                   files={"image": ("i.png", _png_bytes(EDIT_IMAGE), "image/png")})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
