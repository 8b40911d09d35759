"""Chat: the stream decoder, the session, the command line (one prompt, bad input, and a real terminal under
tmux: a streamed answer, /temperature, Ctrl-C mid-answer, /clear, /quit) and the notebook widget."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ipywidgets
import pytest
import torch

from conftest import REPO, SPOKEN, assert_user_error, chatty_model, run_python
from nanochat_nb import checkpoint
from nanochat_nb.chat import (ChatSession, ChatWidget, StreamDecoder, chat_widget, default_checkpoint_dir, default_mode,
                              load_engine, main, pieces_to_parts)
from nanochat_nb.common import UserError
from nanochat_nb.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(byte_tokenizer):
    return byte_tokenizer


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(chatty_model(tokenizer), tokenizer)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, engine):
    "A run folder as SFT would leave it: <home>/chatsft_checkpoints/d2 with a checkpoint and its tokenizer."
    folder = tmp_path_factory.mktemp("home") / "chatsft_checkpoints" / "d2"
    checkpoint.save(folder, 5, engine.model, meta={"tokenizer": checkpoint.tokenizer_fingerprint(engine.tokenizer)})
    engine.tokenizer.save(folder / "tokenizer")
    return folder


def test_stream_decoder_joins_split_characters_and_marks_tools(tokenizer):
    text = "Crème brûlée 🍮 costs 7€."
    decoder = StreamDecoder(tokenizer)
    pieces = [p for t in tokenizer.encode(text) for p in decoder.feed(t)] + decoder.flush()
    assert "".join(p.text for p in pieces) == text and len(pieces) < len(text.encode())
    ids = tokenizer.encode("ok <|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> done<|assistant_end|>",
                           allowed_special="all")
    decoder = StreamDecoder(tokenizer)
    parts = pieces_to_parts([p for t in ids for p in decoder.feed(t)] + decoder.flush())
    assert parts == [{"type": "text", "text": "ok "}, {"type": "python", "text": "12*7"},
                     {"type": "python_output", "text": "84"}, {"type": "text", "text": " done"}]
    decoder = StreamDecoder(tokenizer)
    assert decoder.feed(0xF0) == [] and decoder.flush()[0].text == "\ufffd"  # a cut-off character is not lost silently


def test_session_keeps_the_exact_tokens_and_stops(engine, tokenizer):
    session = ChatSession(engine, "chat", temperature=0.7, max_tokens=10)
    first = "".join(p.text for p in session.reply("hi"))
    special = tokenizer.id_of
    assert session.tokens == [special("<|bos|>"), special("<|user_start|>"), *tokenizer.encode("hi"),
                              special("<|user_end|>"), special("<|assistant_start|>"), *tokenizer.encode(first),
                              special("<|assistant_end|>")]
    assert len(first) == 10 and set(first) <= set(SPOKEN) and not session.stopped
    before = list(session.tokens)
    calls = []
    answer = "".join(p.text for p in session.reply("more", stop=lambda: calls.append(1) or len(calls) >= 3))
    assert len(answer) == 3 and session.stopped and session.tokens[:len(before)] == before
    assert session.tokens[-1] == special("<|assistant_end|>") and len(session.messages) == 4
    stream = session.reply("and more")  # a consumer that closes the stream (Ctrl-C) still gets the turn recorded
    next(stream)
    stream.close()
    assert session.stopped and session.messages[-2:] == [{"role": "user", "content": "and more"},
                                                        {"role": "assistant", "content": [{"type": "text", "text": session.messages[-1]["content"][0]["text"]}]}]
    again = ChatSession(engine, "chat", temperature=0.7, max_tokens=10)
    assert "".join(p.text for p in again.reply("hi")) == first  # same seed, same answer
    session.clear()
    assert session.tokens == [tokenizer.bos_id] and session.messages == []
    complete = ChatSession(engine, "complete", temperature=0, max_tokens=5)
    text = "".join(p.text for p in complete.reply("Once upon"))
    assert complete.tokens == [tokenizer.bos_id, *tokenizer.encode("Once upon" + text)]


def test_session_refuses_bad_input(engine, tokenizer):
    session = ChatSession(engine, "chat")
    for bad in ["", "   "]:
        with pytest.raises(UserError, match="empty"):
            session.reply(bad)
    with pytest.raises(UserError, match="negative"):
        ChatSession(engine, "chat", temperature=-1)
    session.top_k = -3
    with pytest.raises(UserError, match="negative"):
        session.reply("hi")
    with pytest.raises(UserError, match="Unknown mode"):
        ChatSession(engine, "banter")
    short = Engine(chatty_model(tokenizer, sequence_len=32), tokenizer)
    with pytest.raises(UserError, match="context only 32: clear it"):
        ChatSession(short, "chat").reply("x" * 40)
    with pytest.raises(UserError, match="assistant message"):
        session.load({"messages": [{"role": "user", "content": "hi"}]})


def test_default_checkpoint_and_mode(run_dir, tokenizer):
    home = run_dir.parent.parent
    assert default_checkpoint_dir(home) == run_dir
    assert default_mode(run_dir, tokenizer) == "chat"
    assert default_mode(home / "base_checkpoints" / "d2", tokenizer) == "complete"
    engine, meta, folder = load_engine(run_dir, device_type="cpu")
    assert meta["step"] == 5 and folder == run_dir and engine.tokenizer.vocab_size == tokenizer.vocab_size
    with pytest.raises(UserError, match="No checkpoint under"):
        default_checkpoint_dir(home / "empty")


def chat_args(run_dir, *args):
    return ["-m", "nanochat_nb.chat", "--checkpoint", str(run_dir), "--threads", "1", *args]


def test_cli_answers_one_prompt(run_dir):
    done = run_python(*chat_args(run_dir, "-p", "hello", "--max-tokens", "12", "--seed", "3"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = done.stdout.rstrip("\n")
    assert len(answer) == 12 and set(answer) <= set(SPOKEN) and not done.stderr


def test_cli_bad_input_is_one_line(run_dir, tmp_path, capsys):
    assert_user_error(capsys, "does not exist", main, chat_args(tmp_path / "nothing_here", "-p", "hi")[2:])
    assert_user_error(capsys, "must not be negative", main, chat_args(run_dir, "-p", "hi", "--temperature", "-1")[2:])
    assert_user_error(capsys, "--threads -2", main, chat_args(run_dir, "-p", "hi", "--threads", "-2")[2:])
    assert_user_error(capsys, "nor infinite", main, chat_args(run_dir, "-p", "hi", "--temperature", "nan")[2:])


class Tmux:
    "One program in a detached tmux session on a private server: type into it and read its screen."

    def __init__(self, tmp_path, command: list[str], name="chat"):
        conf = tmp_path / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g history-limit 20000\n")  # keep the pane to read its end
        self.base, self.name = ["tmux", "-L", f"nanochat-test-{os.getpid()}", "-f", str(conf)], name
        self.env = {k: v for k, v in os.environ.items() if k != "TMUX"}
        # bash waits for the program and prints its exit status (on Ctrl-C, bash waits on as long as the program does)
        script = f'{shlex.join(command)}; echo "[exit status $?]"'
        self.tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "40", "-c", str(REPO), shlex.join(["bash", "-c", script]))
        self.socket = self.tmux("display-message", "-p", "#{socket_path}").strip()

    def tmux(self, *args) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True, env=self.env).stdout

    def type(self, text: str):
        self.tmux("send-keys", "-t", self.name, "-l", text)
        self.tmux("send-keys", "-t", self.name, "Enter")

    def press(self, key: str):
        self.tmux("send-keys", "-t", self.name, key)

    def screen(self) -> str:
        "The screen and its scrollback, wrapped lines joined, trailing blank lines dropped."
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.name).rstrip()

    def exit_status(self) -> int | None:
        "The program's exit status once it has ended, else None."
        found = re.findall(r"^\[exit status (\d+)\]$", self.screen(), re.M)
        return int(found[-1]) if found else None

    def wait_for(self, condition, what: str, timeout: float = 60.0):
        "Poll the screen until condition(screen) is true; fail with the screen if it never is."
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if condition(screen):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; the screen:\n{screen[-3000:]}")
            time.sleep(0.1)

    def close(self):
        subprocess.run([*self.base, "kill-server"], capture_output=True, env=self.env)
        if self.socket:
            Path(self.socket).unlink(missing_ok=True)


def last_answer(screen: str) -> str:
    return screen.rsplit("Assistant: ", 1)[-1].split("\n", 1)[0] if "Assistant: " in screen else ""


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_cli_in_a_real_terminal(run_dir, tmp_path):
    term = Tmux(tmp_path, [sys.executable, *chat_args(run_dir, "--max-tokens", "6000", "--seed", "1")])
    try:
        term.wait_for(lambda s: s.endswith("User:"), "the banner and the prompt")
        assert "chat mode" in term.screen()
        term.type("/temperature nan")
        term.wait_for(lambda s: "Usage: /temperature X, a number >= 0." in s and s.endswith("User:"), "a usage line")
        term.type("/temperature 0.5")
        term.wait_for(lambda s: "Temperature set to 0.5." in s and s.endswith("User:"), "/temperature's answer")

        term.type("tell me a long story")  # 6000 tokens: it is still streaming when Ctrl-C comes
        screen = term.wait_for(lambda s: len(last_answer(s)) >= 40, "the start of the answer")
        shown = len(last_answer(screen))
        term.wait_for(lambda s: len(last_answer(s)) > shown + 20, "the answer to grow as it streams")
        term.press("C-c")
        screen = term.wait_for(lambda s: "(stopped)" in s and s.endswith("User:"), "the answer to stop")
        answer = last_answer(screen).removesuffix(" (stopped)").replace("^C", "")  # the terminal echoes Ctrl-C
        assert 40 <= len(answer) < 6000 and set(answer) <= set(SPOKEN)
        assert term.exit_status() is None and "Traceback" not in screen

        term.type("/clear")
        term.wait_for(lambda s: "Conversation cleared." in s and s.endswith("User:"), "/clear's answer")
        term.press("C-c")  # at the prompt: a hint, not the end
        term.wait_for(lambda s: "(Ctrl-C again or Ctrl-D to quit)" in s, "the hint after Ctrl-C at the prompt")
        term.type("/quit")
        term.wait_for(lambda s: "[exit status" in s, "the program to end", timeout=30)
        assert term.exit_status() == 0 and "Traceback" not in term.screen()
    finally:
        term.close()


def test_widget_sends_and_shows_the_reply(engine):
    widget = chat_widget(engine, max_tokens=30, seed=2)
    assert isinstance(widget, ipywidgets.VBox) and isinstance(widget, ChatWidget)
    widget.input.value = "hello widget"  # what Enter in the box does
    assert widget.wait(timeout=60) and widget.input.value == ""
    user, assistant = widget.session.messages
    assert user == {"role": "user", "content": "hello widget"}
    reply = assistant["content"][0]["text"]
    assert len(reply) == 30 and set(reply) <= set(SPOKEN)
    assert "hello widget" in widget.transcript.value and reply in widget.transcript.value
    assert widget.text() == f"User: hello widget\nAssistant: {reply}"
    assert not widget.send_button.disabled and widget.stop_button.disabled


def test_widget_stop_send_sliders_and_clear(engine):
    widget = chat_widget(engine, max_tokens=6000)
    assert widget.send("a long one")
    deadline = time.monotonic() + 60
    while len(widget.text()) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert widget.busy and widget.send_button.disabled and not widget.stop_button.disabled
    widget.input.value = "second"  # typed while an answer runs: it waits in the box
    assert widget.input.value == "second"
    widget.stop_button.click()
    assert widget.wait(timeout=30) and widget.session.stopped and "(stopped)" in widget.status.value
    assert 0 < len(widget.session.messages[1]["content"][0]["text"]) < 6000
    widget.temperature.value, widget.top_k.value = 0.0, 5
    widget.session.max_tokens = 8
    widget.send_button.click()
    assert widget.wait(timeout=60)
    assert [m["content"] for m in widget.session.messages[::2]] == ["a long one", "second"]
    assert (widget.session.temperature, widget.session.top_k) == (0.0, 5) and widget.input.value == ""
    widget.clear_button.click()
    assert widget.session.messages == [] and "You:" not in widget.transcript.value


def test_widget_shows_tool_calls_apart(engine):
    widget = chat_widget(engine)
    widget.session.load({"messages": [
        {"role": "user", "content": "12 rows of 7?"},
        {"role": "assistant", "content": [{"type": "python", "text": "12*7"}, {"type": "python_output", "text": "84"},
                                          {"type": "text", "text": " eggs"}]}]})
    widget.render()
    assert "[calculator: 12*7][= 84] eggs" in widget.text()
    assert re.search(r'<span style="[^"]*monospace[^"]*">calculator: 12\*7</span>', widget.transcript.value)
    assert re.search(r'<span style="[^"]*">= 84</span>', widget.transcript.value)
    bad = chat_widget(engine)
    assert not bad.send("   ") and bad.session.messages == []
