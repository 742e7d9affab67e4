"""The web playground of `aigc serve` in a real browser: streamed text, chat, images, keys,
speech and denoised recordings.

Debian's headless Chromium (/usr/bin/chromium, `make browser`) driven by Playwright;
no browser is downloaded. The page runs under its own Content-Security-Policy, so a
script or style it could not load would show here as a console error. Screenshots
of the text and image views are written to artifacts/ at the repository root.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import Browser, Page, expect, sync_playwright

import aigc
from aigc.schedulers import SCHEDULERS
from aigc.serve.app import create_app
from aigc.serve.settings import ServeSettings

from .conftest import RECIPE, ROOT, T2I_TINY, TINY
from .test_denoise import RECIPE as DENOISE_RECIPE
from .test_denoise import TINY as DENOISE_TINY
from .test_tts import RECIPE as TTS_RECIPE
from .test_tts import TINY as TTS_TINY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed; `make browser` installs Debian's "
    "(apt-get install -y --no-install-recommends chromium)",
)

ARTIFACTS = ROOT / "artifacts"
CGAN = str(ROOT / "configs" / "cgan-digits.yaml")
CGAN_TINY = ["model.z_dim=16", "model.g_width=8", "model.d_width=8", "train.batch_size=16",
             "train.max_steps=2", "train.checkpoint_every=2", "train.sample_every=0",
             "data.eval_metrics=[]", "data.eval_samples=10"]  # fmt: skip
KEY = "playground-test-key"
PROMPT = "The "


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT, its chat fine-tune, a tiny conditional GAN and a tiny text-to-image
    diffusion model, each a few steps."""
    root = tmp_path_factory.mktemp("playground")
    gpt, chat, cgan, t2i = root / "gpt", root / "chat", root / "cgan", root / "t2i"
    aigc.train(RECIPE, [*TINY, "train.max_steps=3", "train.eval_every=0"], run_dir=gpt,
               progress=False)  # fmt: skip
    aigc.finetune(gpt, ["train.max_steps=2", "train.batch_size=4"], task="chat", run_dir=chat,
                  progress=False)  # fmt: skip
    aigc.train(CGAN, CGAN_TINY, run_dir=cgan, progress=False)
    aigc.train("t2i-shapes", T2I_TINY, run_dir=t2i, progress=False)
    restore = root / "restore"
    aigc.train("restore-shapes-noise", ["data.n=200", "data.image_size=16", "model.width=8",
                                        "model.blocks=1", "train.batch_size=16",
                                        "train.max_steps=20", "train.eval_every=0",
                                        "train.sample_every=0", "data.eval_metrics=[]"],
               run_dir=restore, progress=False)  # fmt: skip
    translate = root / "translate"
    aigc.train("cyclegan-shapes", ["data.n=64", "data.image_size=16", "model.width=8",
                                   "model.blocks=1", "model.d_width=8", "train.batch_size=8",
                                   "train.max_steps=2", "train.eval_every=0",
                                   "train.sample_every=0", "data.eval_metrics=[]"],
               run_dir=translate, progress=False)  # fmt: skip
    return {"gpt": gpt, "chat": chat, "cgan": cgan, "t2i": t2i, "restore": restore,
            "translate": translate}  # fmt: skip


@contextmanager
def serving(app) -> Iterator[str]:
    """Serves `app` with uvicorn on a free local port in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here, so the port cannot be taken meanwhile
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server(runs) -> Iterator[str]:
    with serving(create_app(list(runs.values()))) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(runs) -> Iterator[str]:
    with serving(create_app([runs["cgan"]], ServeSettings(api_keys=[KEY]))) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    """A fresh tab (its own sessionStorage); fails the test on a script error or a
    Content-Security-Policy violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text
            else None)  # fmt: skip
    yield page
    context.close()
    assert not problems, problems


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def choose(page: Page, model: str) -> None:
    expect(page.locator(f"#model option[value='{model}']")).to_be_attached()
    page.select_option("#model", model)


