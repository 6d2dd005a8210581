"""`gama-ds serve` as a real server process, driven by the stock `openai` client, raw HTTP and
a real headless browser: answers equal to `gama_ds.infer.generate`'s, streamed and not,
concurrent requests batched, bad requests refused with OpenAI-style errors, the API key, the page."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from conftest import ROOT, write_audio

KEY = "test-key-5f1c"
MAX_TOKENS = 8
QUESTIONS = ["How many beeps?", "Is this a tone or noise?", "What is the sound?", "Describe the clip"]
# The tokenizer's words: the prompt template's and the questions', then fillers up to the tiny
# LLM's 512-token vocabulary, so that every id the random LLM can pick decodes to a word.
WORDS = (
    "# Instruction : Response How many beeps ? Is this a tone or noise What the sound Describe clip".split()
)


def build_export(folder) -> str:
    """The tiny recipe's model with a random LoRA (a trained adapter's stand-in: with LoRA's zero
    init every question would get the same answer), a word tokenizer, exported."""
    from gama_ds.config import load_recipe
    from gama_ds.data.tokenizer import word_tokenizer
    from gama_ds.model.build import build_model
    from gama_ds.train.export import write_export

    words = WORDS + [f"w{i}" for i in range(508 - len(WORDS))]
    word_tokenizer([" ".join(words)]).save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    recipe = load_recipe("tiny", [f"data.tokenizer={folder / 'tokenizer'}"])
    model = build_model(recipe.model)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    write_export(model, recipe, str(folder / "export"), {"test": "serve"})
    return str(folder / "export")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One export, one server on it (started first: it loads while the test computes references),
    clips in every format, and infer.generate's greedy answer for each (clip, question) used."""
    tmp = tmp_path_factory.mktemp("serve")
    export = build_export(tmp)
    port = free_port()
    log = open(tmp / "server.log", "w")
    cmd = [
        sys.executable, "-m", "gama_ds", "serve", "--model", export, "--port", str(port), "--api-key", KEY,
        "--max-batch", "4", "--batch-wait-ms", "200", "--max-audio-s", "5", "--max-request-mb", "1",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        clips = {
            "a.wav": write_audio(tmp / "a.wav", seconds=1.0, seed=1),
            "b.flac": write_audio(tmp / "b.flac", seconds=1.5, sr=22050, channels=2, seed=2),
            "c.ogg": write_audio(tmp / "c.ogg", seconds=2.0, sr=44100, subtype="VORBIS", seed=3),
            "d.mp3": write_audio(tmp / "d.mp3", seconds=2.5, subtype="MPEG_LAYER_III", seed=4),
            "long.wav": write_audio(tmp / "long.wav", seconds=6.0, seed=5),
        }
        from gama_ds.exported import load_export
        from gama_ds.infer import generate

        model, tokenizer, info = load_export(export)
        pairs = [(name, q) for name, q in zip(["a.wav", "b.flac", "c.ogg", "d.mp3"], QUESTIONS, strict=True)]
        answers = generate(
            model,
            tokenizer,
            [clips[name] for name, _ in pairs],
            [{"instruction": q, "input": ""} for _, q in pairs],
            info["prompt"]["template"],
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
        )
        assert all(answers) and len(set(answers)) > 1, answers  # different questions, different answers
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"the server exited {server.returncode}: {open(tmp / 'server.log').read()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, open(tmp / "server.log").read()[-3000:]
            time.sleep(0.2)
        yield {
            "url": url,
            "clips": clips,
            "expected": dict(zip(pairs, answers, strict=True)),
            "tokenizer": tokenizer,
            "audio_tokens": model.num_audio_tokens,
            "template": info["prompt"]["template"],
            "log": tmp / "server.log",
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def client(served, key=KEY):
    import openai

    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def audio_part(path: str, fmt: str | None = None, data: bytes | None = None) -> dict:
    raw = open(path, "rb").read() if data is None else data
    fmt = fmt or path.rsplit(".", 1)[1]
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}


def ask(question: str, *parts) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question}, *parts]}]


