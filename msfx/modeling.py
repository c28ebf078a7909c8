"""Thin `nn.Cell` wrappers with HF's class names and methods over the functional cores.

A wrapper owns MindSpore `Parameter`s named exactly like the HF checkpoint keys (so
`trainable_params()` feeds a native training loop) and a parameter tree over those same
objects; every call goes to the architecture module's pure functions.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from msfx.decode.cache import KVCache
from msfx.decode.options import GenerationStats
from msfx.decode.step import CompiledStep
from msfx.layers.attention import arange
from msfx.inputs import check_token_ids
from msfx.jit import host_reads_allowed
from msfx.layers.losses import causal_lm_loss, masked_cross_entropy
from msfx.families import family
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
class MoeCausalLMOutputWithPast(ModelOutput):
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    logits: Tensor | None = None
    cache: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    router_logits: tuple | None = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Tensor | None = None
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def as_tensor(x, dtype=ms.int32) -> Tensor | None:
    """`x` (array, list or Tensor; None passes through) as a Tensor of `dtype`; `dtype=None` keeps
    an array's own (labels: int or float)."""
    if x is None or isinstance(x, Tensor):
        return x
    x = Tensor(np.asarray(x))
    return x if dtype is None else x.astype(dtype)


def token_ids(input_ids, vocab_size: int) -> Tensor | None:
    """`input_ids` checked (`check_token_ids`) as an int32 Tensor `[batch, seq]`; None passes through.
    Inside `no_host_reads()` a Tensor is only cast (the caller checked it)."""
    if input_ids is None:
        return None
    if isinstance(input_ids, Tensor) and not host_reads_allowed():
        return input_ids.astype(ms.int32)
    return Tensor(check_token_ids(input_ids, vocab_size).astype(np.int32))


def last_token_logits(logits: Tensor, input_ids, pad_token_id: int | None, vocab_size: int) -> Tensor:
    """HF's pooling for decoder `...ForSequenceClassification`: each row's logits `[batch, seq,
    labels]` at its rightmost non-padding token (left or right padding alike; the last position
    without `pad_token_id` or `input_ids`). Returns `[batch, labels]`.

    Raises:
        ValueError: a batch of more than one row without `pad_token_id` (as HF).
    """
    batch, seq = logits.shape[0], logits.shape[1]
    if pad_token_id is None and batch != 1:
        raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (config.pad_token_id).")
    if pad_token_id is not None and isinstance(input_ids, Tensor) and not host_reads_allowed():
        positions = arange(seq) * (input_ids != pad_token_id).astype(ms.int32)
        pooled = ops.gather_elements(logits.astype(ms.float32), 1, ops.broadcast_to(
            positions.argmax(-1).reshape(batch, 1, 1), (batch, 1, logits.shape[2]))).squeeze(1)
        return pooled.astype(logits.dtype)
    if pad_token_id is None or input_ids is None:
        last = np.full(batch, seq - 1)
    else:
        last = np.argmax(np.arange(seq) * (check_token_ids(input_ids, vocab_size) != pad_token_id), -1)
    # float32 for the pick: MindSpore's CPU backend has no bfloat16 Gather (exact either way)
    pooled = logits.astype(ms.float32)[Tensor(np.arange(batch), ms.int32), Tensor(last.astype(np.int32))]
    return pooled.astype(logits.dtype)


def lm_logits_and_loss(arch: ModuleType, params: dict, config, hidden: Tensor, labels,
                       logits_to_keep: int = 0, num_items_in_batch=None) -> tuple[Tensor, Tensor | None]:
    """A causal LM head's `logits` `[batch, kept, vocab]` from `hidden` `[batch, seq, hidden]` (the
    last `logits_to_keep` positions when > 0, HF's argument) via `arch.lm_head`, and with `labels`
    `[batch, seq]` HF's shifted cross-entropy (`causal_lm_loss`: summed over the valid tokens and
    divided by `num_items_in_batch` when given, as HF's Trainer passes it, else their mean), else None."""
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    logits = arch.lm_head(params, hidden, config)
    return logits, None if labels is None else causal_lm_loss(logits, as_tensor(labels), num_items_in_batch)


def sequence_classification_loss(logits: Tensor, labels: Tensor, config) -> Tensor:
    """The loss of HF's `*ForSequenceClassification` heads by `config.problem_type`, inferred as HF
    does when None ("regression" for `num_labels == 1`, else "single_label_classification" for
    integer labels, "multi_label_classification" for float ones): mean squared error, cross-entropy
    (`-100` ignored) or binary cross-entropy with logits, in float32.

    Shapes: logits `[batch, num_labels]`; labels `[batch]` (ints; floats for regression) or
    `[batch, num_labels]` (regression, multi-label floats).
    """
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (ms.int32, ms.int64):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    logits = logits.astype(ms.float32)
    if problem == "regression":
        target = labels.astype(ms.float32)
        return ops.mean((logits.squeeze() - target.squeeze()) ** 2) if config.num_labels == 1 \
            else ops.mean((logits - target) ** 2)
    if problem == "single_label_classification":
        return masked_cross_entropy(logits, labels.reshape(-1).astype(ms.int32))
    return ops.binary_cross_entropy_with_logits(logits, labels.astype(ms.float32),
                                                ops.ones_like(logits), ops.ones_like(logits))