DONE = re.compile(r"^done \((\d+) (tokens?|images?), \d+\.\d s\)$")

# Records, per MutationObserver callback on #output, when it ran and the text's length.
OBSERVE = """() => {
  window.seen = [];
  const output = document.getElementById("output");
  new MutationObserver(() => window.seen.push([performance.now(), output.textContent.length]))
    .observe(output, {childList: true, characterData: true, subtree: true});
}"""


# Presses Stop as soon as #output holds more than the prompt.
STOP_AT_FIRST_PIECE = """prompt => {
  const output = document.getElementById("output");
  const observer = new MutationObserver(() => {
    if (output.textContent.length > prompt.length) {
      observer.disconnect();
      document.getElementById("stop").click();
    }
  });
  observer.observe(output, {childList: true, characterData: true, subtree: true});
}"""

# When each response of a path had come whole (ms, performance.now()'s clock).
RESPONSE_ENDS = """path => performance.getEntriesByType("resource")
  .filter(e => new URL(e.name).pathname === path).map(e => e.responseEnd)"""


def test_text_streams_into_the_page_and_stop_ends_it(page, server):
    page.goto(server + "/")
    choose(page, "gpt")
    expect(page.locator("#prompt")).to_be_visible()
    expect(page.locator("#images")).to_be_hidden()
    expect(page.locator("#max-tokens")).to_have_value("200")
    expect(page.locator("#temperature")).to_have_value("0.8")
    page.fill("#prompt", PROMPT)
    page.fill("#seed", "7")
    with page.expect_request("**/v1/completions") as sent:
        page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE)
    assert sent.value.post_data_json == {
        "model": "gpt", "prompt": PROMPT, "max_tokens": 200, "temperature": 0.8, "seed": 7,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    assert sent.value.response().headers["content-type"].startswith("text/event-stream")
    text = page.text_content("#output")
    assert text.startswith(PROMPT) and len(text) > len(PROMPT) + 20, text
    shot(page, "playground-text.png")

    # The same seed gives the same text again.
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE)
    assert page.text_content("#output") == text

    # Streamed: a long text grew piece by piece, and its first piece was on the page
    # before the response's last byte had arrived (both times on the page's clock).
    page.fill("#max-tokens", "2000")
    page.fill("#seed", "")
    page.evaluate(OBSERVE)
    page.click("#generate")
    # 2,000 tokens: over playwright's 5 s default on a loaded 2-core machine
    expect(page.locator("#status")).to_have_text(DONE, timeout=60_000)
    seen = page.evaluate("window.seen")
    lengths = [n for _, n in seen]
    assert len(seen) > 5 and lengths == sorted(lengths)
    assert lengths[-1] == len(page.text_content("#output"))
    response_end = page.evaluate(RESPONSE_ENDS, "/v1/completions")[-1]
    assert seen[1][0] < response_end, (seen[:3], response_end)  # seen[0]: the prompt

    # Stop, pressed as the first piece shows, ends the text there and keeps it.
    page.evaluate(STOP_AT_FIRST_PIECE, PROMPT)
    page.click("#generate")
    status = page.locator("#status")
    expect(status).to_have_text(re.compile(r"^stopped \(\d+ characters?, "))
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    # the first piece (one write of the server: a token, or the few ready by then) stays,
    # and nothing after it
    chars = int(re.match(r"stopped \((\d+)", status.text_content()).group(1))
    assert 1 <= chars < 2000
    assert len(page.text_content("#output")) == len(PROMPT) + chars

    # A value the server refuses: its message, shown as an error.
    page.fill("#max-tokens", "100000")
    page.click("#generate")
    expect(page.locator("#status")).to_have_class("error")
    expect(page.locator("#status")).to_contain_text("max_tokens")


