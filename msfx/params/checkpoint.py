"""Loading checkpoints into parameter trees and saving them back, for any architecture module.

A family's record (`msfx.families.Family`) gives its `model_type`, key rules and core module
(`param_shapes(config)`: every HF key with its shape); this file turns a model reference into a
validated `Params` tree.
"""
from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor

from msfx.errors import CheckpointError
from msfx.families import Family, family as family_of
from msfx.params.config import read_config
from msfx.params.dtypes import NUMPY_BFLOAT16, STORED, dtype_name, parse_dtype, to_numpy
from msfx.params.hub import resolve_gguf_file, resolve_model_dir
from msfx.params.safetensors_io import bf16_bits_to_float32, checkpoint_files, iter_tensors, read_shapes, \
    read_tensor, save_safetensors
from msfx.params.tree import Params, flatten_keys, unflatten_keys

logger = logging.getLogger(__name__)

# Keys that old checkpoints carry but no model reads (HF ignores them the same way): buffers that
# older transformers saved (e.g. BERT's `embeddings.position_ids`, in sentence-transformers models).
# (GPT-2: `attn.bias` / `attn.masked_bias` are the causal-mask buffers older checkpoints carry;
# the leading dot keeps `c_attn.bias` apart.)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids", "embeddings.token_type_ids", ".attn.bias",
                     ".attn.masked_bias")


