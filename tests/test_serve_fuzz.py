"""The HTTP service under malformed requests: Hypothesis fires junk at the ASGI app.

Bodies of every POST endpoint (arbitrary JSON, the real fields with wrong types and
edge values, huge strings, nested junk), raw bytes under any content type, unknown
paths and methods, and bad Authorization headers against a keyed app. Every answer
must be below 500, every error must be in OpenAI's shape, nothing may hang (each
request has a time limit), and afterwards the service must still complete text.

The app runs in-process (httpx's ASGITransport) on one event loop for the module,
over a tiny GPT run, a chat run fine-tuned from it, a conditional GAN run and a
text-to-image diffusion run.
Examples are derandomized, so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import json
import string

import httpx
import pytest

from aigc.serve.app import create_app
from aigc.serve.settings import ServeSettings

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = dict(
    device="cpu",
    max_batch_size=8,
    max_wait_ms=0,
    max_tokens_limit=8,  # valid requests that slip through finish at once
    max_n=4,
    max_prompt_chars=2000,
    max_prompt_tokens=1000,
    max_body_bytes=65_536,
    request_timeout_s=20,
    max_steps=4,  # valid diffusion requests that slip through finish at once
)
KEY = "sk-fuzz-2718"
TIMEOUT = 30  # seconds for one request: past it, the service hangs


def fuzz(examples: int) -> settings:
    """Hypothesis settings: reproducible (derandomized, no example database), no deadline."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def runs(serve_runs, diffusion_runs):
    """Tiny runs: gpt, chat (fine-tuned from it), cgan (conditional, digits), t2i
    (text-to-image diffusion, shapes)."""
    return [*(serve_runs[name] for name in ("gpt", "chat", "cgan")), diffusion_runs["t2i"]]


