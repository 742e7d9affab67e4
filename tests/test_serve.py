"""The HTTP service: the official openai client against real uvicorn servers on tiny runs.

Each server runs in a thread on a free port of 127.0.0.1; the texts and images it
returns are compared with the Python API's for the same parameters.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import re
import signal
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import aigc
from aigc.errors import ConfigError
from aigc.serve.app import create_app, prompt_to_labels
from aigc.serve.settings import ServeSettings

from .conftest import ROOT, run_cli, start_server

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

SETTINGS = dict(
    device="cpu",
    max_batch_size=8,
    max_wait_ms=10,
    max_tokens_limit=300,
    max_n=4,
    max_prompt_chars=500,
    max_prompt_tokens=400,
    max_body_bytes=16_384,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def runs(serve_runs) -> dict[str, Path]:
    return serve_runs


@pytest.fixture(scope="module")
def gens(runs):
    """The same runs through the Python API, to compare with."""
    return {name: aigc.load(path, device="cpu") for name, path in runs.items()}


class Server:
    """uvicorn serving `app` in a thread on a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        from aigc.serve.cli import bind

        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app = app
        # log_config=None: records go to the root logger, where caplog sees them
        config = uvicorn.Config(app, log_config=None, log_level="debug", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def client(self, key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30, **kw
        )

    def metric(self, name: str, **labels) -> float:
        """A sample's value from GET /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture(scope="module")
def server(runs):
    srv = Server(
        create_app([runs[n] for n in ("gpt", "chat", "cgan", "vae")], ServeSettings(**SETTINGS))
    )
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def _serve(runs, **settings) -> Server:
    return Server(create_app([runs["gpt"]], ServeSettings(**{**SETTINGS, **settings})))


# ---------------------------------------------------------------------------
# models, health, page


def test_models_list_each_run_with_its_kind_and_classes(client, server):
    cards = {m.id: m for m in client.models.list().data}
    assert sorted(cards) == ["cgan", "chat", "gpt", "vae"]
    ext = {name: card.model_extra["aigc"] for name, card in cards.items()}
    assert cards["gpt"].owned_by == "aigc" and cards["gpt"].object == "model"
    assert isinstance(cards["gpt"].created, int) and cards["gpt"].created > 1_600_000_000
    assert ext["gpt"]["kind"] == "text" and not ext["gpt"]["chat"]
    assert ext["chat"]["chat"] and ext["chat"]["family"] == "chat"
    assert ext["cgan"] == {**ext["cgan"], "kind": "image", "family": "gan", "conditional": True}
    assert ext["cgan"]["classes"] == {"class": [str(d) for d in range(10)]}
    assert ext["vae"]["kind"] == "image" and not ext["vae"]["conditional"]
    assert client.models.retrieve("cgan").id == "cgan"
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and {m["id"] for m in health["models"]} == set(cards)


def test_the_playground_page_and_what_it_links_are_served(server):
    """The playground ships in the package (aigc/serve/static, declared as package data),
    so GET / must be it, and every file it links under /static/ must be served as is."""
    static = files("aigc.serve") / "static"
    assert static.joinpath("index.html").is_file(), "aigc/serve/static/index.html is missing"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = pyproject["tool"]["setuptools"]["package-data"]["aigc"]
    for name in ("index.html", "app.js", "style.css"):
        assert any(fnmatch(f"serve/static/{name}", pattern) for pattern in shipped), name

    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == static.joinpath("index.html").read_text(encoding="utf-8")
    links = set(re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text))
    assert links >= {"/static/app.js", "/static/style.css"}
    for link in sorted(links):
        asset = httpx.get(f"{server.url}{link}")
        assert asset.status_code == 200, link
        assert asset.content == static.joinpath(link.removeprefix("/static/")).read_bytes()


# ---------------------------------------------------------------------------
# completions


def test_a_completion_is_the_python_apis_text_with_usage(client, gens):
    gen, prompt = gens["gpt"], "The for statement"
    r = client.completions.create(
        model="gpt", prompt=prompt, max_tokens=24, temperature=0.8, seed=5
    )
    (choice,) = r.choices
    assert choice.text == gen.generate(prompt, max_new_tokens=24, temperature=0.8, seed=5)
    assert r.object == "text_completion" and r.model == "gpt" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(gen.tokenizer.encode(prompt))
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.completions.create(
        model="gpt", prompt=prompt, max_tokens=24, temperature=0.8, seed=5
    )
    other = client.completions.create(
        model="gpt", prompt=prompt, max_tokens=24, temperature=0.8, seed=6
    )
    assert again.choices[0].text == choice.text != other.choices[0].text


def test_n_and_a_list_of_prompts_give_choices_in_order(client, gens):
    prompts = ["a", "The"]
    r = client.completions.create(model="gpt", prompt=prompts, n=2, max_tokens=10, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:  # choice j of a prompt: seed + j; temperature 1 is OpenAI's default
        p, j = prompts[c.index // 2], c.index % 2
        assert c.text == gens["gpt"].generate(p, max_new_tokens=10, temperature=1.0, seed=7 + j)
    assert r.choices[0].text != r.choices[1].text
    assert r.usage.prompt_tokens == 1 + 3


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="gpt", prompt="a", max_tokens=40, seed=2).choices[0]
    stop = full.text[10:12]
    r = client.completions.create(
        model="gpt", prompt="a", max_tokens=40, seed=2, stop=[stop, "never"]
    )
    assert r.choices[0].text == full.text[: full.text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model="gpt", prompt="a", max_tokens=40, seed=2, stop=stop, echo=True
    )
    assert r.choices[0].text == "a" + full.text[: full.text.find(stop)]


def test_streaming_pieces_join_to_the_whole_completion(client, server):
    kw = dict(model="gpt", prompt=["a", "The"], max_tokens=20, seed=4, temperature=0.9)
    whole = client.completions.create(**kw)
    texts, finish, usage, chunks = ["", ""], [None, None], None, 0
    for chunk in client.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    ):
        chunks += 1
        if not chunk.choices:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert chunks > 4 and usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**kw, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


# ---------------------------------------------------------------------------
# chat


def test_chat_completions_answer_as_the_python_api(client, gens):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "question 3 about lists?"},
    ]
    expected = gens["chat"].chat(messages, max_new_tokens=12, temperature=0)
    r = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=12, temperature=0
    )
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.usage.completion_tokens >= 1
    parts = [{"type": "text", "text": "question 3 "}, {"type": "text", "text": "about lists?"}]
    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=[messages[0], {"role": "user", "content": parts}],
            max_completion_tokens=12,
            temperature=0,
            stream=True,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt", messages=messages)
    assert e.value.code == "model_not_chat"


# ---------------------------------------------------------------------------
# images


def _pngs(response) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in response.data]


def test_images_are_pngs_of_the_asked_class(client, gens):
    r = client.images.generate(
        model="cgan", prompt="7", n=3, response_format="b64_json", extra_body={"seed": 1}
    )
    images = _pngs(r)
    assert len(images) == 3 and all(im.shape == (32, 32) for im in images)
    expected = gens["cgan"].generate(3, labels={"class": "7"}, seed=1, output="uint8")
    assert np.array_equal(np.stack(images), expected[..., 0])
    for prompt in ("class=7", " 7 "):
        assert np.array_equal(
            np.stack(
                _pngs(
                    client.images.generate(model="cgan", prompt=prompt, n=3, extra_body={"seed": 1})
                )
            ),
            expected[..., 0],
        )
    by_label = client.images.generate(
        model="cgan", prompt="", n=3, extra_body={"seed": 1, "labels": {"class": 7}}
    )
    assert np.array_equal(np.stack(_pngs(by_label)), expected[..., 0])
    # an unconditional run ignores the prompt (the openai client always sends one)
    vae = _pngs(client.images.generate(model="vae", prompt="anything", n=2, extra_body={"seed": 3}))
    assert np.array_equal(np.stack(vae), gens["vae"].generate(2, seed=3, output="uint8")[..., 0])
    assert vae[0].shape == (16, 16)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "cgan", "prompt": "7", "response_format": "url"}, "response_format"),
        ({"model": "cgan", "prompt": "7", "size": "1024x1024"}, "size"),
        ({"model": "cgan", "prompt": "7", "n": 5}, "n"),
        ({"model": "cgan", "prompt": "7", "seed": -1}, "seed"),
        ({"model": "cgan", "prompt": "cat"}, None),
        ({"model": "cgan", "prompt": "class=11"}, None),
        ({"model": "cgan", "prompt": "7", "labels": "3"}, "labels"),
        ({"model": "vae", "prompt": "x", "labels": {"class": 1}}, None),
        ({"model": "gpt", "prompt": "7"}, "model"),
        # diffusers' arguments are for diffusion runs; a GAN or VAE cannot honour them
        ({"model": "cgan", "prompt": "7", "num_inference_steps": 4}, "num_inference_steps"),
        ({"model": "cgan", "prompt": "7", "guidance_scale": 2.0}, "guidance_scale"),
        ({"model": "vae", "prompt": "x", "negative_prompt": ""}, "negative_prompt"),
        ({"model": "vae", "prompt": "x", "scheduler": "ddim"}, "scheduler"),
        ({"model": "vae", "prompt": "x", "stream": True}, "stream"),
    ],
)
def test_bad_image_requests_are_400(server, body, param):
    r = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=30)
    assert r.status_code == 400, r.text
    _assert_openai_error(r.json(), param)


def test_image_prompts_map_to_labels_by_name():
    classes = {"colour": ["red", "blue"], "shape": ["circle", "square"]}
    assert prompt_to_labels("Red, shape=square", classes) == {"colour": "red", "shape": "square"}
    assert prompt_to_labels("  ", classes) is None
    with pytest.raises(aigc.errors.RequestError, match="names no class"):
        prompt_to_labels("green", classes)


# ---------------------------------------------------------------------------
# errors


def _assert_openai_error(body: dict, param: str | None = None) -> None:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error


def assert_edits_refused(url: str, model: str, cases: list[tuple[dict, dict, str]]) -> None:
    """Each (form fields, files, param) sent to POST /v1/images/edits is a 400 in
    OpenAI's error shape naming ``param``."""
    import httpx

    for data, uploads, param in cases:
        resp = httpx.post(f"{url}/v1/images/edits", data={"model": model, **data},
                          files={k: (f"{k}.png", v, "image/png") for k, v in uploads.items()},
                          timeout=30)  # fmt: skip
        assert resp.status_code == 400, (param, resp.text)
        _assert_openai_error(resp.json(), param)


LONG = "a" * 501  # over max_prompt_chars=500

# fmt: off
BAD = [  # (endpoint, body, status, param)
    ("completions", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("completions", {"model": "cgan", "prompt": "a"}, 400, "model"),
    ("completions", {"prompt": "a"}, 422, "model"),
    ("completions", {"model": "gpt"}, 422, "prompt"),
    ("completions", {"model": "gpt", "prompt": 3}, 422, "prompt"),
    ("completions", {"model": "gpt", "prompt": [1, 2]}, 422, "prompt"),
    ("completions", {"model": "gpt", "prompt": "a", "temperature": "hot"}, 422, "temperature"),
    ("completions", {"model": "gpt", "prompt": "a", "n": True}, 422, "n"),
    ("completions", {"model": "gpt", "prompt": "a", "max_tokens": "5"}, 422, "max_tokens"),
    ("completions", {"model": "gpt", "prompt": "a", "max_tokens": 2.5}, 422, "max_tokens"),
    ("completions", {"model": "gpt", "prompt": "a", "top_k": 2.0}, 422, "top_k"),
    ("completions", {"model": "gpt", "prompt": "a", "color": 1}, 422, "color"),
    ("completions", {"model": "gpt", "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"model": "gpt", "prompt": "a", "max_tokens": 10**30}, 400, "max_tokens"),
    ("completions", {"model": "gpt", "prompt": "a", "n": 0}, 400, "n"),
    ("completions", {"model": "gpt", "prompt": "a", "n": 10**9}, 400, "n"),
    ("completions", {"model": "gpt", "prompt": ["a", "b", "c"], "n": 2}, 400, "n"),
    ("completions", {"model": "gpt", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("completions", {"model": "gpt", "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"model": "gpt", "prompt": "a", "top_k": 0}, 400, "top_k"),
    (
        "completions",
        {"model": "gpt", "prompt": "a", "repetition_penalty": 0},
        400,
        "repetition_penalty",
    ),
    ("completions", {"model": "gpt", "prompt": "a", "seed": -1}, 400, "seed"),
    ("completions", {"model": "gpt", "prompt": "a", "seed": 2**64}, 400, "seed"),
    ("completions", {"model": "gpt", "prompt": "a", "stop": [""]}, 400, "stop"),
    ("completions", {"model": "gpt", "prompt": "a", "stop": ["x"] * 17}, 400, "stop"),
    ("completions", {"model": "gpt", "prompt": ""}, 400, "prompt"),
    ("completions", {"model": "gpt", "prompt": []}, 400, "prompt"),
    ("completions", {"model": "gpt", "prompt": ["a", ""]}, 400, "prompt"),
    ("completions", {"model": "gpt", "prompt": LONG}, 400, "prompt"),
    ("completions", {"model": "gpt", "prompt": "\u2603 snowman"}, 400, None),
    (
        "completions",
        {"model": "gpt", "prompt": "a", "frequency_penalty": 0.5},
        400,
        "frequency_penalty",
    ),
    ("completions", {"model": "gpt", "prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ("completions", {"model": "gpt", "prompt": "a", "best_of": 3}, 400, "best_of"),
    ("chat/completions", {"model": "chat", "messages": []}, 400, None),
    (
        "chat/completions",
        {"model": "chat", "messages": [{"role": "bot", "content": "hi"}]},
        400,
        None,
    ),
    (
        "chat/completions",
        {"model": "chat", "messages": [{"role": "user", "content": ""}]},
        400,
        None,
    ),
    (
        "chat/completions",
        {"model": "chat", "messages": [{"role": "user", "content": 5}]},
        422,
        "messages",
    ),
    ("chat/completions", {"model": "chat", "messages": [{"role": "user"}]}, 422, "messages"),
    (
        "chat/completions",
        {
            "model": "chat",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yes"},
            ],
        },
        400,
        None,
    ),
    (
        "chat/completions",
        {"model": "chat", "messages": [{"role": "user", "content": "<|end|>"}]},
        400,
        None,
    ),
    (
        "chat/completions",
        {
            "model": "chat",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "max_completion_tokens": 5,
        },
        400,
        "max_tokens",
    ),
    (
        "chat/completions",
        {
            "model": "chat",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"},
        },
        400,
        "response_format",
    ),
]
# fmt: on


@pytest.mark.parametrize(("endpoint", "body", "status", "param"), BAD)
def test_bad_requests_get_the_right_4xx_in_openai_shape(server, endpoint, body, status, param):
    r = httpx.post(f"{server.url}/v1/{endpoint}", json=body, timeout=30)
    assert r.status_code == status, r.text
    _assert_openai_error(r.json(), param)


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"{not json", 400),
        (b'{"model": "gpt", "prompt": "a", "temperature": NaN}', 400),
        (b'{"model": "gpt", "prompt": "a", "top_p": Infinity}', 400),
        (b"[1, 2]", 422),
        (b"null", 400),
        (b"[" * 5000, 400),  # deeper than the JSON parser goes
        (b'{"model": "gpt", "prompt": "\\ud800"}', 400),  # a lone surrogate
    ],
)
def test_malformed_bodies_are_4xx(server, content, status):
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=content,
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == status, r.text
    _assert_openai_error(r.json())


def test_neutral_openai_fields_are_accepted_and_paths_are_checked(server):
    body = {
        "model": "gpt",
        "prompt": "a",
        "max_tokens": 3,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "logprobs": None,
        "best_of": 1,
        "logit_bias": {},
        "user": "someone",
        "suffix": None,
        "echo": False,
    }
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 200
    r = httpx.get(f"{server.url}/v1/completions")
    assert r.status_code == 405
    _assert_openai_error(r.json())
    r = httpx.get(f"{server.url}/v2/nothing")
    assert r.status_code == 404
    _assert_openai_error(r.json())
    r = httpx.get(f"{server.url}/v1/models/nope")
    assert r.status_code == 404
    _assert_openai_error(r.json(), "model")


def test_bodies_over_the_limit_get_413(server):
    big = {"model": "gpt", "prompt": "a" * 20_000}
    r = httpx.post(f"{server.url}/v1/completions", json=big, timeout=30)
    assert r.status_code == 413
    _assert_openai_error(r.json())

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 2000

    r = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413
    _assert_openai_error(r.json())


def test_a_full_queue_answers_429_with_retry_after(runs):
    srv = _serve(runs, max_batch_size=1, queue_size=1, max_tokens_limit=100_000, max_wait_ms=0)
    long = {"model": "gpt", "prompt": "a", "max_tokens": 100_000, "stream": True}
    try:
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=long, timeout=30) as running:
            stream = running.iter_lines()  # kept: dropping it would close the connection
            next(stream)  # decoding: the batch of one is full
            waiting = ThreadPoolExecutor(1).submit(
                httpx.post,
                f"{srv.url}/v1/completions",
                timeout=30,
                json={"model": "gpt", "prompt": "b", "max_tokens": 3},
            )
            deadline = time.monotonic() + 10
            while srv.metric("aigc_queue_depth", model="gpt") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            r = httpx.post(f"{srv.url}/v1/completions", json={"model": "gpt", "prompt": "c"})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            _assert_openai_error(r.json())
            assert r.json()["error"]["code"] == "queue_full"
        # the client of the long request left: its row leaves the batch, the queue moves
        assert waiting.result().status_code == 200
        # so does a client that stops waiting for a whole (not streamed) answer
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{srv.url}/v1/completions", json={**long, "stream": False}, timeout=0.3)
        assert httpx.post(f"{srv.url}/v1/completions", json={"model": "gpt", "prompt": "d"}, timeout=10).status_code == 200  # fmt: skip
    finally:
        srv.close()


def test_a_request_past_its_time_limit_gets_408(runs):
    srv = _serve(runs, request_timeout_s=0.3, max_tokens_limit=100_000)
    try:
        body = {"model": "gpt", "prompt": "a", "max_tokens": 100_000}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 408
        _assert_openai_error(r.json())
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert "request_timeout" in lines[-2] and lines[-1] == "data: [DONE]"
        # nothing is left running: a short request is answered at once
        assert (
            httpx.post(f"{srv.url}/v1/completions", json={**body, "max_tokens": 2}).status_code
            == 200
        )
    finally:
        srv.close()


# ---------------------------------------------------------------------------
# keys


def test_api_keys_guard_everything_but_health_and_never_reach_the_logs(runs, caplog):
    keys = ["sk-alpha-3141", "sk-beta-2718"]
    srv = _serve(runs, api_keys=keys)
    wrong = "sk-wrong-1618"
    try:
        with caplog.at_level(logging.DEBUG):
            for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": keys[0]}):
                for path in ("/v1/models", "/metrics"):
                    r = httpx.get(srv.url + path, headers=headers)
                    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
                    _assert_openai_error(r.json())
                    assert wrong not in r.text and keys[0] not in r.text
            for key in keys:
                assert (
                    httpx.get(
                        f"{srv.url}/v1/models", headers={"Authorization": f"Bearer {key}"}
                    ).status_code
                    == 200
                )
            with pytest.raises(openai.AuthenticationError):
                srv.client(wrong).completions.create(model="gpt", prompt="a", max_tokens=2)
            r = srv.client(keys[1]).completions.create(model="gpt", prompt="a", max_tokens=2)
            assert r.choices[0].finish_reason
            assert httpx.get(f"{srv.url}/health").status_code == 200
            assert httpx.get(f"{srv.url}/static/none.js").status_code == 404  # not 401
        assert "/v1/models" in caplog.text  # requests were logged...
        for secret in (*keys, wrong):
            assert secret not in caplog.text  # ...without their keys
    finally:
        srv.close()


def test_the_key_check_runs_on_the_event_loop(runs, monkeypatch):
    # a key check in a worker thread costs a thread hop per request (a pool of one
    # thread per concurrent request), which took CPU from decoding under load
    import hmac

    seen = []
    compare = hmac.compare_digest

    def recording(a, b):
        seen.append(threading.current_thread())
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    srv = _serve(runs, api_keys=["sk-alpha-3141"])
    try:
        headers = {"Authorization": "Bearer sk-alpha-3141"}
        assert httpx.get(f"{srv.url}/v1/models", headers=headers).status_code == 200
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
    finally:
        srv.close()
    assert seen and all(t is srv.thread for t in seen)


# ---------------------------------------------------------------------------
# metrics and batching


def test_metrics_are_prometheus_text(client, server):
    client.completions.create(model="gpt", prompt="a", max_tokens=5, seed=0)
    client.images.generate(model="vae", prompt="x", n=2)
    httpx.post(f"{server.url}/v1/completions", json={"model": "nope", "prompt": "a"})
    m = server.metric
    assert m("aigc_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert m("aigc_requests_total", endpoint="/v1/completions", status="404") >= 1
    assert m("aigc_errors_total", status="404", type="invalid_request_error") >= 1
    assert m("aigc_request_latency_seconds_count", endpoint="/v1/completions") >= 2
    assert m("aigc_time_to_first_token_seconds_count", model="gpt") >= 1
    assert m("aigc_generated_tokens_total", model="gpt") >= 5
    assert m("aigc_generated_images_total", model="vae") >= 2
    assert m("aigc_batch_size_count", model="gpt") >= 5
    assert m("aigc_queue_depth", model="gpt") == 0
    assert m("aigc_prompt_tokens_total", model="gpt") >= 1


def test_concurrent_requests_join_a_running_batch_and_keep_their_texts(runs, gens):
    """Continuous batching: requests with different parameters join a batch that is
    already decoding a long stream; each gets exactly its text alone."""
    srv = _serve(runs, max_batch_size=8, max_tokens_limit=100_000, max_wait_ms=0)
    asks = [
        ("The", dict(max_tokens=20, temperature=0.7, seed=1)),
        ("a", dict(max_tokens=12, temperature=0)),
        ("Lists", dict(max_tokens=30, temperature=1.2, seed=2, extra_body={"top_k": 5})),
        ("def", dict(max_tokens=25, top_p=0.8, seed=3, extra_body={"repetition_penalty": 1.3})),
    ]
    client, gen = srv.client(), gens["gpt"]

    def ask(item):
        prompt, kw = item
        return client.completions.create(model="gpt", prompt=prompt, **kw).choices[0].text

    try:
        long = {"model": "gpt", "prompt": "a", "max_tokens": 100_000, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=long, timeout=30) as r:
            stream = r.iter_lines()  # kept: dropping it would close the connection
            next(stream)
            texts = list(ThreadPoolExecutor(4).map(ask, asks))
        rows = srv.metric("aigc_batch_size_count", model="gpt")
        alone_steps = srv.metric("aigc_batch_size_bucket", model="gpt", le="1.0")
    finally:
        srv.close()
    for (prompt, kw), text in zip(asks, texts, strict=True):
        extra = kw.pop("extra_body", {})
        assert text == gen.generate(
            prompt,
            max_new_tokens=kw["max_tokens"],
            temperature=kw.get("temperature", 1.0),
            top_p=kw.get("top_p"),
            seed=kw.get("seed"),
            **extra,
        )
    assert rows - alone_steps >= 12  # steps that decoded two or more rows together


def test_an_idle_model_gathers_requests_into_one_batch(gens):
    """With max_wait_ms, requests that arrive together start in one batch; the wait ends
    as soon as the batch is full."""
    from aigc.sampling import BatchDecoder, SamplingParams
    from aigc.serve.batching import TextBatcher, TextJob
    from aigc.serve.metrics import ServeMetrics

    gen, metrics = gens["gpt"], ServeMetrics()
    batcher = TextBatcher(
        "gpt",
        BatchDecoder(gen.model, gen.tokenizer),
        metrics,
        max_batch_size=3,
        max_wait_ms=5000,
        queue_size=4,
    )

    async def three() -> list[str]:
        jobs = []
        for seed in range(3):
            params = SamplingParams(max_new_tokens=8, seed=seed)
            jobs.append(TextJob([(gen.tokenizer.encode("a"), params)], stream=False))
            batcher.submit(jobs[-1])
            await asyncio.sleep(0.05)
        texts = []
        for job in jobs:
            text = ""
            async for events in job.events(time.monotonic() + 30):
                text += "".join(e.text for e in events)
            texts.append(text)
        return texts

    start = time.monotonic()
    texts = asyncio.run(three())
    assert time.monotonic() - start < 4  # not the whole max_wait
    batcher.stop()
    sample = metrics.registry.get_sample_value
    assert sample("aigc_batch_size_count", {"model": "gpt"}) == 8  # steps
    assert sample("aigc_batch_size_sum", {"model": "gpt"}) == 3 * 8  # all three rows in each
    assert texts == [gen.generate("a", max_new_tokens=8, temperature=1.0, seed=s) for s in range(3)]


def test_a_reader_that_fell_behind_gets_the_ready_steps_in_one_write():
    """Steps queued while the stream was busy arrive as one list, in order, and a
    choice's text from them goes out as one chunk, its finish after it."""
    from aigc.sampling import DecodeEvent, SamplingParams
    from aigc.serve.batching import TextJob
    from aigc.serve.text import _TextRequest

    async def read() -> list[list[DecodeEvent]]:
        job = TextJob([([1], SamplingParams()), ([2], SamplingParams())], stream=True)
        job.post([DecodeEvent(0, "a", None, 1), DecodeEvent(1, "x", None, 1)])
        job.post([DecodeEvent(0, "b", None, 2)])
        job.post([DecodeEvent(0, "c", "stop", 3), DecodeEvent(1, "y", None, 2)])
        got = []
        async for events in job.events(time.monotonic() + 5):
            got.append(events)
            if len(got) == 1:  # the second row ends in a later step
                job.post([DecodeEvent(1, "", "length", 3)])
        return got

    got = asyncio.run(read())
    assert [[(e.key, e.text) for e in step] for step in got] == [
        [(0, "a"), (1, "x"), (0, "b"), (0, "c"), (1, "y")],
        [(1, "")],
    ]
    tokens = [0, 0]

    def chunk(i: int, text: str | None, reason: str | None = None) -> str:
        return json.dumps([i, text, reason])

    chunks = _TextRequest._step_chunks(got[0], chunk, tokens)
    assert [json.loads(c) for c in chunks] == [[0, "abc", None], [0, None, "stop"], [1, "xy", None]]
    assert tokens == [3, 0]
    chunks = _TextRequest._step_chunks(got[1], chunk, tokens)
    assert [json.loads(c) for c in chunks] == [[1, None, "length"]] and tokens == [3, 3]


# ---------------------------------------------------------------------------
# the command


def test_two_runs_of_one_name_are_refused(runs, tmp_path):
    (tmp_path / "gpt").mkdir()
    with pytest.raises(ConfigError, match="two runs are named 'gpt'"):
        create_app([runs["gpt"], tmp_path / "gpt"])
    r = run_cli("serve", str(runs["gpt"]), "--max-batch-size", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "error: --max-batch-size (AIGC_MAX_BATCH_SIZE) = 0 must be an integer of at least 1"
    )


def _serve_command():
    import typer

    from aigc.cli import app

    return typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]


def _shown(default: object) -> str:
    """A default as the README writes it: 5 for 5.0, none for no API keys."""
    if isinstance(default, float):
        return f"{default:g}"
    return "none" if default == [] or default is None else str(default)


def test_serve_help_lists_every_setting_with_its_variable_and_default():
    from typer.testing import CliRunner

    from aigc.cli import app
    from aigc.serve.settings import FLAGS

    r = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    lines = {line.split()[1]: line for line in r.output.splitlines() if line.startswith("│ --")}
    for name, spec in FLAGS.items():
        line = lines[spec.flag]
        assert spec.help in line, line
        default = getattr(ServeSettings(), name)
        if name == "api_keys":  # repeatable; the variable is read by the command
            assert f"Also {spec.env} (comma-separated)." in line and "[default" not in line
        elif default is None:  # unset by default: Typer shows no default
            assert f"[env var: {spec.env}]" in line and "[default" not in line, line
        else:
            assert f"[env var: {spec.env}] [default: {default}]" in line, line
    assert "[env var: AIGC_API_KEYS_FILE]" in lines["--api-keys-file"]
    assert "[default: info]" in lines["--log-level"]


def test_a_flag_wins_over_its_variable_which_wins_over_the_default(monkeypatch):
    """And a list setting's variable adds to its flags; a bad value from either fails
    with one line naming the flag and the variable."""
    from typer.testing import CliRunner

    from aigc.cli import app

    seen = []

    def stop_here(settings: ServeSettings) -> None:
        seen.append(settings)
        raise ConfigError("stopped before binding")

    monkeypatch.setattr(ServeSettings, "validate", stop_here)
    env = {"AIGC_MAX_N": "3", "AIGC_MAX_WAIT_MS": "7", "AIGC_API_KEYS": "k2, k3"}
    args = ["serve", "run", "--max-n", "5", "--api-key", "k1", "--request-timeout", "9"]
    r = CliRunner().invoke(app, args, env=env)
    assert str(r.exception) == "stopped before binding"
    got = seen[0]
    assert (got.max_n, got.max_wait_ms, got.request_timeout_s) == (5, 7.0, 9.0)
    assert got.api_keys == ["k1", "k2", "k3"]
    assert got.max_batch_size == ServeSettings().max_batch_size
    monkeypatch.undo()
    r = CliRunner().invoke(app, ["serve", "run"], env={"AIGC_MAX_BATCH_SIZE": "0"})
    assert str(r.exception) == (
        "--max-batch-size (AIGC_MAX_BATCH_SIZE) = 0 must be an integer of at least 1"
    )


def test_the_readme_table_of_flags_is_the_settings():
    """README, "Serving": the `| flag | variable | default |` table has a row for every
    setting (its flag, variable and default; a note may follow the default) and for every
    other flag the command reads from the environment, and no other."""
    from aigc.serve.settings import FLAGS

    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| flag | variable | default |")
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        flag, variable, default = (cell.strip() for cell in line.strip("|").split("|"))
        rows[flag.strip("`")] = (variable.split("`")[1], default)
    expected = {
        spec.flag: (spec.env, _shown(getattr(ServeSettings(), name)))
        for name, spec in FLAGS.items()
    }
    settings_flags = {spec.flag for spec in FLAGS.values()}
    for option in _serve_command().params:
        if option.envvar and option.opts[0] not in settings_flags:
            expected[option.opts[0]] = (option.envvar, "" if option.default is None else str(option.default))  # fmt: skip
    missing, unknown = expected.keys() - rows.keys(), rows.keys() - expected.keys()
    assert not missing and not unknown, f"README: no row for {missing}; rows for no flag: {unknown}"
    for flag, (env, default) in expected.items():
        variable, cell = rows[flag]
        assert variable == env, f"README: {flag} is read from {env}, not {variable}"
        assert cell == default or cell.startswith(default + " "), (
            f"README: the default of {flag} is {default!r}, not {cell!r}"
        )


def test_sigterm_lets_a_streaming_request_finish_then_exits_0(runs):
    proc, url = start_server([str(runs["gpt"]), "--port", "0", "--grace-seconds", "30",
                              "--device", "cpu"], env={"AIGC_MAX_TOKENS": "5000"})  # fmt: skip
    try:
        body = {"model": "gpt", "prompt": "a", "max_tokens": 4000, "stream": True, "seed": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            events = [next(lines)]  # the request is in flight
            proc.send_signal(signal.SIGTERM)
            events += list(lines)
        events = [e for e in events if e]
        assert events[-1] == "data: [DONE]" and len(events) > 10
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shutdown_past_the_grace_period_answers_every_request_in_one_log_line(runs):
    """A stream and a whole request still running when --grace-seconds is over: the
    stream ends with an error event in OpenAI's shape and [DONE], the other gets a 503,
    the log says so in one line, and the process exits 0 with no traceback."""
    proc, url = start_server([str(runs["gpt"]), "--port", "0", "--grace-seconds", "1",
                              "--device", "cpu", "--max-batch-size", "4"],
                             env={"AIGC_MAX_TOKENS": "1000000"})  # fmt: skip
    try:
        long = {"model": "gpt", "prompt": "a", "max_tokens": 1_000_000, "seed": 0}
        whole: dict = {}

        def post_whole() -> None:
            r = httpx.post(f"{url}/v1/completions", json=long, timeout=60)
            whole.update(status=r.status_code, body=r.json())

        with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True},
                          timeout=60) as r:  # fmt: skip
            lines = r.iter_lines()
            events = [next(lines)]  # the stream is in flight
            thread = threading.Thread(target=post_whole)
            thread.start()
            time.sleep(0.3)  # the whole request too
            proc.send_signal(signal.SIGTERM)
            events += list(lines)
        thread.join(30)
        events = [e for e in events if e]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][len("data: ") :])
        assert set(last) == {"error"} and last["error"]["code"] == "shutting_down"
        assert last["error"]["type"] == "server_error" and "grace" in last["error"]["message"]
        assert whole["status"] == 503 and whole["body"]["error"]["code"] == "shutting_down"
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "Cancel" not in err, err
        said = [x for x in err.splitlines() if "grace period" in x]
        assert len(said) == 1 and "2 request(s)" in said[0], err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_torch_threads_setting_is_checked_and_leaves_a_core_by_default():
    from aigc.errors import ConfigError
    from aigc.serve.settings import ServeSettings

    with pytest.raises(ConfigError, match="--torch-threads"):
        ServeSettings(torch_threads=-1).validate()
    assert ServeSettings(torch_threads=3).threads() == 3
    cores = len(os.sched_getaffinity(0))
    assert ServeSettings().threads() == max(1, cores - 1)