def metrics(served) -> dict[str, float]:
    req = urllib.request.Request(served["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r"^(\S+) (\S+)$", text, re.M) if not m[0].startswith("#")}


def test_the_openai_client_gets_generates_answers_streamed_and_not(served):
    from gama_ds.data.collate import prompt_text

    api = client(served)
    assert [m.id for m in api.models.list()] == ["export"]
    for (name, question), expected in list(served["expected"].items())[:2]:
        messages = ask(question, audio_part(served["clips"][name]))
        done = api.chat.completions.create(
            model="export", messages=messages, temperature=0, max_tokens=MAX_TOKENS
        )
        choice = done.choices[0]
        assert choice.message.content == expected and choice.message.role == "assistant", name
        prompt = len(
            served["tokenizer"](prompt_text({"instruction": question}, served["template"]))["input_ids"]
        )
        assert done.usage.prompt_tokens == prompt + served["audio_tokens"]
        assert 1 <= done.usage.completion_tokens <= MAX_TOKENS
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
        assert choice.finish_reason == ("length" if done.usage.completion_tokens == MAX_TOKENS else "stop")

        stream = api.chat.completions.create(
            model="export",
            messages=messages,
            temperature=0,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == expected and len(pieces) > 1  # token by token, not one block
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
        assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    # A shorter limit cuts the same answer short; the export's own sampling answers something.
    short = api.chat.completions.create(model="export", messages=messages, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert expected.startswith(short.choices[0].message.content)
    assert (
        api.chat.completions.create(model="export", messages=messages, max_tokens=3)
        .choices[0]
        .message.content
    )


def test_concurrent_requests_are_batched_and_answered_as_one_at_a_time(served):
    api = client(served)
    before = metrics(served)
    pairs = list(served["expected"])
    barrier = threading.Barrier(len(pairs))
    answers: dict = {}

    def one(pair):
        name, question = pair
        messages = ask(question, audio_part(served["clips"][name]))
        barrier.wait(timeout=30)
        out = api.chat.completions.create(
            model="export", messages=messages, temperature=0, max_tokens=MAX_TOKENS
        )
        answers[pair] = out.choices[0].message.content

    threads = [threading.Thread(target=one, args=(p,)) for p in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == served["expected"]
    after = metrics(served)
    assert after["gama_ds_requests_total"] - before["gama_ds_requests_total"] == len(pairs)
    new = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("gama_ds_batches_total")}
    assert sum(new.values()) < len(pairs), (
        f"the 4 requests ran one at a time: {new}"
    )  # at least one batch of 2+


def test_a_seed_makes_sampling_repeatable(served):
    api = client(served)
    messages = ask("What is the sound?", audio_part(served["clips"]["a.wav"]))

    def sample(seed):
        return (
            api.chat.completions.create(
                model="export", messages=messages, temperature=1.5, top_p=1.0, seed=seed, max_tokens=12
            )
            .choices[0]
            .message.content
        )

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1  # temperature 1.5 over 512 words: the seed matters


def raw(served, body, headers=None, method="POST", path="/v1/chat/completions", key=KEY):
    """(status, parsed JSON) of a request sent by hand, for what no well-behaved client sends."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {
        "Content-Type": "application/json",
        **({"Authorization": f"Bearer {key}"} if key else {}),
        **(headers or {}),
    }
    req = urllib.request.Request(served["url"] + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def chunked_upload(served, size: int) -> tuple[int, dict]:
    """A body with no Content-Length, sent in chunks: the limit must hold while reading."""
    conn = http.client.HTTPConnection("127.0.0.1", int(served["url"].rsplit(":", 1)[1]), timeout=60)
    pieces = (b'{"model": "export", "x": "' + b"a" * (size // 16) for _ in range(16))
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=pieces,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        encode_chunked=True,
    )
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def declared_too_long(served) -> tuple[int, dict]:
    """Headers that announce 50 MB, and no body: refused before a byte of it is read."""
    with socket.create_connection(("127.0.0.1", int(served["url"].rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: 50000000\r\n\r\n".encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            got = s.recv(65536)
            if not got:
                break
            reply += got
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(served):
    clips = served["clips"]
    wav = open(clips["a.wav"], "rb").read()
    a, long = audio_part(clips["a.wav"]), audio_part(clips["long.wav"])
    junk, flac_as_wav = (
        audio_part(clips["a.wav"], "wav", b"\x00junk" * 50),
        audio_part(clips["b.flac"], "wav"),
    )
    cases = [
        ("undecodable", 400, "invalid_audio", ask("Loud?", junk)),
        ("empty", 400, "empty_audio", ask("Loud?", audio_part(clips["a.wav"], "wav", b""))),
        ("no samples", 400, "empty_audio", ask("Loud?", audio_part(clips["a.wav"], "wav", wav[:44]))),
        ("format", 415, "unsupported_audio_format", ask("Loud?", audio_part(clips["a.wav"], "aac"))),
        ("mismatch", 400, "audio_format_mismatch", ask("Loud?", flac_as_wav)),
        ("too long", 400, "audio_too_long", ask("Loud?", long)),
        ("no question", 400, "missing_question", ask(" ", a)),
        ("two clips", 400, "too_many_audio_parts", ask("Loud?", a, a)),
        ("history", 400, "unsupported_conversation", [{"role": "system", "content": "."}, *ask("Loud?")]),
    ]  # fmt: skip
    for label, status, code, messages in cases:
        got, body = raw(served, {"model": "export", "messages": messages, "max_tokens": 2})
        assert (got, body["error"]["code"]) == (status, code), (label, body)
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], label
    not_base64 = ask("Loud?", {"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}})
    assert raw(served, {"model": "export", "messages": not_base64})[1]["error"]["code"] == "invalid_base64"
    for body, status, param in [
        ({"model": "other", "messages": ask("Loud?")}, 404, "model"),
        ({"model": "export", "messages": ask("Loud?"), "temperature": 3}, 400, "temperature"),
        ({"model": "export", "messages": ask("Loud?"), "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "export", "messages": ask("Loud?"), "frequency_penalty": 1}, 400, "frequency_penalty"),
        ({"model": "export", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
    ]:
        got, answer = raw(served, body)
        assert got == status and answer["error"]["message"], (body, answer)
        assert param is None or answer["error"]["param"] == param, answer
    assert raw(served, b"{not json")[0] == 400
    assert raw(served, b"{}", headers={"Content-Type": "text/plain"})[0] == 415

    # --max-request-mb 1: by the declared length, and while reading a body that declares none.
    status, body = declared_too_long(served)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = chunked_upload(served, 1_200_000)
    assert status == 413 and body["error"]["code"] == "request_too_large"

    # Still serving, and every refusal counted.
    (name, question), expected = next(iter(served["expected"].items()))
    again = client(served).chat.completions.create(
        model="export", messages=ask(question, audio_part(clips[name])), temperature=0, max_tokens=MAX_TOKENS
    )
    assert again.choices[0].message.content == expected
    assert metrics(served)['gama_ds_rejected_total{status="400"}'] >= 9


def test_the_api_key_is_required_where_it_is_set(served):
    import openai

    for key in ("wrong-key",):
        with pytest.raises(openai.AuthenticationError, match="not this server's"):
            client(served, key).models.list()
    status, body = raw(served, {"model": "export", "messages": ask("Loud?")}, key=None)
    assert (
        status == 401 and body["error"]["code"] == "invalid_api_key" and "Bearer" in body["error"]["message"]
    )
    status, body = raw(served, None or b"", method="GET", path="/v1/models", key=None)
    assert status == 401
    # The page and what it needs before the user gives a key are open.
    with urllib.request.urlopen(served["url"] + "/api/info", timeout=10) as r:
        assert json.loads(r.read())["api_key_required"] is True
    with urllib.request.urlopen(served["url"] + "/", timeout=10) as r:
        assert b'id="spectrogram"' in r.read()


def browser():
    from cluster import unusable

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        unusable("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_the_web_page_answers_an_uploaded_clip_and_draws_its_spectrogram(served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    (name, question), _ = list(served["expected"].items())[1]  # the FLAC clip, stereo at 22.05 kHz
    api_answer = client(served).chat.completions.create(
        model="export", messages=ask(question, audio_part(served["clips"][name])), temperature=0, max_tokens=5
    )
    status, spectrogram = raw(
        served,
        {"data": audio_part(served["clips"][name])["input_audio"]["data"], "format": "flac"},
        path="/api/spectrogram",
    )
    assert status == 200
    page = browser()
    try:
        page.get(served["url"] + "/")
        wait = WebDriverWait(page, 60)
        wait.until(lambda p: p.find_element(By.ID, "model-name").text == "export")
        key = page.find_element(By.ID, "api-key")
        assert key.is_displayed()  # the server wants a key: the page asks for it
        key.send_keys(KEY)
        page.find_element(By.ID, "file").send_keys(served["clips"][name])
        wait.until(lambda p: p.find_element(By.ID, "spectrogram").get_attribute("data-frames"))
        page.find_element(By.ID, "question").send_keys(question)
        page.find_element(By.ID, "temperature").send_keys("0")
        page.find_element(By.ID, "max-tokens").send_keys("5")
        page.find_element(By.ID, "ask").click()
        wait.until(lambda p: p.find_element(By.ID, "answer").get_attribute("data-state") in ("done", "error"))
        assert page.find_element(By.ID, "error").text == ""
        assert page.find_element(By.ID, "answer").text == api_answer.choices[0].message.content
        drawn = page.execute_script(
            """const c = document.getElementById('spectrogram');
               const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
               const colours = new Set(); let opaque = 0;
               for (let i = 0; i < d.length; i += 4) {
                 if (d[i + 3] === 255) opaque++;
                 colours.add(d[i] * 65536 + d[i + 1] * 256 + d[i + 2]);
               }
               return [c.width, c.height, opaque, colours.size];"""
        )  # fmt: skip
        width, height, opaque, colours = drawn
        assert (
            (width, height) == (spectrogram["frames"], 128) and opaque == width * height and colours > 50
        ), drawn
    finally:
        page.quit()


def test_every_number_is_checked_before_the_model_loads(served, tmp_path, capsys):
    from gama_ds.cli import main
    from gama_ds.serve.options import ServeOptions

    export = os.path.dirname(served["clips"]["a.wav"]) + "/export"
    for flags, message in [
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms must be a finite number at least 0"),
        (["--max-audio-s", "nan"], "--max-audio-s must be a finite number above 0"),
        (["--max-request-mb", "0"], "--max-request-mb must be a finite number above 0"),
        (["--port", "70000"], "--port must be within 1..65535"),
        (["--api-key", " "], "--api-key is empty"),
        (["--device", "mps"], "--device mps: only cpu and cuda[:N]"),
        (["--device", "cpu", "--dtype", "fp16"], "--dtype fp16 runs on a GPU only"),
        (["--llm", str(tmp_path / "gone")], "is not a folder"),
        (["--tagger", str(tmp_path / "gone")], "is not a folder (the export's tagger"),
        (["--tagger", str(tmp_path)], "has no soft prompt, so no use for a tagger"),
    ]:
        assert main(["serve", "--model", export, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "is not a gama-ds export" in capsys.readouterr().err
    placement = ServeOptions(model=export, device="cpu", dtype="bf16").check()
    assert placement == (torch.device("cpu"), torch.bfloat16)  # what load_export is given
