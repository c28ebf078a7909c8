"""`msfx chat`: an interactive REPL over a causal LM. The history is a list of chat messages
rendered with the tokenizer's chat template each turn; answers stream; `/reset` clears the
history, `/exit` or end of input (Ctrl-D) quits, Ctrl-C stops the current answer."""
from __future__ import annotations

import importlib
import signal
import sys

import numpy as np

PROMPT = ">>> "
HELP = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops an answer"


class CtrlC:
    """A stopping criterion that turns true once Ctrl-C is pressed inside its `with` block, so the
    answer ends after the current decode step and the REPL goes on.

    MindSpore 2.10 swaps in its own SIGINT handler while it runs compiled graphs (and its worker
    threads leave one installed afterwards); that handler answers Ctrl-C by sending the process
    SIGTERM (seen with strace: `kill(pid, SIGTERM)` from the handler's thread), which ended
    `msfx generate` with status 143. So inside the block SIGTERM stops the answer too."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.pressed = False
        self._previous = {}

    def __enter__(self) -> "CtrlC":
        self.pressed = False
        self._previous = {s: signal.signal(s, self._press) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _press(self, signum, frame) -> None:
        self.pressed = True

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> bool:
        return self.pressed


class Chat:
    """One conversation: `messages` (`{"role", "content"}` dicts) and the generation keywords of
    every answer (`max_new_tokens`, `do_sample`, `jit`, ...: `msfx.cli.generation_kwargs`).

    Raises:
        ValueError: the tokenizer has no chat template.
    """

    def __init__(self, model, tokenizer, generation: dict):
        if not tokenizer.chat_template:
            raise ValueError(f"the tokenizer of '{tokenizer.name_or_path}' has no chat_template; "
                             "msfx chat needs an instruct (chat) checkpoint")
        self.model, self.tokenizer, self.generation = model, tokenizer, generation
        self.messages: list[dict] = []
        self.interrupted = False

    def reset(self) -> None:
        self.messages = []

    def answer(self, text: str) -> str:
        """The model's reply to `text` after the history, streamed to stdout as it is decoded. The
        reply (or, after Ctrl-C, the part shown) joins the history with the user's message."""
        from transformers import TextStreamer

        self.interrupted = False
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with CtrlC() as ctrl_c:
            out = self.model.generate(input_ids=np.asarray([ids], np.int64), streamer=streamer,
                                      stopping_criteria=[ctrl_c], **self.generation)
        self.interrupted = ctrl_c.pressed
        reply = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        return reply


def repl(model, tokenizer, generation: dict) -> int:
    """Read lines from stdin until `/exit` or end of input; returns the exit status (0).

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    try:  # importing readline gives input() line editing and history on a terminal
        importlib.import_module("readline")
    except ImportError:
        pass
    chat = Chat(model, tokenizer, generation)
    print(f"msfx chat: {HELP}", file=sys.stderr, flush=True)
    while True:
        # a compiled graph may have left MindSpore's handler in place: Ctrl-C at the prompt clears the line
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            line = input(PROMPT).strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print(f"\n({HELP})", file=sys.stderr, flush=True)
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            chat.reset()
            print("(history cleared)", flush=True)
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}: {HELP}", file=sys.stderr, flush=True)
        elif line:
            try:
                chat.answer(line)
            except ValueError as e:  # e.g. the history outgrew the context: the turn is dropped
                print(f"msfx chat: error: {e} (/reset clears the history)", file=sys.stderr, flush=True)
            if chat.interrupted:
                print("(stopped)", file=sys.stderr, flush=True)