def test_a_chat_model_keeps_the_conversation(page, server):
    page.goto(server + "/")
    choose(page, "chat")
    expect(page.locator("#reset")).to_be_visible()
    expect(page.locator("#output")).to_be_hidden()
    page.fill("#max-tokens", "30")
    page.fill("#seed", "1")
    page.fill("#prompt", "What does <b>pass</b> do?")
    with page.expect_request("**/v1/chat/completions") as first:
        page.press("#prompt", "Enter")
    expect(page.locator("#status")).to_have_text(DONE)
    turns = page.locator("#chat .turn")
    expect(turns).to_have_count(2)
    # Text stays text: the markup typed is shown, not parsed.
    expect(turns.nth(0).locator(".content")).to_have_text("What does <b>pass</b> do?")
    assert page.locator("#chat b").count() == 0
    answer = turns.nth(1).locator(".content").text_content()
    assert first.value.post_data_json["messages"] == [
        {"role": "user", "content": "What does <b>pass</b> do?"}
    ]
    expect(page.locator("#prompt")).to_have_value("")

    page.fill("#prompt", "And del?")
    with page.expect_request("**/v1/chat/completions") as second:
        page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE)
    expect(turns).to_have_count(4)
    assert second.value.post_data_json["messages"] == [
        {"role": "user", "content": "What does <b>pass</b> do?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And del?"},
    ]
    page.click("#reset")
    expect(turns).to_have_count(0)


def test_images_come_as_a_grid_of_decoded_pngs(page, server):
    page.goto(server + "/")
    choose(page, "cgan")
    expect(page.locator("#prompt")).to_be_hidden()
    expect(page.locator("#n")).to_have_value("16")
    select = page.locator("#labels select")
    expect(select).to_have_count(1)
    expect(page.locator("#labels label")).to_have_text("class")
    options = select.locator("option").all_text_contents()
    assert options == ["any", *(str(d) for d in range(10))]
    select.select_option("3")
    page.fill("#seed", "5")
    with page.expect_request("**/v1/images/generations") as sent:
        page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE)
    assert sent.value.post_data_json == {
        "model": "cgan", "n": 16, "labels": {"class": "3"}, "seed": 5,
        "response_format": "b64_json",
    }  # fmt: skip
    page.wait_for_function(
        "() => [...document.querySelectorAll('#images img')].every(i => i.complete)"
    )
    sizes = page.eval_on_selector_all(
        "#images img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [[32, 32]] * 16
    shot(page, "playground-image.png")

    page.fill("#n", "17")  # over the server's --max-n
    page.click("#generate")
    expect(page.locator("#status")).to_have_class("error")
    expect(page.locator("#status")).to_contain_text("n=17 must be in [1, 16]")


# Records, per MutationObserver callback, what the image grid and the progress bar show:
# [the step of each image (null: a final image), the bar's value, the bar's max].
WATCH_DENOISING = """() => {
  window.frames_seen = [];
  const images = document.getElementById("images");
  const bar = document.getElementById("progress");
  const record = () => window.frames_seen.push([
    [...images.querySelectorAll("img")].map(i => i.dataset.step ? Number(i.dataset.step) : null),
    bar.value, bar.max]);
  const observer = new MutationObserver(record);
  observer.observe(images, {childList: true, subtree: true, attributes: true});
  observer.observe(bar, {attributes: true});
}"""


def test_a_diffusion_model_shows_its_images_forming_with_a_progress_bar(page, server):
    page.goto(server + "/")
    choose(page, "t2i")
    expect(page.locator("#model-info")).to_contain_text("text-to-image")
    expect(page.locator("#image-prompt")).to_be_visible()
    expect(page.locator("#negative-prompt")).to_be_visible()
    expect(page.locator("#labels")).to_be_hidden()
    # the run's defaults, and the server's schedulers
    expect(page.locator("#steps")).to_have_value("2")
    expect(page.locator("#guidance")).to_have_value("3")
    expect(page.locator("#scheduler")).to_have_value("dpm++2m")
    names = page.locator("#scheduler option").all_text_contents()
    assert names == sorted(SCHEDULERS)

    page.fill("#image-prompt", "a small red circle")
    page.fill("#negative-prompt", "a blue square")
    page.fill("#steps", "12")
    page.select_option("#scheduler", "ddim")
    page.fill("#guidance", "2.5")
    page.fill("#n", "2")
    page.fill("#seed", "4")
    page.evaluate(WATCH_DENOISING)
    with page.expect_request("**/v1/images/generations") as sent:
        page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE)
    assert sent.value.post_data_json == {
        "model": "t2i", "n": 2, "seed": 4, "num_inference_steps": 12, "guidance_scale": 2.5,
        "scheduler": "ddim", "prompt": "a small red circle", "negative_prompt": "a blue square",
        "stream": True, "partial_images": 8, "response_format": "b64_json",
    }  # fmt: skip
    assert sent.value.response().headers["content-type"].startswith("text/event-stream")

    frames = page.evaluate("window.frames_seen")
    previews = [steps for steps, _, _ in frames if steps and all(s is not None for s in steps)]
    assert len({tuple(p) for p in previews}) >= 4, frames  # the images formed step by step
    assert max(max(p) for p in previews) < 12
    values = [value for _, value, _ in frames]
    assert values == sorted(values) and 0 < values[len(values) // 2] < 12, values  # it moved
    progress = page.locator("#progress")
    expect(progress).to_be_visible()
    assert progress.evaluate("p => [p.value, p.max]") == [12, 12]  # and reached the end
    final = page.locator("#images img")
    expect(final).to_have_count(2)
    expect(page.locator("#images img.preview")).to_have_count(0)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#images img')].every(i => i.complete)"
    )
    sizes = final.evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[32, 32]] * 2
    assert final.first.get_attribute("alt") == "sample 1 (a small red circle)"
    shot(page, "playground-diffusion.png")

    # The same seed: the same images.
    first = final.evaluate_all("imgs => imgs.map(i => i.src)")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE)
    assert final.evaluate_all("imgs => imgs.map(i => i.src)") == first

    # A value the server refuses: its message, shown as an error.
    page.fill("#image-prompt", "a small red circle at the top left " * 4)
    page.click("#generate")
    expect(page.locator("#status")).to_have_class("error")
    expect(page.locator("#status")).to_contain_text("shorten it")


