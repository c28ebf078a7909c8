"""`msfx chat` driven through a pseudo-terminal: answers equal HF + PyTorch greedy generation over
the chat-templated history, `/reset` starts afresh, `/exit` and Ctrl-D end with status 0, Ctrl-C
stops an answer (compiled or eager decode) and the REPL goes on."""
from __future__ import annotations

import os
import pty
import re
import select
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_hf_llama

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = "user assistant system : red blue green A list of colors Portugal is".split()
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def save_chat_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose vocabulary covers its own chat template's words."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["<pad>", "<s>", "</s>", "<unk>", *WORDS]
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A tiny Llama that never emits `</s>` (its head row is zero), so answers run to
    `--max-new-tokens`, with the word-level chat tokenizer. Returns `(torch_model, tokenizer, path)`."""
    from transformers import AutoTokenizer

    torch_model, path = make_hf_llama(tmp_path_factory.mktemp("chat"), max_position_embeddings=4096)
    with torch.no_grad():
        torch_model.lm_head.weight[2] = 0.0
    torch_model.save_pretrained(path)
    save_chat_tokenizer(Path(path), torch_model.config.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return torch_model, tokenizer, path


def greedy_reply(chat_dir, messages: list[dict], max_new_tokens: int) -> str:
    torch_model, tokenizer, _ = chat_dir
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = torch_model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class Terminal:
    """`python -m msfx ARGS` on the slave side of a pseudo-terminal (its controlling terminal, so
    Ctrl-C typed on the master side reaches it as SIGINT)."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TERM": "dumb", "GLOG_v": "3"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once (the parent has threads)
            os.execve(sys.executable, [sys.executable, "-m", "msfx", *args], env)
        self.seen = self.transcript = ""

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """Read until `pattern` (a regex) matches what arrived since the last match; consume up to it."""
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.seen)) is None:
            if not select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise AssertionError(f"timed out waiting for {pattern!r}; got:\n{self.seen}")
            try:
                chunk = os.read(self.fd, 65536).decode(errors="replace")
            except OSError:  # the child closed the terminal
                raise AssertionError(f"ended before {pattern!r}; got:\n{self.seen}")
            self.seen += chunk
            self.transcript += chunk
        before, self.seen = self.seen[:match.start()], self.seen[match.end():]
        self.before = before
        return match

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def ask(self, line: str) -> str:
        """Type `line` and Enter; the answer printed before the next prompt."""
        self.send(line + "\r")
        self.expect(re.escape(line) + r"\r\n")  # the terminal's echo
        self.expect(r"\r\n>>> ")
        return self.before

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        raise AssertionError("the REPL did not exit")


def test_chat_answers_reset_and_exit(chat_dir):
    _, _, path = chat_dir
    term = Terminal("chat", "--model", str(path), "--max-new-tokens", "6")
    term.expect(">>> ")
    first = term.ask("red blue")
    history = [{"role": "user", "content": "red blue"}]
    expected = greedy_reply(chat_dir, history, 6)
    assert first.split() == expected.split() and len(expected.split()) > 1
    history += [{"role": "assistant", "content": expected}, {"role": "user", "content": "Portugal is"}]
    second = term.ask("Portugal is")
    assert second.split() == greedy_reply(chat_dir, history, 6).split()
    assert "(history cleared)" in term.ask("/reset")
    fresh = term.ask("Portugal is")
    assert fresh.split() == greedy_reply(chat_dir, [{"role": "user", "content": "Portugal is"}], 6).split()
    assert fresh.split() != second.split()  # the history did change the second answer
    term.send("/exit\r")
    assert term.wait() == 0


@pytest.mark.parametrize("eager", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["compiled", "eager"])
def test_ctrl_c_stops_the_answer_not_the_repl(chat_dir, eager):
    _, _, path = chat_dir
    term = Terminal("chat", "--model", str(path), "--max-new-tokens", "3000", *(["--eager"] if eager else []))
    term.expect(">>> ")
    term.send("red blue\r")
    term.expect(r"red blue\r\n")
    term.expect(r"\S+ \S+ \S+ ")  # the answer is streaming
    term.send("\x03")
    term.expect(r"\(stopped\)")
    term.expect(">>> ")
    answer = term.transcript.split("red blue\r\n")[1].split("(stopped)")[0]
    assert 3 <= len(answer.split()) < 2500, answer
    # the REPL goes on: Ctrl-C at the prompt clears the line, Ctrl-D ends it with status 0. (A SIGINT
    # between readline printing the prompt and waiting for input is seen only at the next key.)
    time.sleep(0.5)
    term.send("\x03")
    term.expect(r"/exit or Ctrl-D")
    term.expect(">>> ")
    term.send("\x04")
    assert term.wait() == 0


def test_a_tokenizer_without_chat_template_is_one_line(tmp_path, capsys):
    from msfx.cli import main
    from test_params import save_tiny_tokenizer

    _, path = make_hf_llama(tmp_path)
    save_tiny_tokenizer(Path(path))
    assert main(["chat", "--model", str(path), "--eager"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("msfx chat: error: the tokenizer of") and "has no chat_template" in err
