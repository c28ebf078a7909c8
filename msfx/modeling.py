"""Thin `nn.Cell` wrappers with HF's class names and methods over the functional cores.

A wrapper owns MindSpore `Parameter`s named exactly like the HF checkpoint keys (so
`trainable_params()` feeds a native training loop) and a parameter tree over those same
objects; every call goes to the architecture module's pure functions.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from msfx.decode.generate import GenerationStats, decode_loop
from msfx.decode.processors import build_logits_processors
from msfx.decode.sampling import make_rng
from msfx.decode.step import CompiledStep
from msfx.layers.basic import check_token_ids, lacks_bf16_kernels
from msfx.params import Params, flatten, load_params, save_params, unflatten
from msfx.params.hub import resolve_model_dir

logger = logging.getLogger(__name__)


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: Tensor | None = None
    cache: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)`'s result (HF's `GenerateDecoderOnlyOutput`, numpy).

    `sequences`: int64 `[batch, seq + new_tokens]`; `scores` (with `output_scores=True`) and
    `logits` (with `output_logits=True`): one float32 `[batch, vocab]` array per generated step,
    the processed scores the token was picked from and the raw logits; None when not requested.
    """

    sequences: np.ndarray | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Any = None


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """HF's `ForCausalLMLoss`: mean cross-entropy of `logits[:, :-1]` against `labels[:, 1:]` in
    float32, positions labelled `ignore_index` left out. logits `[b, s, v]`, labels `[b, s]`."""
    logits = logits[:, :-1].astype(ms.float32)
    labels = labels[:, 1:].astype(ms.int32)
    return masked_cross_entropy(logits, labels, ignore_index)


def masked_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over positions whose label is not `ignore_index`."""
    valid = labels != ignore_index
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    logp = ops.log_softmax(logits.astype(ms.float32), -1)
    picked = ops.gather_elements(logp, -1, safe.expand_dims(-1)).squeeze(-1)
    valid = valid.astype(ms.float32)
    return -(picked * valid).sum() / valid.sum()


def _dtype_from_torch_spelling(dtype):
    """`torch_dtype=` values (`torch.float16` or a string) as msfx's `dtype` strings."""
    return str(dtype).removeprefix("torch.")


class PreTrainedModel(nn.Cell):
    """Base of the HF-named wrappers: parameters, `from_pretrained`, `save_pretrained`.

    Subclasses set `arch` (the architecture module) and may override `param_shapes` (the keys
    this head owns) and `base_model_prefix` handling.
    """

    arch: ModuleType
    base_model_prefix = "model"

    def __init__(self, config, params: dict | None = None):
        super().__init__(auto_prefix=False)
        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)
        if params is None:
            params = self.init_params(config)
        leaves, self._param_keys = flatten(dict(params))
        self.weights = ParameterTuple([Parameter(t, name=k) for t, k in zip(leaves, self._param_keys)])
        self.params = Params(unflatten(list(self.weights), self._param_keys), config)
        self._steps: dict[bool, CompiledStep] = {}
        self.last_generation_stats = GenerationStats()

    @classmethod
    def param_shapes(cls, config) -> dict[str, tuple]:
        return cls.arch.param_shapes(config)

    @classmethod
    def init_params(cls, config, seed: int = 0) -> Params:
        """Random parameters for this class's keys (see the architecture's `init_params`)."""
        return cls.arch.init_params(config, seed, shapes=cls.param_shapes(config))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, config=None, dtype="auto",
                        revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                        token=None, gguf_file: str | None = None, **config_kwargs) -> "PreTrainedModel":
        """Load HF weights from a local directory, a hub id or a GGUF file (`gguf_file=`).

        `dtype` is "auto" (as stored; float32 for GGUF), "float32", "float16" or "bfloat16".
        Extra keyword arguments override config attributes (e.g. `num_labels=3`), as in HF.

        Raises:
            ModelNotFoundError, CheckpointError, CorruptCheckpointError, ValueError: see
            `msfx.params.load_params`.
        """
        if "torch_dtype" in config_kwargs:  # HF's older spelling
            dtype = _dtype_from_torch_spelling(config_kwargs.pop("torch_dtype"))
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        if gguf_file is None:  # resolved once: the generation config is read from the same directory
            pretrained_model_name_or_path = resolve_model_dir(pretrained_model_name_or_path, **hub)
        params = load_params(cls.arch, pretrained_model_name_or_path, dtype=dtype, config=config, gguf_file=gguf_file,
                             shapes=cls.param_shapes, prefix=cls.base_model_prefix, config_kwargs=config_kwargs, **hub)
        model = cls(params.config, params)
        source = Path(pretrained_model_name_or_path)
        if gguf_file is None and (source / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(source)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write `config.json`, `generation_config.json` and safetensors weights (sharded with an
        index above `max_shard_size`) that HF PyTorch `from_pretrained` loads directly."""
        save_params(self.state_tree(), self.config, save_directory, max_shard_size)
        self.generation_config.save_pretrained(save_directory)

    def state_tree(self) -> dict:
        """The parameter tree keyed as this class's HF checkpoint."""
        return dict(self.params)

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.weights)

    @property
    def dtype(self):
        return self.weights[0].dtype

    def _compiled_step(self, jit: bool) -> CompiledStep:
        if jit not in self._steps:
            self._steps[jit] = CompiledStep(self.arch, self.params, self.config, jit=jit)
        return self._steps[jit]


