"""Moderation: the policy's categories, /v1/moderations with the official openai client,
and `aigc serve --moderation` refusing and redacting prompts and outputs."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from sklearn.metrics import precision_score, recall_score

import aigc
from aigc.errors import ConfigError
from aigc.safety.moderation import ContentRefused, Moderator, WordList, read_word_list
from aigc.safety.moderation_set import BLOCKLIST, CATEGORIES, labelled_set, obfuscate

from .conftest import run_cli, start_server

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

BLOCK = {"codes": {"source": "blocklist", "action": "refuse", **BLOCKLIST}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def examples():
    return labelled_set(seed=0, per_group=60)


@pytest.fixture(scope="module")
def moderator() -> Moderator:
    return Moderator.from_policy({"categories": {
        "personal_data": {"action": "redact"}, "profanity": {"action": "refuse"}, **BLOCK}})  # fmt: skip


def _by_group(examples, moderator, category):
    out: dict[str, list[bool]] = {}
    for e, r in zip(examples, moderator.check_batch([e.text for e in examples]), strict=True):
        out.setdefault(e.group, []).append(r.categories[category])
    return out


# ---------------------------------------------------------------------------
# categories


def test_profanity_finds_listed_words_and_their_disguises_but_not_inside_other_words(
    examples, moderator
):
    flagged = _by_group(examples, moderator, "profanity")
    assert all(flagged["profane"]) and all(flagged["profane_obfuscated"])
    # the Scunthorpe problem: a listed word inside another word is no match
    for group in ("clean", "scunthorpe", "pii", "pii_distractor", "blocklist"):
        assert not any(flagged[group]), group
    # what a word list cannot know: a listed word in an innocent sense is still found,
    # and disguises it is not written for are missed (the set shows both)
    assert all(flagged["homonym"])
    assert sum(flagged["profane_evasive"]) < len(flagged["profane_evasive"]) / 4


def test_profanity_scores_are_the_worst_severity_and_the_threshold_cuts():
    words = read_word_list()
    assert words["fuck"] == 1.0 and words["damn"] == 0.5
    m = Moderator.default()
    for text, score in [("well damn it", 0.5), ("damn, what the FUUUCK", 1.0),
                        ("a classic Scunthorpe cocktail", 0.0), ("sh1t", 1.0), ("f*ck", 1.0),
                        ("f.u.c.k", 1.0), ("@ss", 0.5), ("as", 0.0), ("grass", 0.0),
                        ("assess the asses", 0.5), ("assess", 0.0)]:  # fmt: skip
        r = m.check(text)
        assert r.category_scores["profanity"] == score, text
        assert r.categories["profanity"] == (score >= 0.5) == r.flagged, text
    strict = Moderator.from_policy({"categories": {"profanity": {"action": "refuse", "threshold": 1}}})  # fmt: skip
    assert not strict.check("well damn it").flagged and strict.check("bullshit").flagged


def test_word_matches_are_whole_words_against_a_brute_force_reference():
    """Spans of plain (undisguised) words equal a search that tries every position: a
    term matches at i when the text from i starts with it (any case) and the characters
    on both sides are not letters or digits."""
    terms = ["cat", "cats", "dog house", "bird"]
    wl = WordList(dict.fromkeys(terms, 1.0))
    rng = random.Random(3)
    pieces = ["cat", "cats", "scat", "catsup", "dog", "house", "dog house", "bird", "birds",
              "Bird", "CAT", "x", "a1", " ", " ", ", ", ".", "-", "_"]  # fmt: skip
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        expected, i = [], 0
        while i < len(text):
            hits = [t for t in terms if text.lower().startswith(t, i)
                    and (i == 0 or not text[i - 1].isalnum())
                    and (i + len(t) == len(text) or not text[i + len(t)].isalnum())]  # fmt: skip
            if hits:
                t = max(hits, key=len)
                expected.append((i, i + len(t)))
                i += len(t)
            else:
                i += 1
        assert [(a, b) for a, b, _ in wl.find(text)] == expected, text


def test_blocklists_match_words_phrases_disguises_and_patterns(examples, moderator):
    flagged = _by_group(examples, moderator, "codes")
    truth = [e.truth["blocklist"] for e in examples if e.group == "blocklist"]
    assert flagged["blocklist"] == truth and any(truth) and not all(truth)
    for group in ("clean", "pii", "pii_distractor", "scunthorpe", "homonym"):
        assert not any(flagged[group]), group
    rng = random.Random(0)
    for word in BLOCKLIST["words"]:
        for _ in range(10):
            disguised = obfuscate(word, rng)
            assert moderator.check(f"about {disguised}!").categories["codes"], disguised
    spans = moderator.check("ACME-2024 and acme-2024 and ACME-20245").spans
    assert [(s.label, s.text) for s in spans] == [("pattern", "ACME-2024")]  # as written


def test_personal_data_is_found_and_numbers_that_are_not_are_left(examples, moderator):
    flagged = _by_group(examples, moderator, "personal_data")
    assert sum(flagged["pii"]) >= 0.95 * len(flagged["pii"])
    assert sum(flagged["pii_distractor"]) <= 0.03 * len(flagged["pii_distractor"])
    assert not any(flagged["clean"]) and not any(flagged["profane"])


def test_redaction_replaces_the_spans_of_redacting_categories_only():
    from aigc.data import privacy

    m = Moderator.from_policy({"categories": {
        "personal_data": {"action": "redact"},
        "profanity": {"action": "redact", "placeholder": "****"},
        "codes": {"source": "blocklist", "action": "refuse", "words": ["bluebird"]},
    }})  # fmt: skip
    text = "Mail alice@example.com, you sh1t, about bluebird."
    expected_pii = privacy.redact(text, privacy.find_pii(text))  # privacy's own placeholder
    assert "alice@example.com" not in expected_pii
    placeholder = expected_pii[len("Mail ") : expected_pii.index(",")]
    assert m.redact(text) == f"Mail {placeholder}, you ****, about bluebird."
    r = m.check(text)
    assert r.flagged and r.categories == {"personal_data": True, "profanity": True, "codes": True}
    assert [s.category for s in r.spans] == ["personal_data", "profanity", "codes"]
    assert [text[s.start : s.end] for s in r.spans] == ["alice@example.com", "sh1t", "bluebird"]
    with pytest.raises(ContentRefused, match="'codes'"):
        m.screen(text, "prompts")
    assert m.screen("you sh1t", "outputs") == "you ****"


def test_overlapping_spans_are_redacted_once():
    m = Moderator.from_policy({"categories": {
        "a": {"source": "blocklist", "action": "redact", "patterns": ["abc"], "placeholder": "<A>"},
        "b": {"source": "blocklist", "action": "redact", "patterns": ["bcd"], "placeholder": "<B>"},
    }})  # fmt: skip
    assert m.redact("xabcdx abc") == "x<A>x <A>"


def test_applies_to_limits_where_a_category_is_checked():
    m = Moderator.from_policy({"categories": {
        "profanity": {"action": "refuse", "applies_to": "outputs"},
        "codes": {"source": "blocklist", "action": "redact", "words": ["x1"], "applies_to": ["prompts"]},
    }})  # fmt: skip
    assert m.screen("damn x1", "prompts") == "damn [CODES]"
    with pytest.raises(ContentRefused):
        m.screen("damn x1", "outputs")
    assert set(m.check("a", "prompts").categories) == {"codes"}
    assert set(m.check("a").categories) == {"profanity", "codes"}


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"categories": {"violence": {"action": "refuse"}}}, "categories.violence: unknown category"),
        ({"categories": {"profanity": {"action": "delete"}}}, "categories.profanity.action='delete' must be refuse or redact"),
        ({"categories": {"c": {"source": "blocklist", "action": "refuse", "patterns": ["ok", "a(b"]}}},
         r"categories.c.patterns\[1\]='a\(b' is not a valid regular expression"),
        ({"categories": {"c": {"source": "blocklist", "action": "refuse", "patterns": ["x*"]}}}, "matches the empty text"),
        ({"categories": {"c": {"source": "blocklist", "action": "refuse"}}}, "needs words or patterns"),
        ({"categories": {"c": {"source": "rumour", "action": "refuse"}}}, "source='rumour' is not one of"),
        ({"categories": {"profanity": {"action": "refuse", "treshold": 1}}}, "unknown key 'treshold'"),
        ({"categories": {"profanity": {"action": "refuse", "threshold": 2}}}, r"threshold=2 must be a number in \(0, 1\]"),
        ({"categories": {"profanity": {"action": "refuse", "applies_to": "inputs"}}}, "applies_to='inputs'"),
        ({"categories": {"personal_data": {"action": "redact", "kinds": ["shoe_size"]}}}, "kinds: 'shoe_size' is not one of"),
        ({"categories": {"c": {"source": "classifier", "action": "redact", "run": "r"}}}, "its action must be refuse"),
        ({"categories": {}}, "'categories' must map"),
        ({"rules": {}}, "unknown key 'rules'"),
    ],
)  # fmt: skip
def test_policy_mistakes_are_one_line_errors_naming_the_key(policy, message):
    with pytest.raises(ConfigError, match=message) as e:
        Moderator.from_policy(policy)
    assert "\n" not in str(e.value) and str(e.value).startswith("moderation policy: ")


def test_policy_files_are_read_and_their_errors_name_the_file(tmp_path):
    path = tmp_path / "house.yaml"
    path.write_text(yaml.safe_dump({"categories": {"profanity": {"action": "refuse"}}}))
    m = Moderator.from_policy(path)
    assert m.name == "house" and m.categories == ["profanity"]
    path.write_text("categories:\n  profanity: {action: refuse\n")
    with pytest.raises(ConfigError, match=r"house.yaml: not valid YAML \(line \d+\)"):
        Moderator.from_policy(path)
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such file"):
        Moderator.from_policy(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------
# streams


def test_a_stream_filter_sends_what_screen_gives_and_never_a_refused_word():
    m = Moderator.from_policy({"categories": {
        "personal_data": {"action": "redact"},
        "profanity": {"action": "redact"},
        "codes": {"source": "blocklist", "action": "refuse", "words": ["nightjar"]},
    }})  # fmt: skip
    rng = random.Random(1)
    text = ("Write to bob.k@example.org or call +44 20 7946 0123, you sh1t; the classic "
            "Scunthorpe grass was fine. ") * 3  # fmt: skip
    for _ in range(20):
        f, out, i = m.stream("outputs"), [], 0
        while i < len(text):  # pieces of 1 to 7 characters, as a decoder hands them out
            k = rng.randint(1, 7)
            out.append(f.feed(text[i : i + k]))
            i += k
        assert "".join(out) + f.finish() == m.screen(text, "outputs")
    f, sent = m.stream("outputs"), ""
    with pytest.raises(ContentRefused, match="'codes'"):
        for ch in "a long and innocent beginning of a text, " * 3 + "then nightjar, then more":
            sent += f.feed(ch)
    assert "nightjar" not in sent and sent.startswith("a long")


# ---------------------------------------------------------------------------
# the server


class Server:
    """uvicorn serving `app` in a thread on a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        from aigc.serve.cli import bind

        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=30)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def _serve(runs, policy: dict | None, tmp_path: Path, **settings) -> Server:
    from aigc.serve.app import create_app
    from aigc.serve.settings import ServeSettings

    if policy is not None:
        path = tmp_path / "policy.yaml"
        path.write_text(yaml.safe_dump(policy), encoding="utf-8")
        settings["moderation"] = str(path)
    return Server(create_app(runs, ServeSettings(device="cpu", max_prompt_chars=500, **settings)))