def test_a_server_with_keys_asks_for_one_and_works_with_it(page, keyed_server):
    page.goto(keyed_server + "/")
    status = page.locator("#status")
    expect(status).to_have_text(re.compile("needs an API key"))
    expect(status).to_have_class("error")
    expect(page.locator("#model option")).to_have_count(0)

    page.fill("#api-key", "wrong-key")
    expect(status).to_have_text(re.compile("refused this API key"))

    page.fill("#api-key", KEY)
    choose(page, "cgan")
    expect(status).to_have_text("")
    page.fill("#n", "2")
    with page.expect_request("**/v1/images/generations") as sent:
        page.click("#generate")
    expect(status).to_have_text(DONE)
    assert sent.value.headers["authorization"] == f"Bearer {KEY}"
    expect(page.locator("#images img")).to_have_count(2)

    # The key is kept for the tab: a reload loads the models without asking again.
    page.reload()
    choose(page, "cgan")
    expect(page.locator("#api-key")).to_have_value(KEY)
    expect(status).not_to_have_class("error")


# Records the field names of each multipart form the page sends (Playwright does not
# show a multipart body).
RECORD_FORMS = """() => {
  window.sent_forms = [];
  const send = window.fetch;
  window.fetch = (url, init) => {
    if (init && init.body instanceof FormData) window.sent_forms.push([...init.body.keys()]);
    return send(url, init);
  };
}"""


def _data_url_pixels(src: str):
    import base64
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