class Fuzzed:
    """An app and an httpx client over ASGITransport, on an event loop of their own."""

    def __init__(self, app) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        transport = httpx.ASGITransport(app=app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://fuzz")

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        """One request, answered within TIMEOUT seconds (a hang fails the test)."""
        call = self.client.request(method, path, **kw)
        return self.loop.run_until_complete(asyncio.wait_for(call, TIMEOUT))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        for served in self.app.state.aigc.models.values():
            if served.batcher is not None:
                served.batcher.stop()
            if served.images is not None:
                served.images.stop()
            if served.diffusion is not None:
                served.diffusion.stop()
        self.loop.close()


@pytest.fixture(scope="module")
def open_app(runs):
    fuzzed = Fuzzed(create_app(runs, ServeSettings(**SETTINGS)))
    yield fuzzed
    fuzzed.close()


@pytest.fixture(scope="module")
def keyed_app(runs):
    fuzzed = Fuzzed(create_app(runs[:1], ServeSettings(**SETTINGS, api_keys=[KEY])))
    yield fuzzed
    fuzzed.close()


# ---------------------------------------------------------------------------
# what every answer must be


def assert_openai_error(body: object) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error


def check(r: httpx.Response, method: str = "POST") -> None:
    """No 5xx; an error is OpenAI's shape; a stream holds no server error."""
    event(f"{r.status_code}")  # the spread of answers: pytest --hypothesis-show-statistics
    assert r.status_code < 500, r.text[:2000]
    if method == "HEAD":
        return
    kind = r.headers.get("content-type", "")
    if r.status_code >= 400:
        assert kind.startswith("application/json"), (r.status_code, kind, r.text[:500])
        assert_openai_error(r.json())
    elif kind.startswith("text/event-stream") and r.text.startswith("event: "):
        # an image stream: named events, the last the last image or an error
        lines = [line for line in r.text.split("\n") if line.startswith("data: ")]
        events = [json.loads(line.removeprefix("data: ")) for line in lines]
        assert events[-1].get("type") == "image_generation.completed" or "error" in events[-1]
        for e in events:
            if "error" in e:
                assert_openai_error(e)
                assert e["error"]["type"] != "server_error", e
    elif kind.startswith("text/event-stream"):
        lines = [line for line in r.text.split("\n") if line]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        for line in lines[:-1]:
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                assert_openai_error(chunk)
                assert chunk["error"]["type"] != "server_error", chunk


# ---------------------------------------------------------------------------
# strategies

EDGE_INTS = [0, 1, -1, 2, 7, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
EDGE_FLOATS = [0.0, -0.0, 1e-308, 5e-324, 1e308, -1e308, 0.5, 1.0, 1.5, -2.5, 1e-7]
# what "NaN-like" can be: JSON's non-standard tokens (json.dumps writes them) and strings
NAN_LIKE = [float("nan"), float("inf"), float("-inf"), "NaN", "Infinity", "-inf", "1e999"]
SURROGATE = st.sampled_from(["\ud800", "a\udfff", "\udbff\udc00x"])  # lone, as JSON \u escapes
# long strings: most under the 64 KiB body limit once in JSON (non-ASCII is 6 bytes), a
# few over it (413)
HUGE = st.builds(
    lambda ch, k: ch * k,
    st.sampled_from(["a", "\u00e9", "\u2603", " ", '"', "\\", "\n"]),
    st.integers(1, 3_000) | st.sampled_from([9_000, 70_000]),
)

ints = st.integers(-3, 20) | st.sampled_from(EDGE_INTS) | st.integers()
# subnormals off: something in the process flushes them to zero, which Hypothesis refuses
floats = (
    st.sampled_from(EDGE_FLOATS)
    | st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
    | st.sampled_from(NAN_LIKE)
)
text = st.text(string.printable, max_size=30) | st.text(max_size=12)
strings = text | SURROGATE | st.sampled_from(["", "gpt", "chat", "cgan", "<|end|>", "7"])
keys = st.text(max_size=10) | st.sampled_from(["model", "prompt", "messages", "n", "error"])
junk = st.recursive(
    st.none() | st.booleans() | ints | floats | strings,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)  # any JSON value
any_value = junk | strings  # strings twice as likely

# For each endpoint, what its fields may plausibly hold (edge values included); a body
# is drawn from these alone (so that many reach the range checks and the models), or
# with any JSON value in any field, or is any JSON value at all.
models = st.sampled_from(["gpt", "chat", "cgan", "t2i", "nope", ""])
words = st.text(string.ascii_letters + " .:\n", min_size=1, max_size=40)
SAMPLING = {
    "temperature": floats,
    "top_p": floats,
    "top_k": ints,
    "repetition_penalty": floats,
    "n": ints,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20),
    "seed": ints,
    "user": strings | HUGE,
    "frequency_penalty": floats,
    "presence_penalty": floats,
    "logit_bias": st.dictionaries(text, floats, max_size=3),
}
COMPLETION = (
    {
        "model": st.just("gpt") | models,
        "prompt": words | st.lists(words, max_size=5) | text | SURROGATE | HUGE,
    },
    {
        **SAMPLING,
        "max_tokens": ints,
        "echo": st.booleans(),
        "logprobs": ints,
        "best_of": ints,
        "suffix": strings,
    },
)
roles = st.sampled_from(["user", "system", "developer", "assistant", "bot", ""])
message = st.fixed_dictionaries({
    "role": roles,
    "content": words | text | HUGE | st.sampled_from(["", "<|end|>", "<|user|>"])
    | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words | text}), max_size=3),
})  # fmt: skip
CHAT = (
    {"model": st.just("chat") | models, "messages": st.lists(message, max_size=4)},
    {
        **SAMPLING,
        "max_tokens": ints,
        "max_completion_tokens": ints,
        "logprobs": st.booleans(),
        "top_logprobs": ints,
        "response_format": st.just({"type": "text"}) | st.dictionaries(text, text, max_size=2),
    },
)
label = st.sampled_from(["7", 7, -1, 10, 2**63, "class", "x", "", " 7", "\u2603"])
IMAGE = (
    {"model": st.just("cgan") | st.just("t2i") | models},
    {
        "prompt": st.sampled_from(
            ["7", "class=7", " 3 ", "class=11", "=", ",;,", "a=b=c", "class=", "a red circle"]
        )
        | text
        | HUGE,
        "labels": label
        | st.lists(label, max_size=5)
        | st.dictionaries(st.sampled_from(["class", "colour", ""]) | text, label, max_size=3),
        "n": ints,
        "seed": ints,
        "response_format": st.sampled_from(["b64_json", "url", ""]),
        "size": st.sampled_from(["32x32", "16x16", "x"]) | text,
        "user": strings,
        "stream": st.booleans(),
        "partial_images": ints,
        "num_inference_steps": ints,
        "guidance_scale": floats,
        "negative_prompt": words | text | HUGE,
        "scheduler": st.sampled_from(["ddim", "ddpm", "euler", "heun", "dpm++2m", "DDIM", ""])
        | text,
    },
)


def bodies_of(fields: tuple[dict, dict]) -> st.SearchStrategy:
    """Bodies of one endpoint: plausible fields, any value in any field, any value."""
    required, optional = fields

    def draw(junky: bool) -> st.SearchStrategy:
        def value(s: st.SearchStrategy) -> st.SearchStrategy:
            return s | any_value if junky else s

        extra = {"extra": any_value | HUGE} if junky else {}
        return st.fixed_dictionaries(
            {k: value(s) for k, s in required.items()},
            optional={**{k: value(s) for k, s in optional.items()}, **extra},
        )

    return draw(junky=False) | draw(junky=True) | any_value