@pytest.fixture(scope="module")
def plain(serve_runs, tmp_path_factory):
    srv = _serve([serve_runs["gpt"]], None, tmp_path_factory.mktemp("plain"))
    yield srv
    srv.close()


def test_moderations_endpoint_answers_the_openai_client_by_the_default_policy(plain):
    client = plain.client()
    texts = ["a quiet walk to the library", "what the f*ck", "mail me at jo@example.com"]
    r = client.moderations.create(input=texts)
    assert r.id.startswith("modr-") and r.model == "aigc-default"
    expected = Moderator.default().check_batch(texts)
    assert [x.flagged for x in r.results] == [False, True, True]
    for got, want in zip(r.results, expected, strict=True):
        # our categories are not OpenAI's: the client keeps them as extra fields, and
        # leaves OpenAI's (harassment, ...) None: this server does not judge them
        assert got.flagged == want.flagged and got.categories.harassment is None
        assert got.categories.model_extra == want.categories
        assert got.category_scores.model_extra == want.category_scores
    one = client.moderations.create(input="damn", model="aigc-default")
    assert len(one.results) == 1 and one.results[0].category_scores.model_extra["profanity"] == 0.5


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": []}, 400, "input"),
        ({"input": [1, "a"]}, 422, "input"),
        ({"input": 5}, 422, "input"),
        ({"input": ""}, 400, "input"),
        ({"input": ["ok", "  "]}, 400, "input"),
        ({"input": "x" * 501}, 400, "input"),
        ({"input": ["x"] * 65}, 400, "input"),
        ({"input": "x", "model": "omni-moderation-latest"}, 404, "model"),
        ({"input": "x", "extra": 1}, 422, "extra"),
        ({}, 422, "input"),
    ],
)
def test_bad_moderation_requests_get_4xx_in_openai_shape(plain, body, status, param):
    r = httpx.post(f"{plain.url}/v1/moderations", json=body, timeout=10)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"] and "\n" not in error["message"]