# keyword arguments `generate` accepts besides GenerationConfig fields (HF's model kwargs)
_MODEL_KWARGS = {"use_cache", "output_attentions", "output_hidden_states", "return_dict"}


class GenerationMixin:
    """HF-style `generate` for decoder-only wrappers (greedy search or sampling over the KV cache)."""

    def generate(self, input_ids=None, attention_mask=None, generation_config: GenerationConfig | None = None,
                 streamer=None, jit: bool = True, *, logits_processor=None, stopping_criteria=None,
                 seed: int | None = None, **kwargs) -> np.ndarray | GenerateDecoderOnlyOutput:
        """Greedy or multinomial-sampling generation with HF's argument names.

        Args:
            input_ids: `[batch, seq]` token ids (left-pad batches); a MindSpore tensor or array.
            attention_mask: `[batch, seq]` 1/0; default: 0 where `input_ids == pad_token_id`
                (when pad differs from eos), else all ones, as HF infers it.
            generation_config: defaults to the checkpoint's `generation_config.json`; keyword
                arguments override it and unset values fall back to the checkpoint's, then to
                HF's global defaults (e.g. `top_k=50`, 20 new tokens), as in HF. Supported:
                `max_new_tokens`, `max_length`, `min_new_tokens`, `min_length`, `max_time`,
                `eos_token_id`, `pad_token_id`, `do_sample`, `temperature`, `top_k`, `top_p`,
                `min_p`, `typical_p`, `epsilon_cutoff`, `eta_cutoff`, `repetition_penalty`,
                `no_repeat_ngram_size`, `bad_words_ids`, `sequence_bias`, `suppress_tokens`,
                `begin_suppress_tokens`, `forced_bos_token_id`, `forced_eos_token_id`,
                `remove_invalid_values`, `renormalize_logits`, `use_cache`,
                `return_dict_in_generate` with `output_scores` / `output_logits`, ...
            streamer: an object with `put` / `end`, e.g. `transformers.TextStreamer`.
            jit: compile the decode step with `mindspore.jit` (False: eager); the prompt
                always runs eagerly, and so does everything for bfloat16 on CPU.
            logits_processor: numpy callables `(input_ids [batch, cur_len], scores [batch, vocab])
                -> scores` (e.g. `msfx.decode.processors` classes), merged with the built-in
                ones as HF merges its `logits_processor=` (HF's torch processors do not apply).
            stopping_criteria: callables `(input_ids, scores) -> bool or bool [batch]` on numpy
                arrays (`scores`: this step's processed scores, where HF passes its tuple of
                scores or None); a row stops once one returns True for it.
            seed: the sampling seed (msfx's addition); default: MindSpore's global seed
                (`mindspore.set_seed`), else fresh entropy. A seed reproduces the same samples.

        Returns:
            int64 numpy `[batch, seq + new_tokens]`: the prompt followed by the generated
            tokens. (HF returns a torch LongTensor; `transformers` tokenizers decode numpy
            arrays but not MindSpore tensors, so `tokenizer.batch_decode(ids)` works as in HF.)
            With `return_dict_in_generate=True`: a `GenerateDecoderOnlyOutput` holding those
            `sequences`, and per-step `scores` / `logits` tuples if `output_scores` /
            `output_logits` (else None).

        Raises:
            ValueError: out-of-range token ids, a total length beyond `max_position_embeddings`,
                or an invalid processor argument (as HF raises it).
            NotImplementedError: beam search (`num_beams > 1`), or an option whose logits
                processor msfx lacks (`top_h`, `guidance_scale`, `stop_strings`, ...), or
                `output_attentions` / `output_hidden_states` with `return_dict_in_generate`.
        """
        base = self.generation_config if generation_config is None else generation_config
        merged = base.to_dict()
        if generation_config is not None:  # unset values fall back to the checkpoint's, then to HF's defaults
            merged.update({k: v for k, v in self.generation_config.to_dict().items() if merged.get(k) is None})
        default_max_length = kwargs.get("max_length") is None and merged.get("max_length") is None
        merged.update({k: v for k, v in GenerationConfig._get_default_generation_params().items()
                       if merged.get(k) is None})
        unused = sorted(set(kwargs) - set(merged) - _MODEL_KWARGS)
        if unused:
            raise ValueError(f"The following `model_kwargs` are not used by the model: {unused} "
                             "(note: typos in the generate arguments will also show up in this list)")
        config = GenerationConfig.from_dict({**merged, **kwargs})
        if (config.num_beams or 1) > 1:
            raise NotImplementedError("msfx generate does not do beam search yet (num_beams=1 only)")
        as_dict = bool(config.return_dict_in_generate)
        if as_dict and (config.output_attentions or config.output_hidden_states):
            raise NotImplementedError("msfx generate does not return attentions or hidden states yet "
                                      "(return_dict_in_generate supports output_scores and output_logits)")
        ids = check_token_ids(input_ids, self.config.vocab_size)
        eos = config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
        if attention_mask is None:
            infer = pad is not None and pad not in eos and (ids == pad).any()
            mask = (ids != pad).astype(np.int32) if infer else np.ones_like(ids, np.int32)
            if pad is not None and pad in eos and ids.shape[0] > 1 and (ids == pad).any():
                logger.warning("The attention mask is not set and cannot be inferred from input because pad token "
                               "is same as eos token. Pass `attention_mask` to obtain reliable results.")
        else:
            mask = (attention_mask.asnumpy() if isinstance(attention_mask, Tensor) else np.asarray(attention_mask))
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {list(mask.shape)}; input_ids has {list(ids.shape)}")
            mask = mask.astype(np.int32)
        if pad is not None and ids.shape[0] > 1 and (ids[:, -1] == pad).any():
            logger.warning("A decoder-only architecture is being used, but right-padding was detected! For correct "
                           "generation results, please set `padding_side='left'` when initializing the tokenizer.")
        limit = self.config.max_position_embeddings
        if config.max_new_tokens is not None:
            max_new = config.max_new_tokens
        elif default_max_length:  # HF: 20 new tokens by default, within max_position_embeddings
            max_new = min(config.max_length + ids.shape[1], limit) - ids.shape[1]
        else:
            max_new = config.max_length - ids.shape[1]
        if max_new <= 0 and config.max_new_tokens is None:
            raise ValueError(f"Input length of input_ids is {ids.shape[1]}, but `max_length` is set to "
                             f"{config.max_length}: increase `max_length` or set `max_new_tokens`")
        if ids.shape[1] + max_new > limit:
            raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                             f"max_position_embeddings ({limit})")
        # HF's prepared lengths (`_prepare_generated_length`): absolute, prompt included
        config.max_length = ids.shape[1] + max_new
        if config.min_new_tokens is not None:
            config.min_length = config.min_new_tokens + ids.shape[1]
        processors = build_logits_processors(config, ids.shape[1], logits_processor, attention_mask=mask)
        scores = [] if as_dict and config.output_scores else None
        logits = [] if as_dict and config.output_logits else None
        if max_new <= 0:
            sequences = ids.astype(np.int64)
        else:
            self.last_generation_stats = GenerationStats()
            # MindSpore 2.10's CPU graph compiler has no bfloat16 kernels at all (not even Reshape)
            jit = jit and not lacks_bf16_kernels(self.weights[0])
            sequences = decode_loop(self.config, self._compiled_step(False), self._compiled_step(jit), ids,
                                    mask, max_new, eos, pad, streamer, self.last_generation_stats,
                                    logits_processor=processors, do_sample=bool(config.do_sample),
                                    rng=make_rng(seed) if config.do_sample else None,
                                    stopping_criteria=stopping_criteria, max_time=config.max_time,
                                    scores_out=scores, logits_out=logits)
        if not as_dict:
            return sequences
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=None if scores is None else tuple(scores),
                                         logits=None if logits is None else tuple(logits))
