"""`text-generation`: HF's `TextGenerationPipeline` (`transformers/pipelines/text_generation.py`) over msfx
causal LMs."""
from __future__ import annotations

import enum

import numpy as np
from transformers import GenerationConfig
from transformers.utils.chat_template_utils import Chat, is_valid_message

from msfx.pipelines.base import Pipeline


class ReturnType(enum.Enum):
    TENSORS = 0
    NEW_TEXT = 1
    FULL_TEXT = 2


def as_chats(inputs):
    """HF's chat detection: a message list is one `Chat`, a list of message lists a list of them."""
    if isinstance(inputs, (list, tuple)) and inputs:
        if is_valid_message(inputs[0]):
            return Chat(inputs)
        if isinstance(inputs[0], (list, tuple)) and all(chat and is_valid_message(chat[0]) for chat in inputs):
            return [Chat(chat) for chat in inputs]
    return inputs


class TextGenerationPipeline(Pipeline):
    """Continue prompts (strings) or chats (lists of `{"role", "content"}` dicts) with `model.generate`.

    Returns HF's records: `[{"generated_text": str}]` per prompt (a list of them for a list of prompts;
    for a chat, the message list with the assistant's reply appended), or `generated_token_ids` with
    `return_tensors=True`. Unless the checkpoint's generation config sets them, HF's defaults apply:
    256 new tokens, `do_sample=True`, `temperature=0.7`. Batches (`batch_size`) are left-padded.
    """

    calls_generate = True
    default_generation_config = GenerationConfig(max_new_tokens=256, do_sample=True, temperature=0.7)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tokenizer is not None and self.tokenizer.padding_side == "right":
            self.tokenizer.padding_side = "left"  # decoder-only batches need left padding, as HF sets it
        prefix = getattr(self.model.config, "prefix", None)
        if "prefix" not in self._preprocess_params and prefix is not None:
            pre, forward, _ = self._sanitize_parameters(prefix=prefix, **self._forward_params)
            self._preprocess_params = {**self._preprocess_params, **pre}
            self._forward_params = {**self._forward_params, **forward}

    def _as_inputs(self, inputs):
        return as_chats(inputs)

    def _sanitize_parameters(self, return_full_text=None, return_tensors=None, return_text=None, return_type=None,
                             clean_up_tokenization_spaces=None, prefix=None, stop_sequence=None, truncation=None,
                             max_length=None, continue_final_message=None, skip_special_tokens=None,
                             tokenizer_encode_kwargs=None, tools=None, documents=None, handle_long_generation=None,
                             **generate_kwargs):
        if handle_long_generation is not None:
            raise NotImplementedError("msfx's text-generation pipeline does not support handle_long_generation "
                                      "(truncate the prompt yourself, or pass truncation=True with max_length)")
        preprocess = {}
        add_special_tokens = False
        if "add_special_tokens" in generate_kwargs:
            add_special_tokens = preprocess["add_special_tokens"] = generate_kwargs.pop("add_special_tokens")
        if "padding" in generate_kwargs:
            preprocess["padding"] = generate_kwargs.pop("padding")
        for name, value in (("truncation", truncation), ("max_length", max_length), ("tools", tools),
                            ("documents", documents), ("prefix", prefix),
                            ("continue_final_message", continue_final_message),
                            ("tokenizer_encode_kwargs", tokenizer_encode_kwargs)):
            if value is not None:
                preprocess[name] = value
        if max_length is not None:
            generate_kwargs["max_length"] = max_length
        if prefix:
            ids = self.tokenizer(prefix, padding=False, add_special_tokens=add_special_tokens)["input_ids"]
            generate_kwargs["prefix_length"] = len(ids)
        if stop_sequence is not None:
            generate_kwargs["stop_strings"] = [stop_sequence] if isinstance(stop_sequence, str) else stop_sequence
            generate_kwargs["tokenizer"] = self.tokenizer
        postprocess = {}
        if return_full_text is not None and return_type is None:
            if return_text is not None:
                raise ValueError("`return_text` is mutually exclusive with `return_full_text`")
            if return_tensors is not None:
                raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
            return_type = ReturnType.FULL_TEXT if return_full_text else ReturnType.NEW_TEXT
        if return_tensors is not None and return_type is None:
            if return_text is not None:
                raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
            return_type = ReturnType.TENSORS
        for name, value in (("return_type", return_type), ("continue_final_message", continue_final_message),
                            ("clean_up_tokenization_spaces", clean_up_tokenization_spaces),
                            ("skip_special_tokens", skip_special_tokens)):
            if value is not None:
                postprocess[name] = value
        return preprocess, generate_kwargs, postprocess

    def preprocess(self, prompt_text, prefix="", add_special_tokens=None, truncation=None, padding=None,
                   max_length=None, continue_final_message=None, tokenizer_encode_kwargs=None, tools=None,
                   documents=None) -> dict:
        kwargs = {k: v for k, v in dict(add_special_tokens=add_special_tokens, truncation=truncation, padding=padding,
                                        max_length=max_length).items() if v is not None}
        kwargs.update(tokenizer_encode_kwargs or {})
        if isinstance(prompt_text, Chat):
            kwargs.pop("add_special_tokens", None)
            if continue_final_message is None:
                continue_final_message = prompt_text.messages[-1]["role"] == "assistant"
            inputs = self.tokenizer.apply_chat_template(
                prompt_text.messages, add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message, return_dict=True, return_tensors="np", tools=tools,
                documents=documents, **kwargs)
        elif isinstance(prompt_text, str):
            inputs = self.tokenizer(prefix + prompt_text, return_tensors="np", **kwargs)
        else:
            raise ValueError(f"text-generation takes a string, a list of strings or chat messages (dicts with "
                             f"'role' and 'content'), got {type(prompt_text).__name__}")
        inputs = {k: np.asarray(v) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        inputs["prompt_text"] = prompt_text
        return inputs

    def _forward(self, model_inputs: dict, **generate_kwargs) -> dict:
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs.get("attention_mask")
        if input_ids.shape[1] == 0:
            raise ValueError("text-generation got an empty prompt; msfx's generate needs at least one token")
        in_b = input_ids.shape[0]
        prefix_length = generate_kwargs.pop("prefix_length", 0)
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        if prefix_length:  # a total length (as opposed to a number of new tokens) includes the prefix
            params = self._set_generation_params(generate_kwargs)
            for length, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
                if length in params and new_tokens not in params:
                    generate_kwargs[length] = params[length] + prefix_length
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        sequences = output if isinstance(output, np.ndarray) else output.sequences
        out_b = sequences.shape[0]
        return {"generated_sequence": sequences.reshape(in_b, out_b // in_b, *sequences.shape[1:]),
                "input_ids": input_ids, "prompt_text": model_inputs["prompt_text"]}

    def postprocess(self, model_outputs: dict, return_type=ReturnType.FULL_TEXT, clean_up_tokenization_spaces=None,
                    continue_final_message=None, skip_special_tokens=None) -> list[dict]:
        prompt_text, prompt_length = model_outputs["prompt_text"], model_outputs["input_ids"].shape[-1]
        skip = True if skip_special_tokens is None else skip_special_tokens
        records = []
        for sequence in model_outputs["generated_sequence"][0].tolist():
            if return_type == ReturnType.TENSORS:
                records.append({"generated_token_ids": sequence})
                continue
            text = self.tokenizer.decode(sequence[prompt_length:], skip_special_tokens=skip,
                                         clean_up_tokenization_spaces=clean_up_tokenization_spaces)
            if return_type == ReturnType.FULL_TEXT:
                text = self._full_text(prompt_text, text, continue_final_message)
            records.append({"generated_text": text})
        return records

    @staticmethod
    def _full_text(prompt_text, text: str, continue_final_message):
        """The prompt followed by `text`: a string, or the chat with the reply appended (HF's rules)."""
        if isinstance(prompt_text, str):
            return prompt_text + text
        messages = list(prompt_text.messages)
        if continue_final_message is None:
            continue_final_message = messages[-1]["role"] == "assistant"
        if continue_final_message:
            return messages[:-1] + [{"role": messages[-1]["role"], "content": messages[-1]["content"] + text}]
        return messages + [{"role": "assistant", "content": text}]
