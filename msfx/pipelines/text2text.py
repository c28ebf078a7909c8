"""`text2text-generation`, `summarization`, `translation_xx_to_yy` over msfx's T5.

transformers 5 removed these pipelines; this follows their last 4.x form
(`transformers/pipelines/text2text_generation.py`): the config's `task_specific_params[task]` give
the input prefix (e.g. "summarize: ") and generation defaults (T5's `num_beams=4`, `max_length=200`,
...), the outputs are `[{"generated_text" / "summary_text" / "translation_text": str}]`.
"""
from __future__ import annotations

import enum
import logging

import numpy as np
from transformers import GenerationConfig

from msfx.pipelines.base import Pipeline

logger = logging.getLogger(__name__)


class ReturnType(enum.Enum):
    TENSORS = 0
    TEXT = 1


class Text2TextGenerationPipeline(Pipeline):
    """Generate text from text with an encoder-decoder (`model.generate`); one record list per input
    (a list of strings gives one record per string when each has a single sequence)."""

    calls_generate = True
    default_generation_config = GenerationConfig(max_new_tokens=256, num_beams=4)
    return_name = "generated"

    def __init__(self, model, tokenizer=None, task: str = "text2text-generation", **kwargs):
        self.task = task
        self.prefix = getattr(model.config, "prefix", None)
        task_params = dict((getattr(model.config, "task_specific_params", None) or {}).get(task, {}))
        if "prefix" in task_params:
            self.prefix = task_params.pop("prefix")
        super().__init__(model, tokenizer=tokenizer, task=task, **kwargs)
        # HF 4.x updated the pipeline's generation config with the task's params: below the call's kwargs
        self._generate_kwargs = {**task_params, **self._generate_kwargs}

    def _sanitize_parameters(self, return_tensors=None, return_text=None, return_type=None,
                             clean_up_tokenization_spaces=None, truncation=None, stop_sequence=None,
                             **generate_kwargs):
        preprocess = {} if truncation is None else {"truncation": truncation}
        postprocess = {}
        if return_tensors is not None and return_type is None:
            return_type = ReturnType.TENSORS if return_tensors else ReturnType.TEXT
        if return_type is not None:
            postprocess["return_type"] = return_type
        if clean_up_tokenization_spaces is not None:
            postprocess["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        if stop_sequence is not None:
            stop_ids = self.tokenizer.encode(stop_sequence, add_special_tokens=False)
            if len(stop_ids) > 1:
                logger.warning("Stopping on a multiple token sequence is not yet supported; the first token of the "
                               "stop sequence is used")
            generate_kwargs["eos_token_id"] = stop_ids[0]
        return preprocess, generate_kwargs, postprocess

    def _tokenize(self, text, truncation) -> dict:
        if not isinstance(text, str):
            raise ValueError(f"{self.task} takes a string or a list of strings, got {type(text).__name__}")
        inputs = self.tokenizer((self.prefix or "") + text, padding=False, truncation=truncation, return_tensors="np")
        return {k: np.asarray(v) for k, v in inputs.items() if k != "token_type_ids"}

    def preprocess(self, inputs, truncation=False) -> dict:
        return self._tokenize(inputs, truncation)

    def _forward(self, model_inputs: dict, **generate_kwargs) -> dict:
        in_b = model_inputs["input_ids"].shape[0]
        output = self.model.generate(**model_inputs, **self._prepare_generate_kwargs(generate_kwargs))
        ids = output if isinstance(output, np.ndarray) else output.sequences
        return {"output_ids": ids.reshape(in_b, ids.shape[0] // in_b, *ids.shape[1:])}

    def postprocess(self, model_outputs: dict, return_type=ReturnType.TEXT, clean_up_tokenization_spaces=False):
        records = []
        for output_ids in model_outputs["output_ids"][0]:
            if return_type == ReturnType.TENSORS:
                records.append({f"{self.return_name}_token_ids": output_ids})
            else:
                text = self.tokenizer.decode(output_ids, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=clean_up_tokenization_spaces)
                records.append({f"{self.return_name}_text": text})
        return records

    def __call__(self, inputs, **kwargs):
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and all(isinstance(x, str) for x in inputs) and all(len(r) == 1 for r in result):
            return [r[0] for r in result]
        return result


class SummarizationPipeline(Text2TextGenerationPipeline):
    """`summarization`: `[{"summary_text": str}]`; T5 prefixes "summarize: " from its config."""

    return_name = "summary"


class TranslationPipeline(Text2TextGenerationPipeline):
    """`translation_xx_to_yy`: `[{"translation_text": str}]`; T5 prefixes e.g. "translate English to
    German: " from its config; `src_lang` / `tgt_lang` reach tokenizers with `_build_translation_inputs`."""

    return_name = "translation"

    def _sanitize_parameters(self, src_lang=None, tgt_lang=None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if src_lang is not None:
            preprocess["src_lang"] = src_lang
        if tgt_lang is not None:
            preprocess["tgt_lang"] = tgt_lang
        items = self.task.split("_")
        if src_lang is None and tgt_lang is None and len(items) == 4:  # translation, XX, to, YY
            preprocess.update(src_lang=items[1], tgt_lang=items[3])
        return preprocess, forward, postprocess

    def preprocess(self, inputs, truncation=False, src_lang=None, tgt_lang=None) -> dict:
        if getattr(self.tokenizer, "_build_translation_inputs", None):
            built = self.tokenizer._build_translation_inputs(inputs, return_tensors="np", truncation=truncation,
                                                             src_lang=src_lang, tgt_lang=tgt_lang)
            return {k: np.asarray(v) for k, v in built.items()}
        return self._tokenize(inputs, truncation)