def test_an_image_is_inpainted_where_it_is_painted_and_kept_elsewhere(page, server, tmp_path):
    import numpy as np
    from PIL import Image

    source = (np.arange(32 * 32 * 3) % 256).astype(np.uint8).reshape(32, 32, 3)
    Image.fromarray(source).save(tmp_path / "in.png")
    page.goto(server + "/")
    choose(page, "t2i")
    expect(page.locator("#edit-area")).to_be_hidden()
    page.set_input_files("#edit-image", str(tmp_path / "in.png"))
    expect(page.locator("#edit-area")).to_be_visible()
    # paint a band across the lower part of the canvas with the mouse
    page.locator("#edit-canvas").scroll_into_view_if_needed()
    box = page.locator("#edit-canvas").bounding_box()
    for frac in (0.7, 0.8, 0.9):
        y = box["y"] + frac * box["height"]
        page.mouse.move(box["x"] + 2, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] - 2, y, steps=24)
        page.mouse.up()
    mask = np.array(page.evaluate("Array.from(state.edit.mask)"), bool).reshape(32, 32)
    assert mask[24:29].all() and not mask[:18].any()  # painted where the mouse went
    page.fill("#image-prompt", "a small red circle")
    page.fill("#n", "2")
    page.fill("#seed", "3")
    page.evaluate(RECORD_FORMS)
    with page.expect_request("**/v1/images/edits"):
        page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE)
    fields = page.evaluate("window.sent_forms.pop()")
    assert "mask" in fields and "image" in fields and "strength" not in fields
    assert "scheduler" not in fields  # the server's RePaint defaults
    images = page.locator("#images img")
    expect(images).to_have_count(2)
    for src in images.evaluate_all("imgs => imgs.map(i => i.src)"):
        got = _data_url_pixels(src)
        assert np.array_equal(got[~mask], source[~mask])  # kept exactly
        assert not np.array_equal(got[mask], source[mask])  # filled
    assert page.locator("#progress").evaluate("p => p.max") == 50  # inpainting's 50 steps
    shot(page, "playground-inpaint.png")

    # Nothing painted: the whole image redrawn at the strength
    page.click("#clear-mask")
    page.fill("#strength", "0.5")
    with page.expect_request("**/v1/images/edits"):
        page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE)
    fields = page.evaluate("window.sent_forms.pop()")
    assert "strength" in fields and "mask" not in fields
    # Not an image: said, and nothing sent
    (tmp_path / "notes.png").write_text("not a picture")
    page.set_input_files("#edit-image", str(tmp_path / "notes.png"))
    expect(page.locator("#status")).to_have_class("error")
    expect(page.locator("#edit-area")).to_be_hidden()


def test_a_restorer_shows_the_input_and_the_restored_image_side_by_side(page, server, runs,
                                                                       tmp_path):  # fmt: skip
    import numpy as np
    from PIL import Image

    from aigc.data.shapes import generate_shapes

    pipe = aigc.load(runs["restore"])
    noisy = pipe.degrade(generate_shapes(1, 24, seed=6).images[0], seed=1)[0]
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    page.goto(server + "/")
    choose(page, "restore")
    expect(page.locator("#restore-controls")).to_be_visible()
    expect(page.locator("#image-controls")).to_be_hidden()
    expect(page.locator("#restore-hint")).to_contain_text("removes Gaussian noise, sigma 0.2")
    expect(page.locator("#generate")).to_have_text("Restore")
    page.set_input_files("#restore-image", str(tmp_path / "noisy.png"))
    page.fill("#seed", "")
    with page.expect_request("**/v1/images/edits"):
        page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE)
    captions = page.locator("#images figcaption")
    expect(captions).to_have_text(["input, 24×24", "restored, 24×24"])
    srcs = page.locator("#images img").evaluate_all("imgs => imgs.map(i => i.src)")
    assert np.array_equal(_data_url_pixels(srcs[0]), noisy)  # the file as sent
    want = pipe.restore(noisy, output="uint8")[0]
    assert np.array_equal(_data_url_pixels(srcs[1]), want)  # what the Python API gives
    shot(page, "playground-restore.png")


