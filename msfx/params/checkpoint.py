"""Loading checkpoints into parameter trees and saving them back, for any architecture module.

An architecture module provides `MODEL_TYPE`, `CONFIG_CLASS` and `param_shapes(config)` (every
HF key with its shape); this file turns a model reference into a validated `Params` tree.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor

from msfx.errors import CheckpointError
from msfx.params.config import read_config
from msfx.params.dtypes import NUMPY_BFLOAT16, STORED, dtype_name, parse_dtype, to_numpy
from msfx.params.hub import resolve_gguf_file, resolve_model_dir
from msfx.params.safetensors_io import bf16_bits_to_float32, checkpoint_files, iter_tensors, read_shapes, \
    save_safetensors
from msfx.params.tree import Params, flatten_keys, unflatten_keys

logger = logging.getLogger(__name__)

# Keys that old checkpoints carry but no model reads (HF ignores them the same way): buffers that
# older transformers saved (e.g. BERT's `embeddings.position_ids`, in sentence-transformers models).
# (GPT-2: `attn.bias` / `attn.masked_bias` are the causal-mask buffers older checkpoints carry;
# the leading dot keeps `c_attn.bias` apart.)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids", "embeddings.token_type_ids", ".attn.bias",
                     ".attn.masked_bias")


def _check_keys(found: dict[str, tuple], expected: dict[str, tuple], source: str, prefix: str,
                optional: tuple[str, ...] = ()) -> list[str]:
    """Raise on missing, unexpected or mis-shaped tensors of the base model (under `prefix.`);
    return the head tensors the checkpoint lacks (HF initializes those freshly). Head tensors of
    another class (`lm_head` in a base-model load) are dropped by the caller, as in HF. Keys
    starting with one of `optional` (an architecture's `OPTIONAL_KEYS`: base-model parts some
    classes lack, as BERT's pooler) are treated as head tensors."""
    def body(key: str) -> bool:
        return key.startswith(prefix + ".") and not key.startswith(optional)

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if body(k))
    mismatched = [f"{k}: checkpoint {tuple(found[k])}, model {tuple(expected[k])}"
                  for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    problems = []
    if [k for k in missing if body(k)]:
        problems.append(f"missing tensors: {', '.join(k for k in missing if body(k))}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"mis-shaped tensors: {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(problems))
    return [k for k in missing if not body(k)]


def _check_model_type(config, arch: ModuleType, source: str) -> None:
    if config.model_type != arch.MODEL_TYPE:
        raise CheckpointError(f"{source} is a {config.model_type!r} checkpoint; this model needs "
                              f"{arch.MODEL_TYPE!r}")


def _normalize(found: dict, expected: dict, config, prefix: str) -> tuple[dict, str]:
    """Drop keys no model reads, and add the base prefix to a base-model checkpoint's keys.
    Returns the filtered mapping and the prefix added to its keys ("" or `prefix.`)."""
    tied_head = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in expected
    found = {k: v for k, v in found.items()
             if not k.endswith(_IGNORED_SUFFIXES) and not (tied_head and k == "lm_head.weight")}
    body = prefix + "."
    if not any(k.startswith(body) for k in found) and any(k.startswith(body) for k in expected):
        return {body + k: v for k, v in found.items()}, body
    return found, ""


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
    for key in missing_heads:
        value = np.zeros(expected[key], np.float32) if key.endswith(".bias") else \
            rng.normal(0.0, std, expected[key]).astype(np.float32)
        flat[key] = _parameter(value, target or ms.float32, key, owned=True)


def load_params(arch: ModuleType, ref: str | os.PathLike, *, dtype="auto", config=None, gguf_file: str | None = None,
                shapes: Callable[[Any], dict] | None = None, prefix: str = "model", config_kwargs: dict | None = None,
                revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                token=None) -> Params:
    """Load a checkpoint into a `Params` tree for architecture module `arch`.

    Args:
        ref: local directory or hub id (see `resolve_model_dir`).
        dtype: "auto" (each tensor's stored dtype; float32 for GGUF), "float32", "float16",
            "bfloat16".
        config: an HF config to use instead of the checkpoint's `config.json`.
        gguf_file: a GGUF file name inside `ref` (or a path) to load instead of safetensors.
        shapes: `config -> {key: shape}` of the tensors to load; default `arch.param_shapes`
            (a wrapper class passes its own, e.g. without `lm_head`).
        prefix: the base model's key prefix; a checkpoint saved without it still loads.
        config_kwargs: config attributes to override when reading `config.json` (`num_labels=3`).

    Raises:
        ModelNotFoundError: `ref` cannot be resolved.
        CheckpointError: wrong architecture, or missing/unexpected/mis-shaped tensors (all named).
        CorruptCheckpointError: a truncated or malformed weights file.
        ValueError: an unknown dtype.
    """
    target = parse_dtype(dtype)
    shapes = shapes or arch.param_shapes
    if gguf_file is not None:
        return _load_gguf(arch, ref, gguf_file, target, shapes, prefix, revision, cache_dir, local_files_only, token)
    model_dir = resolve_model_dir(ref, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                  token=token)
    if config is None:
        config = read_config(model_dir, **(config_kwargs or {}))
    _check_model_type(config, arch, str(ref))
    files = checkpoint_files(model_dir)
    expected = shapes(config)
    found = read_shapes(files)
    normalized, added = _normalize(found, expected, config, prefix)
    missing_heads = _check_keys(normalized, expected, str(ref), prefix, getattr(arch, "OPTIONAL_KEYS", ()))
    flat = {}
    for name, array, stored in iter_tensors(files):
        name = added + name
        if name not in expected:
            continue
        flat[name] = _parameter(array, target or STORED.get(stored, ms.float32), name, bf16_bits=stored == "BF16",
                                owned=True)
    _fresh_heads(flat, missing_heads, expected, config, target)
    return Params(unflatten_keys(flat), config)


def _load_gguf(arch, ref, gguf_file, target, shapes, prefix, revision, cache_dir, local_files_only, token) -> Params:
    from msfx.params.gguf import gguf_config, gguf_state_dict, read_gguf

    path = resolve_gguf_file(ref, gguf_file, revision=revision, cache_dir=cache_dir,
                             local_files_only=local_files_only, token=token)
    reader = read_gguf(str(path))
    config = gguf_config(reader)
    _check_model_type(config, arch, str(path))
    expected = shapes(config)
    state, _ = _normalize(gguf_state_dict(reader, config), expected, config, prefix)
    missing_heads = _check_keys({k: v.shape for k, v in state.items()}, expected, str(path), prefix,
                                getattr(arch, "OPTIONAL_KEYS", ()))
    # the dequantized arrays are this function's own (GGUF's float32 ones are copied out of the file)
    flat = {k: _parameter(v, target or ms.float32, k, owned=True) for k, v in state.items() if k in expected}
    _fresh_heads(flat, missing_heads, expected, config, target)
    return Params(unflatten_keys(flat), config)


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