def test_a_refusing_server_started_from_the_cli_answers_400_to_flagged_prompts(
    serve_runs, tmp_path
):
    policy = tmp_path / "strict.yaml"
    policy.write_text(yaml.safe_dump({"categories": {
        "profanity": {"action": "refuse"}, **BLOCK}}), encoding="utf-8")  # fmt: skip
    proc, url = start_server([str(serve_runs["gpt"]), str(serve_runs["chat"]),
                              str(serve_runs["cgan"]), "--port", "0", "--device", "cpu",
                              "--moderation", str(policy)])  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
        cases = [
            (lambda: client.completions.create(model="gpt", prompt=["fine", "you a$$hole"],
                                                max_tokens=3), "prompt", "profanity"),
            (lambda: client.chat.completions.create(model="chat", messages=[
                {"role": "user", "content": "tell me about ACME-2024"}], max_tokens=3),
             "messages", "codes"),
            (lambda: client.images.generate(model="cgan", prompt="7, bluebird"), "prompt", "codes"),
        ]  # fmt: skip
        for call, param, category in cases:
            with pytest.raises(openai.BadRequestError) as e:
                call()
            assert e.value.code == "content_policy_violation" and e.value.param == param
            assert f"category {category!r}" in e.value.message and "strict" in e.value.message
        # clean prompts pass, and /v1/moderations answers by the server's policy
        assert client.completions.create(model="gpt", prompt="The", max_tokens=3).choices
        r = client.moderations.create(input="bluebird")
        assert r.model == "strict" and r.results[0].categories.model_extra["codes"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_bad_policy_stops_aigc_serve_with_one_line(serve_runs, tmp_path):
    policy = tmp_path / "bad.yaml"
    policy.write_text("categories:\n  c: {source: blocklist, action: refuse, patterns: ['(']}\n")
    r = run_cli("serve", str(serve_runs["gpt"]), "--port", "0", "--moderation", str(policy))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad.yaml: categories.c.patterns[0]='(' is not a valid regular expression" in r.stderr


def test_a_redacting_server_redacts_prompts_and_outputs_whole_and_streamed(serve_runs, tmp_path):
    # every vowel is redacted: a char model's output is sure to have some
    policy = {"categories": {"vowels": {"source": "blocklist", "action": "redact",
                                        "patterns": ["[aeiouAEIOU]"], "placeholder": "_"}}}  # fmt: skip
    srv = _serve([serve_runs["gpt"], serve_runs["chat"]], policy, tmp_path)
    try:
        client = srv.client()
        gen = aigc.load(serve_runs["gpt"], device="cpu")
        raw = gen.generate("Th_", max_new_tokens=40, temperature=1.0, seed=3)
        assert re.search("[aeiouAEIOU]", raw), "the test needs an output with vowels"
        # the prompt "The" reaches the model as "Th_"; the output comes back redacted
        r = client.completions.create(model="gpt", prompt="The", max_tokens=40, seed=3, echo=True)
        assert r.choices[0].text == "Th_" + re.sub("[aeiouAEIOU]", "_", raw)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="gpt", prompt="The", max_tokens=40, seed=3, stream=True))  # fmt: skip
        assert streamed == re.sub("[aeiouAEIOU]", "_", raw)
        chat = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "question 1 about lists?"}],
            max_tokens=20, seed=1,
        )  # fmt: skip
        assert not re.search("[aeiouAEIOU]", chat.choices[0].message.content)
    finally:
        srv.close()


