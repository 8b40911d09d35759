"""Serving: the OpenAI-compatible API through the official `openai` client and plain HTTP (every error case, the
API key, a full queue, 32 concurrent clients, a client that hangs up), the command line, and the chat page in a
real browser (Debian's chromium driven by Selenium). Every server is real: uvicorn on a free port of 127.0.0.1."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from conftest import REPO, assert_user_error, chatty_model  # chatty: answers in letters, never stops early
from nanochat_nb import checkpoint
from nanochat_nb.engine import Engine
from nanochat_nb.common import UserError
from nanochat_nb.serve import (AnswerText, ServerThread, assistant_parts, create_app, free_port, is_loopback,
                                main)

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer(byte_tokenizer):
    return byte_tokenizer


@pytest.fixture(scope="module")
def model(tokenizer):
    return chatty_model(tokenizer, sequence_len=4096)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    "Two workers on one tiny model, a queue of 64."
    engines = [Engine(model, tokenizer), Engine(model, tokenizer)]
    with ServerThread(create_app(engines, model_name="tiny", queue_size=64)) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(server, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + "/v1/chat/completions", content=content, timeout=30, **kwargs)


def error_of(response, status: int) -> dict:
    "The error body of `response`, checked to be OpenAI's shape with status `status`."
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"].endswith("."), body
    return body["error"]


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_answer_text_spells_tools_and_cuts_at_stop_strings(tokenizer):
    text = "ok <|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> done, Crème 🍮 STOP no"
    ids = tokenizer.encode(text, allowed_special="all")
    answer = AnswerText(tokenizer, stop=["STOP", "xyz"])
    deltas = [answer.feed(t) for t in ids] + [answer.flush()]
    assert "".join(deltas) == text[:text.index("STOP")] and answer.stopped
    assert all("S" not in d for d in deltas)  # the stop string's first letters were held back, never sent
    held = AnswerText(tokenizer, stop=["xyz"])  # a tail that might start a stop string comes out at the end
    assert "".join([held.feed(t) for t in tokenizer.encode("abcxy")] + [held.flush()]) == "abcxy"
    parts = assistant_parts(text[:text.index("STOP")])
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
    rendered, _ = tokenizer.render_conversation([*HI, {"role": "assistant", "content": parts}])
    assert rendered[rendered.index(tokenizer.id_of("<|assistant_start|>")) + 1:-1] == ids[:ids.index(ord("S"))]


def test_openai_client_plain_and_streaming(client, tokenizer):
    models = client.models.list()
    assert [m.id for m in models] == ["tiny"] and models.data[0].object == "model"
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0.9, seed=3)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "tiny"
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and len(choice.message.content) == 12
    assert reply.usage.prompt_tokens == len(tokenizer.render_for_completion(HI))
    assert reply.usage.completion_tokens == 12 and reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0.9, seed=3,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    stop = choice.message.content[5:7]
    stopped = client.chat.completions.create(model="tiny", messages=HI, max_tokens=40, temperature=0.9, seed=3,
                                             stop=[stop, "never"])
    cut = choice.message.content[:choice.message.content.index(stop)]
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == cut


def test_n_and_seed(client):
    def answers(**kwargs):
        reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=10, temperature=1.0, **kwargs)
        return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]
    first = answers(n=3, seed=11)
    assert len(first) == 3 and len(set(first)) == 3  # three different samples from one batch
    assert answers(n=3, seed=11) == first and answers(n=1, seed=11) == first[:1]  # same seed, same answers
    assert answers(n=3, seed=12) != first
    greedy = client.chat.completions.create(model="tiny", messages=HI, max_tokens=10, temperature=0, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_every_bad_request_gets_its_status_and_error_body(server, client):
    long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(501)]
    cases = [(b"{not json", 400, "invalid_json", None), (b"[1, 2]", 422, "invalid_type", None),
             ({"messages": "hello"}, 422, "invalid_type", "messages"),
             ({"messages": []}, 400, "invalid_value", "messages"),
             ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", "messages[0].role"),
             ({"messages": [{"role": "user", "content": 42}]}, 422, "invalid_type", "messages[0].content"),
             ({"messages": [{"role": "user", "content": "  "}]}, 400, "invalid_value", "messages"),
             ({"messages": [*HI, {"role": "user", "content": "twice"}]}, 400, "invalid_value", "messages"),
             ({"messages": [*HI, {"role": "assistant", "content": "no question"}]}, 400, "invalid_value", "messages"),
             ({"messages": long_chat}, 400, "invalid_value", "messages"),
             ({"messages": [{"role": "user", "content": "x" * 8001}]}, 400, "message_too_long", "messages[0].content"),
             ({"messages": [{"role": "user", "content": "x" * 4000}] * 3}, 400, "invalid_value", "messages"),
             ({"messages": [{"role": "user", "content": "y" * 4100}]}, 400, "context_length_exceeded", "messages"),
             ({"messages": HI, "max_tokens": 5000}, 400, "invalid_value", "max_tokens"),
             ({"messages": HI, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
             ({"messages": HI, "max_tokens": 2.5}, 422, "invalid_type", "max_tokens"),
             ({"messages": HI, "temperature": -1}, 400, "invalid_value", "temperature"),
             ({"messages": HI, "temperature": "hot"}, 422, "invalid_type", "temperature"),
             ({"messages": HI, "top_k": 500}, 400, "invalid_value", "top_k"),
             ({"messages": HI, "n": 9}, 400, "invalid_value", "n"),
             ({"messages": HI, "n": True}, 422, "invalid_type", "n"),
             ({"messages": HI, "stream": "yes"}, 422, "invalid_type", "stream"),
             ({"messages": HI, "stop": ["a", ""]}, 400, "invalid_value", "stop"),
             ({"messages": HI, "seed": "s"}, 422, "invalid_type", "seed")]
    for body, status, code, param in cases:
        error = error_of(post(server, body), status)
        assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error"), (body, error)
    assert error_of(post(server, b'{"messages": "' + b"x" * 1_000_001 + b'"}'), 413)["code"] == "request_too_large"
    chunked = httpx.post(server.url + "/v1/chat/completions", content=iter([b"{" + b" " * 600_000] * 2), timeout=30)
    assert error_of(chunked, 413)["code"] == "request_too_large"  # no Content-Length: counted as it arrives
    assert error_of(post(server, b"\xff\xfe{}"), 400)["code"] == "invalid_json"
    assert error_of(post(server, b"[" * 100_000), 400)["code"] == "invalid_json"  # too deep for the parser
    assert error_of(httpx.get(server.url + "/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(httpx.get(server.url + "/v1/chat/completions"), 405)["code"] == "method_not_allowed"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=HI, temperature=3)
    assert raised.value.body["param"] == "temperature"
    noted = post(server, {"messages": HI, "max_tokens": 2, "top_p": 0.5, "presence_penalty": 1})
    assert noted.status_code == 200 and noted.json()["notes"] == ["top_p is not supported and was ignored",
                                                                  "presence_penalty is not supported and was ignored"]
    assert "top_p" in noted.headers["x-nanochat-notes"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["workers_alive"] == 2  # nothing above hurt a worker


def test_api_key(model, tokenizer):
    with ServerThread(create_app(Engine(model, tokenizer), "tiny", api_key="s3cret")) as server:
        for path in ("/v1/models", "/health", "/stats"):
            assert error_of(httpx.get(server.url + path), 401)["code"] == "invalid_api_key"
        wrong = post(server, {"messages": HI}, headers={"Authorization": "Bearer nope"})
        assert error_of(wrong, 401)["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/").status_code == 200  # the page holds no data; it asks for the key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert len(keyed.chat.completions.create(model="tiny", messages=HI, max_tokens=3).choices[0].message.content) == 3
    with pytest.raises(UserError, match="Mode 'bogus'"):
        create_app(Engine(model, tokenizer), mode="bogus")


def stream_lines(server, body, started: threading.Event | None = None) -> list[str]:
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={"stream": True, **body}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = []
        for line in r.iter_lines():
            if line:
                lines.append(line)
                if started is not None:
                    started.set()
        return lines


def test_32_concurrent_streaming_clients(server):
    def one(i):
        lines = stream_lines(server, {"messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": 6,
                                      "seed": i})
        return lines[-1], "".join(json.loads(l[6:])["choices"][0]["delta"].get("content", "")
                                  for l in lines[:-1] if json.loads(l[6:])["choices"])
    served = httpx.get(server.url + "/stats").json()["requests_served"]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(last == "data: [DONE]" and len(text) == 6 for last, text in results)
    stats = httpx.get(server.url + "/stats").json()
    assert stats["requests_served"] == served + 32 and stats["requests_failed"] == 0 and stats["queue_length"] == 0


def test_full_queue_answers_503_and_disconnects_free_the_worker(model, tokenizer):
    app = create_app(Engine(model, tokenizer), "tiny", queue_size=1)
    with ServerThread(app) as server:
        stats = lambda: httpx.get(server.url + "/stats").json()
        long = {"messages": HI, "max_tokens": 4000}  # some 15 s of work, unless its client leaves
        # a streaming client that hangs up after its first tokens
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**long, "stream": True}) as response:
            lines = response.iter_lines()  # (kept: a dropped iterator closes the response)
            next(lines)
            wait_until(lambda: stats()["workers_busy"] == 1)
            queued = threading.Thread(target=lambda: post(server, {**long, "max_tokens": 5}))
            queued.start()  # waits in the queue behind the long answer
            wait_until(lambda: stats()["queue_length"] == 1)
            full = post(server, long)
            assert error_of(full, 503)["code"] == "queue_full" and full.headers["retry-after"] == "1"
            assert error_of(full, 503)["type"] == "server_error"
        queued.join(timeout=5)  # served as soon as the first client left
        assert not queued.is_alive()
        after = stats()
        assert after["requests_cancelled"] == 1 and after["requests_rejected"] == 1 and after["workers_busy"] == 0
        assert after["tokens_generated"] < 1000  # the long answer stopped when its client left
        # a plain (non-streaming) client that gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=long, timeout=0.5)
        begun = time.monotonic()
        assert post(server, {**long, "max_tokens": 3}).status_code == 200
        assert time.monotonic() - begun < 3 and stats()["requests_cancelled"] == 2
        assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, model, tokenizer):
    "A base-model run folder, <home>/base_checkpoints/d2, with a checkpoint and its tokenizer."
    folder = tmp_path_factory.mktemp("home") / "base_checkpoints" / "d2"
    checkpoint.save(folder, 3, model, meta={"tokenizer": checkpoint.tokenizer_fingerprint(tokenizer)})
    tokenizer.save(folder / "tokenizer")
    return folder


def test_command_line_serves_a_run_folder(base_run):
    port = free_port()
    env = {**os.environ, "NANOCHAT_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_nb.serve", "--checkpoint", str(base_run), "--port",
                             str(port), "--threads", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        headers = {"Authorization": "Bearer k"}
        url = f"http://127.0.0.1:{port}"
        def up():
            assert proc.poll() is None, proc.communicate()
            try:
                return httpx.get(url + "/health", headers=headers).status_code == 200
            except httpx.TransportError:
                return False
        wait_until(up, timeout=60)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == ["d2"]
        reply = client.chat.completions.create(model="d2", messages=[{"role": "user", "content": "Once upon"}],
                                               max_tokens=5, temperature=0)
        assert len(reply.choices[0].message.content) == 5  # a base model continues the text (complete mode)
        assert reply.usage.prompt_tokens == 1 + len("Once upon")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert "complete mode" in out and "Traceback" not in err, (out, err)


def test_command_line_bad_input_is_one_line(base_run, tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        assert_user_error(capsys, "Cannot listen", main, ["--checkpoint", str(base_run), "--port", port])
    for args, message in ((["--port", "0"], "--port 0"), (["--workers", "-1"], "must not be negative"),
                          (["--api-key", " "], "API key is empty"), (["--checkpoint", str(tmp_path)], str(tmp_path))):
        assert_user_error(capsys, message, main, ["--port", str(free_port()), *args])
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.1.2.3", "example.org")] == \
        [True, True, True, False, False, False]


def test_page_in_a_real_browser(server):
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "install Debian's chromium and chromium-driver (apt)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    os.environ["SE_OFFLINE"] = "true"  # never let selenium-manager download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,720"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(server.url + "/")
        find = lambda css: driver.find_elements(By.CSS_SELECTOR, css)
        idle = lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "0"
        assert not find("script[src]") and not find("link[rel=stylesheet]")
        wait_until(lambda: driver.find_element(By.ID, "model").text == "tiny")
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("400")
        driver.find_element(By.ID, "input").send_keys("Hello, model!")
        driver.find_element(By.ID, "send").click()
        # the answer streams in: seen growing while the request runs, then complete
        wait_until(lambda: len(find(".assistant .content")) == 1 and len(find(".assistant .content")[0].text) > 0)
        partial = find(".assistant .content")[0].text
        wait_until(idle, timeout=30)
        first = find(".assistant .content")[0].text
        assert len(partial) < len(first) == 400 and find(".user .content")[0].text == "Hello, model!"
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("30")
        find(".regenerate")[0].click()
        wait_until(lambda: idle() and len(find(".assistant .content")[0].text) == 30)
        assert len(find(".message")) == 2
        # a conversation with a calculator call: shown apart, and sent back as the model wrote it
        driver.execute_script("chat.messages = [{role: 'user', content: 'What is 12*7?'}, {role: 'assistant', "
                              "content: 'Let me see. <|python_start|>12*7<|python_end|><|output_start|>84"
                              "<|output_end|> It is 84.'}]; chat.render();")
        assert [s.text for s in find(".assistant .python, .assistant .python_output")] == ["calculator: 12*7", "= 84"]
        driver.find_element(By.ID, "input").send_keys("And 12*8?\n")
        wait_until(lambda: idle() and len(find(".assistant .content")) == 2, timeout=30)
        assert driver.find_element(By.ID, "status").text == "" and len(find(".assistant .content")[1].text) == 30
        find(".edit")[1].click()  # edit the second question and regenerate from there
        area = find("textarea.edit")[0]
        area.clear()
        area.send_keys("And 12*9?")
        find(".save")[0].click()
        wait_until(lambda: idle() and len(find(".message")) == 4, timeout=30)
        assert find(".user .content")[1].text == "And 12*9?"
        shots = REPO / "outputs"
        driver.save_screenshot(str(shots / "serve_page.png"))
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("3000")
        driver.find_element(By.ID, "input").send_keys("Go on and on\n")
        wait_until(lambda: len(find(".assistant .content")) == 3 and len(find(".assistant .content")[2].text) > 0)
        driver.find_element(By.ID, "stop").click()  # the page aborts the request; the server frees the worker
        wait_until(lambda: idle() and find(".note")[-1].text == "(stopped)")
        wait_until(lambda: httpx.get(server.url + "/stats").json()["workers_busy"] == 0, timeout=3)
        driver.find_element(By.ID, "clear").click()
        assert find(".message") == []
        driver.find_element(By.ID, "input").send_keys("/temperature 0\n")
        assert driver.find_element(By.ID, "temperature-value").text == "0"
    finally:
        driver.quit()