def test_a_translator_shows_the_input_beside_its_translation_either_way(page, server, runs,
                                                                       tmp_path):  # fmt: skip
    import numpy as np
    from PIL import Image

    from aigc.data.shapes import generate_shapes

    pipe = aigc.load(runs["translate"])
    scene = generate_shapes(1, 32, seed=6).images[0]
    Image.fromarray(scene).save(tmp_path / "scene.png")
    page.goto(server + "/")
    choose(page, "translate")
    expect(page.locator("#translate-controls")).to_be_visible()
    expect(page.locator("#restore-controls")).to_be_hidden()
    expect(page.locator("#translate-hint")).to_contain_text("multiples of 4")
    expect(page.locator("#generate")).to_have_text("Translate")
    options = page.locator("#translate-direction option")
    expect(options).to_have_count(2)
    page.set_input_files("#translate-image", str(tmp_path / "scene.png"))
    page.select_option("#translate-direction", "b2a")
    with page.expect_request("**/v1/images/edits"):
        page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE)
    captions = page.locator("#images figcaption")
    expect(captions).to_have_text(["input, 32×32", "translated, 32×32"])
    srcs = page.locator("#images img").evaluate_all("imgs => imgs.map(i => i.src)")
    want = pipe.translate(scene, direction="b2a", output="uint8")[0]
    assert np.array_equal(_data_url_pixels(srcs[1]), want)  # the Python API's, the way chosen
    assert not np.array_equal(want, pipe.translate(scene, direction="a2b", output="uint8")[0])
    shot(page, "playground-translate.png")


# ---------------------------------------------------------------------------
# audio: each clip a player (an object URL) and a spectrogram drawn by the page


@pytest.fixture(scope="module")
def audio_runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny text-to-speech run (voices slt and awb) and a tiny speech denoiser, as
    tests/test_tts.py and tests/test_denoise.py make them; flite makes their data."""
    if shutil.which("flite") is None:
        pytest.skip("flite is missing: `make system` installs it")
    root = tmp_path_factory.mktemp("playground-audio")
    tts, denoise = root / "tts", root / "denoise"
    aigc.train(TTS_RECIPE, TTS_TINY, run_dir=tts, progress=False)
    aigc.train(DENOISE_RECIPE, [*DENOISE_TINY, "train.max_steps=2"], run_dir=denoise,
               progress=False)  # fmt: skip
    return {"tts": tts, "denoise": denoise}


@pytest.fixture(scope="module")
def audio_server(audio_runs) -> Iterator[str]:
    with serving(create_app(list(audio_runs.values()))) as url:
        yield url


CLIPS_DONE = re.compile(r"^done \((\d+) clips? of \d+\.\d\d s, \d+\.\d s\)$")

# A player's duration in seconds, once it has read the clip's header.
DURATION = """async audio => {
  if (audio.readyState < 1) await new Promise((loaded, failed) => {
    audio.addEventListener("loadedmetadata", loaded, {once: true});
    audio.addEventListener("error", () => failed(new Error("the clip did not load")), {once: true});
  });
  return audio.duration;
}"""

# A canvas's pixels, as [width, height, [r, g, b, a, ...]].
PIXELS = """canvas => [canvas.width, canvas.height,
  Array.from(canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data)]"""

# The page's FFT of a real signal, as [re, im].
PAGE_FFT = """x => {
  const re = Float64Array.from(x), im = new Float64Array(x.length);
  fft(re, im);
  return [Array.from(re), Array.from(im)];
}"""


def _canvas_pixels(canvas):
    import numpy as np

    width, height, data = canvas.evaluate(PIXELS)
    return np.array(data, np.uint8).reshape(height, width, 4)


def _spectrogram_colours(wave, ramp):
    """What the page should draw for ``wave``, computed here with numpy: the STFT (Hann
    window of 512, hop 128), power in dB over the 80 dB below the loudest bin, mapped
    through the page's colour ramp; low frequencies in the last row."""
    import numpy as np

    frame, hop, bins = 512, 128, 256
    columns = max(1, (len(wave) - frame) // hop + 1)
    padded = np.zeros(max(len(wave), frame), np.float64)
    padded[: len(wave)] = wave
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / frame)
    frames = np.stack([padded[t * hop : t * hop + frame] * hann for t in range(columns)])
    db = 10 * np.log10(np.abs(np.fft.rfft(frames, axis=1)[:, :bins]) ** 2 + 1e-12)
    level = np.clip((db - db.max() + 80) / 80, 0, 1)
    colours = ramp.reshape(256, 3)[np.round(level * 255).astype(int)]  # (columns, bins, 3)
    return colours.transpose(1, 0, 2)[::-1]  # (bins, columns, 3), low frequencies at the bottom