def question_answering_loss(start_logits: Tensor, end_logits: Tensor, start_positions: Tensor,
                            end_positions: Tensor) -> Tensor:
    """HF's `ForQuestionAnsweringLoss`: the mean of the start and end cross-entropies (float32), with
    positions `[batch]` (or `[batch, 1]`) clamped to `[0, seq]` and those at `seq` (outside the
    input) ignored. Logits `[batch, seq]`."""
    seq = start_logits.shape[1]

    def one(logits, positions):
        positions = ops.clip(positions.reshape(-1).astype(ms.int32), 0, seq)
        return masked_cross_entropy(logits, positions, ignore_index=seq)

    return (one(start_logits, start_positions) + one(end_logits, end_positions)) / 2


def split_span_logits(logits: Tensor) -> tuple[Tensor, Tensor]:
    """A question-answering head's `[batch, seq, 2]` logits as `(start_logits, end_logits)`, each `[batch, seq]`."""
    return logits[..., 0], logits[..., 1]


# HF argument names (`TransformersKwargs`, cache, cross-attention, packing and older spellings) that a
# wrapper without them in its signature accepts only at HF's default, None or False: the HF Trainer
# and pipelines pass those. Any other value raises NotImplementedError; any other name, TypeError.
UNSUPPORTED_HF_ARGUMENTS = frozenset({
    "output_attentions", "output_hidden_states", "output_router_logits", "use_cache", "cache", "past_key_values",
    "cache_position", "inputs_embeds", "position_ids", "token_type_ids", "labels", "num_items_in_batch",
    "encoder_hidden_states", "encoder_attention_mask", "head_mask", "decoder_head_mask", "cross_attn_head_mask",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "is_causal"})

# wrapper methods with HF's arguments, checked by `hf_arguments` in every subclass that defines them
HF_METHODS = ("construct", "get_text_features", "get_image_features")


def hf_arguments(method):
    """`method` (a wrapper's `construct`, ...) strict about keyword arguments outside its signature,
    where HF's `**kwargs` swallows them silently (transformers 5.25 runs `LlamaForCausalLM(ids, foo=1)`).

    `past_key_values=` is renamed to `cache=` (HF 5.25's deprecated spelling) and `return_dict=None`
    means `config.return_dict`, as in HF.

    Raises:
        TypeError: a name neither in the signature nor in `UNSUPPORTED_HF_ARGUMENTS` (a typo), as Python does.
        NotImplementedError: a name in `UNSUPPORTED_HF_ARGUMENTS` with a value other than None or False
            (or, for `token_type_ids`, other than all zeros: a tokenizer's single-segment output).
        ValueError: both `cache` and `past_key_values` (as HF).
    """
    own = set(inspect.signature(method).parameters)

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        where = f"{type(self).__name__}.{method.__name__}()"
        if "past_key_values" in kwargs and "cache" in own:
            if kwargs.get("cache") is not None:
                raise ValueError(f"{where}: give one of cache and past_key_values (the same argument), not both")
            kwargs["cache"] = kwargs.pop("past_key_values")
        for name in [k for k in kwargs if k not in own]:
            value = kwargs.pop(name)
            if name not in UNSUPPORTED_HF_ARGUMENTS:
                raise TypeError(f"{where} got an unexpected keyword argument {name!r}")
            if value is None or value is False or (name == "token_type_ids" and not _any_nonzero(value)):
                continue  # all-zero token types (one segment) are what a model without them computes
            raise NotImplementedError(f"{where} does not support {name} in msfx (only its HF default, None or "
                                      f"False, is accepted); got {type(value).__name__} {value!r:.60}")
        if "return_dict" in kwargs and kwargs["return_dict"] is None:
            kwargs["return_dict"] = getattr(self.config, "return_dict", True)
        return method(self, *args, **kwargs)

    return checked


def _any_nonzero(value) -> bool:
    return bool(np.any(value.asnumpy() if isinstance(value, Tensor) else np.asarray(value)))


def _padded(buffer: Tensor, slots: int) -> Tensor:
    """`buffer` `[b, h, n, d]` with `slots` zero slots appended along axis 2."""
    zeros = ops.zeros((buffer.shape[0], buffer.shape[1], slots, buffer.shape[3]), buffer.dtype)
    return ops.concat((buffer, zeros), 2)  # MindSpore 2.10 has a bfloat16 CPU Concat (checked)


