"""The pipeline machinery HF's `transformers.pipelines.base.Pipeline` provides, over msfx models.

A task class defines HF's four steps: `_sanitize_parameters(**kwargs) -> (preprocess, forward,
postprocess kwargs)`, `preprocess(item) -> dict of numpy arrays`, `_forward(batch) -> dict` and
`postprocess(one_row) -> result`. `__call__` runs them as HF's: a list runs in batches of
`batch_size` (items padded as HF's `pad_collate_fn`) and gives a list; anything else gives one result.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
from mindspore import Tensor
from transformers import GenerationConfig

# HF's `_prepare_generate_kwargs`: pipeline defaults for these apply only when sampling
_SAMPLING_PARAMS = {"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"}


def to_numpy(value):
    """A MindSpore tensor as numpy; anything else unchanged."""
    return value.asnumpy() if isinstance(value, Tensor) else value


def _pad(items: list[dict], key: str, value: int, side: str):
    """HF's `_pad`: stack one key of the batch's items, 2-d token arrays padded to the longest."""
    arrays = [item[key] for item in items]
    if not isinstance(arrays[0], np.ndarray):
        return arrays
    if arrays[0].ndim == 1 or key in ("pixel_values", "image") or len({a.shape[1] for a in arrays}) == 1:
        return np.concatenate(arrays)
    longest = max(a.shape[1] for a in arrays)
    out = np.full((len(arrays), longest, *arrays[0].shape[2:]), value, dtype=arrays[0].dtype)
    for row, a in enumerate(arrays):
        if side == "left":
            out[row, longest - a.shape[1]:] = a[0]
        else:
            out[row, :a.shape[1]] = a[0]
    return out


def _row(outputs: dict, index: int) -> dict:
    """HF's `PipelineIterator.loader_batch_item`: row `index` of a batch's outputs, keeping a batch axis."""
    return {k: (v[index:index + 1] if isinstance(v, np.ndarray) else None if v is None else v[index])
            for k, v in outputs.items()}


class Pipeline:
    """Base of msfx's task pipelines (HF's `Pipeline` without devices, data loaders or torch).

    Args:
        model: an msfx model instance.
        tokenizer: a transformers tokenizer (or None for a task without text).
        image_processor: a transformers image processor (image tasks).
        batch_size: default batch size for list inputs (1).
        task: the task name the pipeline was built for.
        **kwargs: the task's call arguments, used as defaults for every call.
    """

    calls_generate = False
    needs_tokenizer = True  # `msfx.pipeline` loads the checkpoint's tokenizer for the task
    default_generation_config: GenerationConfig | None = None

    def __init__(self, model, tokenizer=None, image_processor=None, batch_size: int | None = None,
                 task: str | None = None, **kwargs):
        self.model, self.tokenizer, self.image_processor, self.task = model, tokenizer, image_processor, task
        self._batch_size = batch_size
        if self.calls_generate:
            if not callable(getattr(model, "generate", None)):
                raise ValueError(f"{task} needs a model that generates; {type(model).__name__} has no `generate` "
                                 "(load a causal LM / seq2seq class, e.g. with msfx.AutoModelForCausalLM)")
            self._split_generation_kwargs(kwargs)
        self._preprocess_params, self._forward_params, self._postprocess_params = self._sanitize_parameters(**kwargs)

    # --------------------------------------------------------------- generation defaults (HF's base)

    def _split_generation_kwargs(self, kwargs: dict) -> None:
        """HF's `Pipeline.__init__`: generation parameters given at construction apply to every call."""
        keys = {key for key in vars(GenerationConfig()) if not key.startswith("_")} | {"generation_config"}
        self._generate_kwargs = {key: kwargs.pop(key) for key in keys & kwargs.keys()}
        defaults = self.default_generation_config
        self._generation_defaults = {} if defaults is None else defaults.to_diff_dict()
        self._generation_defaults.pop("transformers_version", None)
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            self._generation_defaults["pad_token_id"] = self.tokenizer.pad_token_id

    def _set_generation_params(self, generate_kwargs: dict) -> dict:
        """HF's `_get_set_generation_params`: what the call sets on top of the model's generation config."""
        params = self.model.generation_config.to_diff_dict()
        if (config := generate_kwargs.get("generation_config")) is not None:
            params.update(config.to_diff_dict())
        return {**params, **generate_kwargs}

    def _prepare_generate_kwargs(self, generate_kwargs: dict) -> dict:
        """HF's `_prepare_generate_kwargs`: the call's generation kwargs over those given at
        construction, plus the pipeline defaults (e.g. 256 new tokens) the user and checkpoint left unset."""
        if "generation_config" not in generate_kwargs:
            generate_kwargs = {**self._generate_kwargs, **generate_kwargs}
        set_params = self._set_generation_params(generate_kwargs)
        added = {k: v for k, v in self._generation_defaults.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in _SAMPLING_PARAMS}
        if (user_config := generate_kwargs.get("generation_config")) is None:
            return {**generate_kwargs, **added}
        user_config = copy.deepcopy(user_config)
        user_config.update(**added)
        return {**generate_kwargs, "generation_config": user_config}

    # --------------------------------------------------------------- running

    def _sanitize_parameters(self, **kwargs) -> tuple[dict, dict, dict]:
        raise NotImplementedError

    def _model_inputs(self, batch: dict) -> dict:
        """The entries of `batch` the model's forward takes (a tokenizer's `token_type_ids` are dropped
        for a model without them, which HF's torch models swallow in `**kwargs`)."""
        accepted = inspect.signature(self.model.construct).parameters
        return {k: v for k, v in batch.items() if k in accepted}

    def _collate(self, items: list[dict]) -> dict:
        """HF's `pad_collate_fn`: token arrays padded on the tokenizer's side with its pad id (masks with 0)."""
        keys = set(items[0])
        if any(set(item) != keys for item in items):
            raise ValueError("The elements of the batch contain different keys; cannot batch them")
        tokenizer = self.tokenizer
        if tokenizer is not None and tokenizer.pad_token_id is None:
            raise ValueError("Pipeline with tokenizer without pad_token cannot do batching. You can try to set it "
                             "with `pipe.tokenizer.pad_token_id = model.config.eos_token_id`.")
        side = tokenizer.padding_side if tokenizer is not None else "right"
        pad_values = {"input_ids": tokenizer.pad_token_id if tokenizer is not None else 0,
                      "p_mask": 1, "special_tokens_mask": 1}
        return {key: _pad(items, key, pad_values.get(key, 0), side) for key in keys}

    def _run(self, items: list, batch_size: int, preprocess: dict, forward: dict, postprocess: dict) -> list:
        results = []
        for start in range(0, len(items), batch_size):
            chunk = [self.preprocess(item, **preprocess) for item in items[start:start + batch_size]]
            outputs = self._forward(chunk[0] if len(chunk) == 1 else self._collate(chunk), **forward)
            rows = [outputs] if len(chunk) == 1 else [_row(outputs, i) for i in range(len(chunk))]
            results.extend(self.postprocess(row, **postprocess) for row in rows)
        return results

    def _as_inputs(self, inputs):
        """Hook for HF's input detection (text-generation turns message lists into chats)."""
        return inputs

    def __call__(self, inputs, *, batch_size: int | None = None, **kwargs):
        """Run the task on one input or a list of inputs (HF's `Pipeline.__call__`).

        Raises:
            ValueError: `batch_size` below 1, or batching with a tokenizer that has no pad token.
        """
        inputs = self._as_inputs(inputs)
        batch_size = batch_size or self._batch_size or 1
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        preprocess, forward, postprocess = self._sanitize_parameters(**kwargs)
        preprocess = {**self._preprocess_params, **preprocess}
        forward = {**self._forward_params, **forward}
        postprocess = {**self._postprocess_params, **postprocess}
        if isinstance(inputs, list):
            return self._run(inputs, batch_size, preprocess, forward, postprocess)
        return self._run([inputs], 1, preprocess, forward, postprocess)[0]