ENDPOINTS = ["/v1/completions", "/v1/chat/completions", "/v1/images/generations"]
bodies = st.one_of(
    *(st.tuples(st.just(path), bodies_of(fields))
      for path, fields in zip(ENDPOINTS, (COMPLETION, CHAT, IMAGE), strict=True))
)  # fmt: skip
content_types = st.sampled_from([
    "application/json", "application/json; charset=utf-8", "application/json; charset=utf-16",
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz",
    "application/octet-stream", "", "application/json\x7f", "*/*",
])  # fmt: skip
ODD_BYTES = [
    b"",
    b"{",
    b"[]",
    b"{}",
    b"null",
    b'"x"',
    b"1e999",
    b"\xef\xbb\xbf{}",  # a UTF-8 byte-order mark
    b"\xff\xfe{\x00}\x00",  # UTF-16
    b'{"model": "gpt", "prompt": "a"',
    b"[" * 3000,
    b'{"model": "gpt", "prompt": "a", "n": 1e400}',
]
raw_bytes = (
    st.binary(max_size=2000)
    | st.sampled_from(ODD_BYTES)
    | st.builds(lambda v: json.dumps(v).encode("utf-16"), junk)
)
methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "FOO"])
PATHS = ["/", "/health", "/metrics", "/v1/models", *ENDPOINTS, "/v1", "/v2/x", "/static/",
         "/static/index.html", "/static/../settings.py", "/v1/models/gpt", "/v1/models/%00"]  # fmt: skip
segment = st.text(string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@", max_size=12)
paths = st.sampled_from(PATHS) | st.builds(
    lambda prefix, seg: prefix + seg,
    st.sampled_from(["/", "/v1/", "/v1/models/", "/static/"]),
    segment,
)
header_bytes = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
ODD_KEYS = [KEY, KEY.upper(), KEY[:-1], KEY + " x", f" {KEY} ", ""]
authorizations = header_bytes | st.builds(
    lambda scheme, token: scheme + token,
    st.sampled_from([b"Bearer ", b"bearer ", b"Basic ", b""]),
    header_bytes | st.sampled_from([k.encode() for k in ODD_KEYS]),
)


def as_json(value: object) -> bytes:
    """JSON as a client may write it: NaN and Infinity kept, lone surrogates escaped."""
    return json.dumps(value, allow_nan=True).encode()


# ---------------------------------------------------------------------------
# the tests


@fuzz(2500)
@given(case=bodies)
def test_junk_json_bodies_get_4xx_in_openai_shape(open_app, case):
    path, body = case
    r = open_app.request(
        "POST", path, content=as_json(body), headers={"Content-Type": "application/json"}
    )
    check(r)


@fuzz(500)
@given(path=st.sampled_from(ENDPOINTS), content=raw_bytes, content_type=content_types)
def test_raw_bytes_and_wrong_content_types_get_4xx(open_app, path, content, content_type):
    r = open_app.request("POST", path, content=content, headers={"Content-Type": content_type})
    check(r)


@fuzz(500)
@given(method=methods, path=paths, body=st.none() | junk)
def test_unknown_paths_and_methods_get_4xx(open_app, method, path, body):
    content = None if body is None else as_json(body)
    r = open_app.request(method, path, content=content)
    check(r, method)


@fuzz(500)
@given(authorization=authorizations, path=st.sampled_from(["/v1/models", "/metrics", *ENDPOINTS]))
def test_bad_authorization_headers_get_401(keyed_app, authorization, path):
    body = {"model": "gpt", "prompt": "a", "max_tokens": 2}
    method = "GET" if path in ("/v1/models", "/metrics") else "POST"
    r = keyed_app.request(
        method,
        path,
        headers={"Authorization": authorization},
        json=body if method == "POST" else None,
    )
    check(r, method)
    good = authorization.strip().lower().startswith(b"bearer ") and (
        authorization.strip()[7:].strip() == KEY.encode()
    )
    if not good:
        assert r.status_code == 401, (authorization, r.status_code)
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert KEY not in r.text


@pytest.mark.parametrize("fixture", ["open_app", "keyed_app"])
def test_the_service_still_completes_text_after_the_fuzzing(request, fixture):
    """Runs after the fuzz tests (file order): nothing broken, nothing left running."""
    fuzzed = request.getfixturevalue(fixture)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "gpt", "prompt": "The", "max_tokens": 5, "seed": 1}
    r = fuzzed.request("POST", "/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    r = fuzzed.request("POST", "/v1/completions", json={**body, "stream": True}, headers=headers)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert fuzzed.request("GET", "/health").json()["status"] == "ok"
    sample = fuzzed.app.state.aigc.metrics.registry.get_sample_value
    assert not sample("aigc_errors_total", {"status": "500", "type": "server_error"})
    assert sample("aigc_queue_depth", {"model": "gpt"}) == 0  # nothing left behind
    assert sample("aigc_running_rows", {"model": "gpt"}) == 0
    if fixture == "open_app":  # and the diffusion model still makes images
        body = {"model": "t2i", "prompt": "a red circle", "num_inference_steps": 2}
        assert fuzzed.request("POST", "/v1/images/generations", json=body).status_code == 200
        assert sample("aigc_queue_depth", {"model": "t2i"}) == 0