def past_cache(config, cache, use_cache, inputs) -> tuple[KVCache | None, Tensor | None, bool]:
    """HF's cache contract for a decoder wrapper: `(cache, cache_position, returns_cache)` for the core.

    A past `cache` (the `KVCache` a previous call returned, whose buffers `[batch, kv_heads, past,
    head_dim]` hold exactly the positions seen) is grown by the `seq` new tokens of `inputs`
    (`input_ids` `[batch, seq]` or `inputs_embeds`), written at `cache_position` `past..past+seq-1`,
    as HF's `DynamicCache` appends; the caller's `attention_mask` then covers `past + seq` keys. The
    call returns a cache when given one or with `use_cache` (None: `config.use_cache`, as HF).

    Raises:
        NotImplementedError: a cache other than an msfx `KVCache` (HF `Cache` objects, legacy tuples).
        ValueError: a cache whose layers differ in length (a preallocated `generate` cache) or batch.
    """
    if use_cache is None:
        use_cache = getattr(config, "use_cache", False)
    if cache is None:
        return None, None, bool(use_cache)
    if not isinstance(cache, KVCache):
        raise NotImplementedError(f"cache / past_key_values must be the msfx KVCache a previous call returned "
                                  f"(out.past_key_values), got {type(cache).__name__}")
    shape = np.shape(inputs)
    batch, seq = (1, shape[0]) if len(shape) == 1 else shape[:2]  # 1-D ids are one row, as `token_ids` takes them
    shapes = {(k.shape[0], k.shape[2]) for k in cache.leaves()}
    if len(shapes) != 1 or cache.keys[0].shape[0] != batch:
        raise ValueError(f"cache has (batch, length) {sorted(shapes)} across its layers; expected one length, the "
                         f"positions seen, and batch {batch} (the KVCache a previous call with use_cache returned)")
    past = cache.keys[0].shape[2]
    grown = KVCache(tuple(_padded(k, seq) for k in cache.keys), tuple(_padded(v, seq) for v in cache.values))
    return grown, Tensor(np.arange(past, past + seq, dtype=np.int32)), True


def _as_parameter(value: Tensor, name: str) -> Parameter:
    """`value` as a `Parameter` named `name`: a loaded `Parameter` is taken as is (no copy of the weight)."""
    if isinstance(value, Parameter):
        value.name = name
        return value
    return Parameter(value, name=name)


def _dtype_from_torch_spelling(dtype):
    """`torch_dtype=` values (`torch.float16` or a string) as msfx's `dtype` strings."""
    return str(dtype).removeprefix("torch.")


class PreTrainedModel(nn.Cell):
    """Base of the HF-named wrappers: parameters, `from_pretrained`, `save_pretrained`.

    Subclasses set `arch` (the architecture module) and `model_type` (their `msfx.families` record)
    and may override `param_shapes` (the keys this head owns) and `base_model_prefix` handling.
    Their `HF_METHODS` are wrapped by `hf_arguments` (no argument is swallowed).
    """

    arch: ModuleType
    base_model_prefix = "model"
    model_type: str  # the `msfx.families` record whose rules `from_pretrained` applies

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in HF_METHODS:
            if name in cls.__dict__:
                setattr(cls, name, hf_arguments(cls.__dict__[name]))

    def __init__(self, config, params: dict | None = None):
        super().__init__(auto_prefix=False)
        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)
        if params is None:
            params = self.init_params(config)
        leaves, self._param_keys = flatten(dict(params))
        self.weights = ParameterTuple([_as_parameter(t, k) for t, k in zip(leaves, self._param_keys)])
        self.params = Params(unflatten(list(self.weights), self._param_keys), config)
        self._steps: dict[tuple[bool, bool], CompiledStep] = {}  # by (jit, widening)
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

        `dtype` is "auto" (as stored; float32 for GGUF), "float32", "float16" or "bfloat16" (in
        float16, HF's `_keep_in_fp32_modules` stay float32, as T5's `wo`).
        A missing base-model tensor raises `CheckpointError`; a missing task head (a new
        classification head) is initialized with a warning naming it, as HF.
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
        params = load_params(family(cls.model_type), pretrained_model_name_or_path, dtype=dtype, config=config,
                             gguf_file=gguf_file, shapes=cls.param_shapes, prefix=cls.base_model_prefix,
                             config_kwargs=config_kwargs, **hub)
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

    @contextlib.contextmanager
    def using_params(self, tree: dict) -> Iterator[None]:
        """Within: calls run on `tree` (a parameter tree keyed as `self.params`, e.g. a training
        step's leaves, `msfx.params.unflatten(leaves, keys)`) instead of the model's Parameters."""
        saved = self.params
        self.params = Params(tree, self.config)
        try:
            yield
        finally:
            self.params = saved

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.weights)

    @property
    def dtype(self):
        return self.weights[0].dtype

    def _compiled_step(self, jit: bool, widening: bool = False) -> CompiledStep:
        if (jit, widening) not in self._steps:
            self._steps[jit, widening] = CompiledStep(self.arch, self.params, self.config, jit=jit, widening=widening)
        return self._steps[jit, widening]