def _names(keys: list[str], limit: int = 30) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_keys(found: dict[str, tuple], expected: dict[str, tuple], source: str, base: tuple[str, ...],
                optional: tuple[str, ...] = (), stored: dict[str, str] | None = None) -> list[str]:
    """Raise on missing, unexpected or mis-shaped tensors of the base model; return the head tensors
    the checkpoint lacks (a new task head: HF initializes those freshly).

    `base`: key prefixes of the base model (a family's `base_keys`); those this model has are
    checked strictly, so a base weight is never silently random. Keys of another class (`lm_head`
    in a base-model load, a decoder in `T5EncoderModel`) are dropped by the caller, as in HF. Keys
    starting with one of `optional` (a family's `optional_keys`: base-model parts some
    classes or older checkpoints lack, as BERT's pooler) are treated as head tensors. `stored`: each
    found key's name in the checkpoint (before renaming), as the messages name unexpected keys."""
    stored = stored or {}
    strict = tuple(p for p in base if any(k.startswith(p) for k in expected))

    def body(key: str) -> bool:
        return key.startswith(strict) and not key.startswith(optional)

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if body(k))
    mismatched = [f"{k}: checkpoint {tuple(found[k])}, model {tuple(expected[k])}"
                  for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    problems = []
    if [k for k in missing if body(k)]:
        problems.append(f"missing tensors: {_names([k for k in missing if body(k)])}")
        if found and not set(found) & set(expected):
            tops = sorted({stored.get(k, k).split(".")[0] for k in found})
            problems.append(f"no checkpoint key fits the model (they start with {_names(tops, 5)})")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(sorted(stored.get(k, k) for k in unexpected))}")
    if mismatched:
        problems.append(f"mis-shaped tensors: {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(problems))
    return [k for k in missing if not body(k)]


def _check_model_type(config, family: Family, source: str) -> None:
    if config.model_type != family.model_type:
        raise CheckpointError(f"{source} is a {config.model_type!r} checkpoint; this model needs "
                              f"{family.model_type!r}")


def _key_names(found, expected: dict, prefix: str) -> dict[str, str]:
    """Checkpoint key -> model key, for the keys a model may read (buffers no model reads left out).

    As HF: a base-model checkpoint saved without the base prefix (`LlamaModel`'s keys without
    `model.`) gets it on the keys the model has only under it, and a checkpoint whose every key
    carries HF's base prefix where the model's keys do not (`clip.` for `CLIPModel`) loses it."""
    keys = [k for k in found if not k.endswith(_IGNORED_SUFFIXES)]
    body = prefix + "."
    if any(k.startswith(body) for k in expected):
        if not any(k.startswith(body) for k in keys):
            return {k: k if k in expected else body + k for k in keys}
    elif keys and all(k.startswith(body) for k in keys):
        return {k: k.removeprefix(body) for k in keys}
    return {k: k for k in keys}


def _tie(names: dict[str, str], value: Callable[[str], np.ndarray], expected: dict, config, family: Family,
         shapes: Callable[[Any], dict]) -> tuple[dict[str, str], Any, dict]:
    """HF 5.x's tying at load time for `family.tied_keys` (`(head key, embedding key)` pairs) when
    `config.tie_word_embeddings`: a checkpoint holding only the head loads it as the embedding; one
    holding both with different values keeps them apart with a warning (HF's
    `PreTrainedModel.tie_weights`; here by a config copy with `tie_word_embeddings=False`, so the
    model and its `save_pretrained` carry both). `value(checkpoint key)` reads a tensor.
    Returns `names`, `config` and `expected`, updated."""
    if not getattr(config, "tie_word_embeddings", False):
        return names, config, expected
    for head, embedding in family.tied_keys:
        stored = {model: key for key, model in names.items()}
        if embedding not in expected or head not in stored:
            continue
        if embedding not in stored:
            names = {k: embedding if k == stored[head] else v for k, v in names.items()}
        elif not np.array_equal(value(stored[head]), value(stored[embedding])):
            untied = copy.deepcopy(config)
            untied.tie_word_embeddings = False
            if head in shapes(untied):  # else the head belongs to another class (`LlamaModel`): dropped
                logger.warning("config.tie_word_embeddings is True but the checkpoint holds %s and %s with "
                               "different values: they are kept apart (as HF)", embedding, head)
                config, expected = untied, shapes(untied)
    return names, config, expected


def _as_tensor(array: np.ndarray, dtype, *, bf16_bits: bool = False, owned: bool = False) -> Tensor:
    """`array` as a MindSpore Tensor of `dtype`.

    `bf16_bits`: `array` holds raw bfloat16 bits (uint16); they are taken as bfloat16 by a dtype
    view when MindSpore's numpy bfloat16 is available (else widened exactly to float32 first).
    `owned`: nothing else uses `array`, so the Tensor takes over its buffer instead of copying it.
    """
    if bf16_bits:
        if NUMPY_BFLOAT16 is not None:
            array = array.view(NUMPY_BFLOAT16)
        else:
            array, owned = bf16_bits_to_float32(array), True
    tensor = ms.from_numpy(array) if owned and array.flags.c_contiguous and array.flags.writeable else Tensor(array)
    return tensor if tensor.dtype == dtype else tensor.astype(dtype)


def _parameter(array: np.ndarray, dtype, name: str, *, bf16_bits: bool = False, owned: bool = False) -> Parameter:
    """`array` as a MindSpore `Parameter` of `dtype` named by its checkpoint key (arguments as in
    `_as_tensor`). With `owned` and no dtype change the weight's storage is `array`'s buffer: a
    loaded model then holds one copy of the checkpoint, with no per-tensor temporaries."""
    # Parameter copies its input unless that input has no other reference (MindSpore counts them;
    # a keyword argument adds one): hence the unnamed positional temporary and the name set after
    param = Parameter(_as_tensor(array, dtype, bf16_bits=bf16_bits, owned=owned))
    param.name = name
    return param


def _fresh_heads(flat: dict, missing_heads: list[str], expected: dict, config, target) -> None:
    if missing_heads:
        logger.warning("newly initialized (not in the checkpoint): %s", ", ".join(missing_heads))
    rng = np.random.default_rng(0)
    std = getattr(config, "initializer_range", 0.02)
    for key in missing_heads:  # biases start at zero, BART's `final_logits_bias` too (HF's `_init_weights`)
        value = np.zeros(expected[key], np.float32) if key.endswith("bias") else \
            rng.normal(0.0, std, expected[key]).astype(np.float32)
        flat[key] = _parameter(value, target or ms.float32, key, owned=True)


def load_params(family: Family | str | ModuleType, ref: str | os.PathLike, *, dtype="auto", config=None,
                gguf_file: str | None = None, shapes: Callable[[Any], dict] | None = None, prefix: str | None = None,
                config_kwargs: dict | None = None, revision: str | None = None, cache_dir: str | None = None,
                local_files_only: bool = False, token=None) -> Params:
    """Load a checkpoint into a `Params` tree for `family`: a `msfx.families` record, a
    `model_type`, or an architecture module (`msfx.llama`: its `MODEL_TYPE`).

    As HF 5.x: `model.safetensors` is read when present (an index beside it is not), and under
    `tie_word_embeddings` a checkpoint's head and embedding are tied as `_tie` says.

    Args:
        ref: local directory or hub id (see `resolve_model_dir`).
        dtype: "auto" (each tensor's stored dtype; float32 for GGUF), "float32", "float16",
            "bfloat16"; the tensors HF keeps in float32 (`family.keep_in_fp32`, T5's `wo`)
            stay float32 in a float16 load.
        config: an HF config to use instead of the checkpoint's `config.json`.
        gguf_file: a GGUF file name inside `ref` (or a path) to load instead of safetensors.
        shapes: `config -> {key: shape}` of the tensors to load; default `family.arch.param_shapes`
            (a wrapper class passes its own, e.g. without `lm_head`).
        prefix: the base model's key prefix (default `family.base_prefix`); a checkpoint saved
            without it still loads (and one
            whose every key carries it where the model's keys do not, as HF's `clip.`).
        config_kwargs: config attributes to override when reading `config.json` (`num_labels=3`).

    Raises:
        ModelNotFoundError: `ref` cannot be resolved.
        CheckpointError: wrong architecture, or missing/unexpected/mis-shaped tensors of the base
            model (named); a missing task head (not under `family.base_keys` / `prefix.`) is
            initialized freshly with a warning naming it, as HF.
        CorruptCheckpointError: a truncated or malformed weights file.
        ValueError: an unknown dtype or a model_type msfx does not support.
    """
    if not isinstance(family, Family):
        family = family_of(family if isinstance(family, str) else family.MODEL_TYPE)
    target = parse_dtype(dtype)
    shapes = shapes or family.arch.param_shapes
    prefix = family.base_prefix if prefix is None else prefix
    if gguf_file is not None:
        return _load_gguf(family, ref, gguf_file, target, shapes, prefix, revision, cache_dir, local_files_only, token)
    model_dir = resolve_model_dir(ref, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                  token=token)
    if config is None:
        config = read_config(model_dir, **(config_kwargs or {}))
    _check_model_type(config, family, str(ref))
    files = checkpoint_files(model_dir)
    found = read_shapes(files)
    expected = shapes(config)
    names, config, expected = _tie(_key_names(found, expected, prefix), lambda k: read_tensor(files, k), expected,
                                   config, family, shapes)
    missing_heads = _check_keys({names[k]: found[k] for k in names}, expected, str(ref),
                                family.base_keys or (prefix + ".",), family.optional_keys,
                                {model: key for key, model in names.items()})
    kept = _kept_in_float32(family, target)
    flat = {}
    for name, array, stored in iter_tensors(files):
        name = names.get(name)
        if name not in expected:
            continue
        dtype = ms.float32 if kept and kept.search(name) else target or STORED.get(stored, ms.float32)
        flat[name] = _parameter(array, dtype, name, bf16_bits=stored == "BF16", owned=True)
    _fresh_heads(flat, missing_heads, expected, config, target)
    return Params(unflatten_keys(flat), config)


def _kept_in_float32(family: Family, target) -> "re.Pattern | None":
    """HF's `_get_dtype_plan`: the keys kept in float32 under a float16 load (`family.keep_in_fp32`,
    HF's `_keep_in_fp32_modules`, e.g. T5's `wo`), matched anywhere in the key (`re.search`) as HF
    does; None when nothing is kept. (No family msfx has sets HF's `_keep_in_fp32_modules_strict`.)"""
    modules = family.keep_in_fp32 if target == ms.float16 else ()
    return re.compile("|".join(modules)) if modules else None


def _load_gguf(family: Family, ref, gguf_file, target, shapes, prefix, revision, cache_dir, local_files_only,
               token) -> Params:
    """A GGUF file loads as the HF directory `gguf_checkpoint` converts it to once (float32 weights)."""
    from msfx.params.gguf import gguf_checkpoint

    path = resolve_gguf_file(ref, gguf_file, revision=revision, cache_dir=cache_dir,
                             local_files_only=local_files_only, token=token)
    return load_params(family, gguf_checkpoint(path), dtype=target, shapes=shapes, prefix=prefix)


def save_params(params: dict, config, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write `config.json` and the tree as HF safetensors (sharded above `max_shard_size`), so
    that `transformers` (PyTorch) `from_pretrained` loads it with no missing or unexpected keys."""
    save_directory = Path(save_directory)
    flat = flatten_keys(dict(params))
    arrays = {name: to_numpy(tensor) for name, tensor in flat.items()}
    save_safetensors(arrays, save_directory, max_shard_size)
    config = copy.deepcopy(config)
    config.dtype = dtype_name(next(iter(flat.values())).dtype)
    config.save_pretrained(save_directory)