def test_a_speech_model_says_the_text_with_a_player_and_a_spectrogram(page, audio_server):
    import io

    import httpx
    import numpy as np
    import soundfile as sf

    page.goto(audio_server + "/")
    choose(page, "tts")
    expect(page.locator("#speech-controls")).to_be_visible()
    expect(page.locator("#text-controls")).to_be_hidden()
    expect(page.locator("#model-info")).to_contain_text("voices slt, awb")
    expect(page.locator("#speech-input")).to_have_attribute("placeholder", "4 2 7")
    expect(page.locator("#generate")).to_have_text("Say")
    assert page.locator("#voice option").all_text_contents() == ["slt", "awb"]
    expect(page.locator("#speed")).to_have_value("1")
    page.fill("#speech-input", "4 2")
    page.select_option("#voice", "awb")
    page.fill("#seed", "3")
    with page.expect_response("**/v1/audio/speech") as answered:
        page.click("#generate")
    expect(page.locator("#status")).to_have_text(CLIPS_DONE)
    sent = answered.value.request.post_data_json
    assert sent == {"model": "tts", "input": "4 2", "voice": "awb", "speed": 1, "seed": 3,
                    "response_format": "wav"}  # fmt: skip
    assert answered.value.headers["content-type"] == "audio/wav"
    # the same request again (the same seed: the same sound), to see what the page got
    again = httpx.post(f"{audio_server}/v1/audio/speech", json=sent, timeout=60)
    wave, rate = sf.read(io.BytesIO(again.content), dtype="float32")

    audio = page.locator("#sounds audio")
    expect(audio).to_have_count(1)
    assert audio.get_attribute("src").startswith("blob:")  # the CSP's media-src
    assert audio.evaluate(DURATION) == pytest.approx(len(wave) / rate, abs=0.01)
    expect(page.locator("#sounds figcaption")).to_have_text(
        f"“4 2” in awb, {len(wave) / rate:.2f} s"
    )

    # The spectrogram: not one colour, and numpy's STFT of the WAV the server sent.
    pixels = _canvas_pixels(page.locator("#sounds canvas"))
    assert pixels.shape == (256, (len(wave) - 512) // 128 + 1, 4)
    assert len(np.unique(pixels.reshape(-1, 4), axis=0)) > 20
    assert (pixels[..., 3] == 255).all()
    ramp = np.array(page.evaluate("Array.from(RAMP)"), np.int64)
    want = _spectrogram_colours(wave.astype(np.float64), ramp)
    assert np.abs(pixels[..., :3].astype(np.int64) - want).max() <= 3  # a level's rounding
    # and the FFT under it is numpy's
    x = np.random.default_rng(0).standard_normal(512)
    re, im = page.evaluate(PAGE_FFT, x.tolist())
    assert np.allclose(np.array(re) + 1j * np.array(im), np.fft.fft(x), atol=1e-9)
    shot(page, "playground-speech.png")


def test_text_a_speech_model_cannot_say_shows_the_servers_message(page, audio_server):
    page.goto(audio_server + "/")
    choose(page, "tts")
    page.fill("#speech-input", "4")
    page.press("#speech-input", "Enter")  # Enter says it
    expect(page.locator("#status")).to_have_text(CLIPS_DONE)
    page.fill("#speech-input", "hello")
    page.press("#speech-input", "Enter")
    status = page.locator("#status")
    expect(status).to_have_class("error")
    expect(status).to_have_text(
        "'hello' needs the phones hh, l, which this model never heard in training: it says "
        "what it learnt (digit strings)"
    )
    assert "Traceback" not in status.text_content()
    expect(page.locator("#sounds figcaption")).to_have_text(re.compile("^“4” in slt"))  # kept
    expect(page.locator("#generate")).to_be_enabled()


def test_a_denoiser_shows_the_recording_and_the_denoised_one(page, audio_server, tmp_path):
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(1)
    t = np.arange(8000) / 16000
    noisy = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(tmp_path / "noisy.wav", noisy.astype(np.float32), 16000)  # 16-bit PCM
    sf.write(tmp_path / "noisy.flac", noisy.astype(np.float32), 16000)
    page.goto(audio_server + "/")
    choose(page, "denoise")
    expect(page.locator("#denoise-controls")).to_be_visible()
    expect(page.locator("#speech-controls")).to_be_hidden()
    expect(page.locator("#generate")).to_have_text("Denoise")
    expect(page.locator("#seed")).to_be_hidden()  # nothing drawn at random
    page.set_input_files("#denoise-file", str(tmp_path / "noisy.wav"))
    page.evaluate(RECORD_FORMS)
    with page.expect_response("**/v1/audio/denoise") as answered:
        page.click("#generate")
    expect(page.locator("#status")).to_have_text(CLIPS_DONE)
    assert answered.value.headers["content-type"] == "audio/wav"
    assert page.evaluate("window.sent_forms.pop()") == ["model", "response_format", "file"]
    expect(page.locator("#sounds figcaption")).to_have_text(["input, 0.50 s", "denoised, 0.50 s"])
    audio = page.locator("#sounds audio")
    expect(audio).to_have_count(2)
    for player in audio.all():
        assert player.get_attribute("src").startswith("blob:")
        assert player.evaluate(DURATION) == pytest.approx(0.5, abs=0.01)
    canvases = page.locator("#sounds canvas")
    for canvas in canvases.all():
        pixels = _canvas_pixels(canvas)
        assert pixels.shape[:2] == (256, (8000 - 512) // 128 + 1)
        assert len(np.unique(pixels.reshape(-1, 4), axis=0)) > 20
    # the input's spectrogram is numpy's of the file as sent
    ramp = np.array(page.evaluate("Array.from(RAMP)"), np.int64)
    wave = sf.read(tmp_path / "noisy.wav", dtype="float64")[0]
    got = _canvas_pixels(canvases.first)[..., :3].astype(np.int64)
    assert np.abs(got - _spectrogram_colours(wave, ramp)).max() <= 3
    shot(page, "playground-denoise.png")

    # A file that is not WAV (FLAC) is decoded by the browser for its spectrogram.
    page.set_input_files("#denoise-file", str(tmp_path / "noisy.flac"))
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(CLIPS_DONE)
    expect(page.locator("#sounds figcaption")).to_have_text(["input, 0.50 s", "denoised, 0.50 s"])
    expect(page.locator("#sounds canvas:visible")).to_have_count(2)

    # Not audio: the server's message.
    (tmp_path / "notes.wav").write_text("not a recording")
    page.set_input_files("#denoise-file", str(tmp_path / "notes.wav"))
    page.click("#generate")
    expect(page.locator("#status")).to_have_class("error")
    expect(page.locator("#status")).to_contain_text("not audio")