def test_a_refused_output_is_a_400_whole_and_an_error_event_streamed(serve_runs, tmp_path):
    policy = {"categories": {"letters": {"source": "blocklist", "action": "refuse",
                                         "patterns": ["[A-Za-z]"], "applies_to": "outputs"}}}  # fmt: skip
    srv = _serve([serve_runs["gpt"]], policy, tmp_path)
    try:
        client = srv.client()
        with pytest.raises(openai.BadRequestError) as e:  # the prompt may have letters
            client.completions.create(model="gpt", prompt="The", max_tokens=60, seed=3)
        assert e.value.code == "content_policy_violation" and "'letters'" in e.value.message
        body = {"model": "gpt", "prompt": "The", "max_tokens": 60, "seed": 3, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "content_policy_violation"
        sent = "".join(c["text"] for e in events[:-2] for c in json.loads(e)["choices"])
        assert not re.search("[A-Za-z]", sent)  # nothing refused went out before the error
    finally:
        srv.close()


# ---------------------------------------------------------------------------
# a classifier run as a category


@pytest.fixture(scope="module")
def food_run(tmp_path_factory) -> Path:
    """A tiny classifier that tells fruit, vegetable and fish sentences apart."""
    root = tmp_path_factory.mktemp("food")
    rng = random.Random(0)
    rows = []
    for i in range(120):
        word, label = (("apple", "fruit"), ("carrot", "veg"), ("salmon", "fish"))[i % 3]
        filler = " ".join(rng.choice(["the", "a", "one", "some"]) for _ in range(3))
        rows.append({"text": f"{filler} {word} {filler}", "label": label})
    data = root / "food.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {"family": "classifier", "data": {"path": str(data), "val_fraction": 0.2},
           "model": {"block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
           "train": {"max_steps": 150, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5,
                     "eval_every": 0}}  # fmt: skip
    return Path(aigc.train(cfg, run_dir=root / "food", progress=False).run_dir)


def test_a_classifier_run_gives_category_scores_by_its_thresholds(food_run):
    m = Moderator.from_policy({"categories": {"food": {
        "source": "classifier", "run": str(food_run), "action": "refuse",
        "thresholds": {"fish": 0.5, "veg": 0.9}}}})  # fmt: skip
    assert m.categories == ["food", "food/fish", "food/veg"]
    clf = aigc.load(food_run, device="cpu")
    texts = ["one salmon the", "a carrot some", "the apple a", "some one a salmon a the one",
             "a the a carrot one one a", "apple"]  # fmt: skip
    results = m.check_batch(texts)
    for text, r in zip(texts, results, strict=True):
        probs = clf.classify(text)["probs"]  # the run itself, read directly
        assert r.category_scores["food/fish"] == pytest.approx(probs["fish"], abs=1e-5)
        assert r.category_scores["food/veg"] == pytest.approx(probs["veg"], abs=1e-5)
        assert r.categories["food/fish"] == (probs["fish"] >= 0.5)
        assert r.categories["food/veg"] == (probs["veg"] >= 0.9)
        assert r.categories["food"] == r.flagged == (r.categories["food/fish"] or r.categories["food/veg"])  # fmt: skip
        assert r.category_scores["food"] == max(r.category_scores["food/fish"], r.category_scores["food/veg"])  # fmt: skip
    assert any(r.flagged for r in results) and not all(r.flagged for r in results)
    # a text longer than the run's block (32 characters) is read in windows: its score is
    # the run's probability for some piece of it, and at least that of its first block
    long = " ".join(texts)
    score = m.check(long).category_scores["food/veg"]
    assert score >= clf.classify(long)["probs"]["veg"] - 1e-5
    pieces = [long[i : i + k] for k in range(8, 33) for i in range(len(long) - k + 1)]
    assert min(abs(r["probs"]["veg"] - score) for r in clf.classify(pieces)) < 1e-5
    flagged = texts[[r.flagged for r in results].index(True)]
    with pytest.raises(ContentRefused, match="'food'"):
        m.screen(flagged, "outputs")
    # a stream waits for a whole-text category until the text ends
    f = m.stream("outputs")
    assert f.feed(flagged) == "" and f.feed(" " * 100) == ""
    with pytest.raises(ContentRefused):
        f.finish()


def test_classifier_policy_mistakes_name_the_label_and_the_run(food_run, serve_runs):
    spec = {"source": "classifier", "run": str(food_run), "action": "refuse"}
    with pytest.raises(ConfigError, match=r"thresholds: 'meat' is not a label of .* \(fish, fruit, veg\)"):  # fmt: skip
        Moderator.from_policy({"categories": {"food": {**spec, "thresholds": {"meat": 0.5}}}})
    with pytest.raises(ConfigError, match="is a text run, not a classifier"):
        Moderator.from_policy({"categories": {"food": {**spec, "run": str(serve_runs["gpt"]),
                                                       "thresholds": {"x": 0.5}}}})  # fmt: skip


def test_precision_and_recall_agree_with_sklearn(examples, moderator):
    from aigc.safety.moderation_set import precision_recall

    results = moderator.check_batch([e.text for e in examples])
    names = {"personal_data": "personal_data", "profanity": "profanity", "blocklist": "codes"}
    for category in CATEGORIES:
        truth = [e.truth[category] for e in examples]
        pred = [r.categories[names[category]] for r in results]
        p, r = precision_recall(truth, pred)
        assert p == pytest.approx(precision_score(truth, pred, zero_division=0), abs=1e-12)
        assert r == pytest.approx(recall_score(truth, pred, zero_division=0), abs=1e-12)
