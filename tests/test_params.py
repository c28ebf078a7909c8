"""Checkpoints in and out of msfx, with HF transformers (PyTorch) as the oracle.

`from_pretrained` / `save_pretrained` round trips (float32, bfloat16, float16, base model, tied
head, sharded), hub ids resolved from a local HF cache while offline, bad checkpoints and bad
inputs failing with named errors, the tree utilities, the README quick tour, and msfx without
torch installed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from mindspore import tensor
from safetensors.torch import load_file, save_file

import msfx
from msfx import LlamaForCausalLM, LlamaModel
from msfx.errors import CheckpointError, CorruptCheckpointError, ModelNotFoundError
from msfx.params import (flatten, flatten_keys, load_params, resolve_model_dir, save_params, tree_map, unflatten,
                         unflatten_keys)
from msfx.params.safetensors_io import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, parse_size

from conftest import TINY, make_hf_llama, random_ids
from oracle import assert_close

IDS = random_ids(2, 7)
VOCAB = TINY["vocab_size"]


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny random HF Llama for the whole module: `(torch_model, path)`."""
    return make_hf_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_msfx(tiny):
    return LlamaForCausalLM.from_pretrained(tiny[1])


def torch_out(model, ids, field="logits"):
    with torch.no_grad():
        return getattr(model(torch.tensor(ids)), field).float().numpy()


def ms_out(model, ids, field="logits"):
    return getattr(model(tensor(ids)), field).astype(ms.float32).asnumpy()


def hf_load(cls_name: str, path, **kwargs):
    """HF PyTorch `from_pretrained`, asserting it found exactly the keys it needs."""
    model, info = getattr(transformers, cls_name).from_pretrained(path, output_loading_info=True,
                                                                  attn_implementation="eager", **kwargs)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def saved_keys(directory: Path) -> set[str]:
    keys = set()
    for file in sorted(directory.glob("*.safetensors")):
        keys |= set(load_file(file))
    return keys


def rewrite_checkpoint(src: Path, dst: Path, edit) -> Path:
    """Copy checkpoint dir `src` to `dst`, passing its state dict through `edit(state) -> None`."""
    shutil.copytree(src, dst)
    state = load_file(dst / SAFE_WEIGHTS_NAME)
    edit(state)
    save_file(state, dst / SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
    return dst


# ---------------------------------------------------------------- 1. round trips into HF PyTorch

def test_round_trip_float32_loads_in_hf_with_identical_logits(tiny, tiny_msfx, tmp_path):
    torch_model, _ = tiny
    tiny_msfx.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                         "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    reloaded = hf_load("LlamaForCausalLM", tmp_path)
    assert reloaded.dtype == torch.float32
    assert_same_state(reloaded, torch_model)
    np.testing.assert_array_equal(torch_out(reloaded, IDS), torch_out(torch_model, IDS))
    # and back into msfx: the same weights, the same logits
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_array_equal(ms_out(again, IDS), ms_out(tiny_msfx, IDS))
    assert_close(ms_out(again, IDS), torch_out(torch_model, IDS), 1e-4,
                 "round trip float32 loads in hf with identical logits")


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_round_trip_half_precision_is_bit_identical_to_torch(tiny, tmp_path, dtype, torch_dtype):
    """msfx narrows float32 -> bf16/fp16 on load exactly as torch does, and saves those bits
    unchanged: torch then computes exactly its own half-precision logits."""
    _, path = tiny
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    assert model.dtype == getattr(ms, dtype)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == dtype
    reloaded = hf_load("LlamaForCausalLM", tmp_path)  # dtype from config.json
    assert reloaded.dtype == torch_dtype
    # torch's own half-precision model: the float32 checkpoint loaded with `dtype=` (not `.to()`,
    # which also narrows the rotary `inv_freq` buffer that `from_pretrained` keeps in float32)
    reference = hf_load("LlamaForCausalLM", path, dtype=torch_dtype)
    assert_same_state(reloaded, reference)
    np.testing.assert_array_equal(torch_out(reloaded, IDS), torch_out(reference, IDS))
    # the saved half-precision checkpoint loads back into msfx bit for bit (half-precision logits
    # are test_llama_parity's concern)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    assert again.dtype == getattr(ms, dtype)
    before, after = flatten_keys(dict(model.params)), flatten_keys(dict(again.params))
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == getattr(ms, dtype), key
        np.testing.assert_array_equal(after[key].astype(ms.float32).asnumpy(),
                                      before[key].astype(ms.float32).asnumpy(), err_msg=key)


def test_bf16_checkpoint_loads_as_float32_exactly(tiny, tmp_path):
    torch_model, _ = tiny
    bf16 = copy.deepcopy(torch_model).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    assert LlamaForCausalLM.from_pretrained(tmp_path).dtype == ms.bfloat16  # "auto": as stored
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    assert model.dtype == ms.float32
    reference = hf_load("LlamaForCausalLM", tmp_path, dtype=torch.float32)
    flat = flatten_keys(dict(model.params))
    for key, value in reference.state_dict().items():
        np.testing.assert_array_equal(flat[key].asnumpy(), value.numpy(), err_msg=key)
    assert_close(ms_out(model, IDS), torch_out(reference, IDS), 1e-4, "bf16 checkpoint loads as float32 exactly")


def test_llama_model_save_has_no_prefix_and_loads_in_hf(tiny, tmp_path):
    torch_model, path = tiny
    base = LlamaModel.from_pretrained(path)  # drops lm_head, as HF does
    base.save_pretrained(tmp_path)
    keys = saved_keys(tmp_path)
    assert "embed_tokens.weight" in keys and "layers.1.mlp.down_proj.weight" in keys
    assert not [k for k in keys if k.startswith("model.") or k.startswith("lm_head")]
    reloaded = hf_load("LlamaModel", tmp_path)
    assert_same_state(reloaded, torch_model.model)
    expected = torch_out(torch_model.model, IDS, "last_hidden_state")
    np.testing.assert_array_equal(torch_out(reloaded, IDS, "last_hidden_state"), expected)
    # msfx reads the prefix-less checkpoint too
    again = LlamaModel.from_pretrained(tmp_path)
    np.testing.assert_array_equal(ms_out(again, IDS, "last_hidden_state"),
                                  ms_out(base, IDS, "last_hidden_state"))
    assert_close(ms_out(again, IDS, "last_hidden_state"), expected, 1e-4,
                 "llama model save has no prefix and loads in hf")


def test_causal_lm_from_base_checkpoint_initializes_head_with_warning(tiny, tmp_path, caplog):
    torch_model, _ = tiny
    torch_model.model.save_pretrained(tmp_path)  # HF LlamaModel checkpoint: no prefix, no lm_head
    with caplog.at_level(logging.WARNING, logger="msfx"):
        model = LlamaForCausalLM.from_pretrained(tmp_path)
    assert "lm_head.weight" in caplog.text
    np.testing.assert_array_equal(model.params["model"]["norm"]["weight"].asnumpy(),
                                  torch_model.model.norm.weight.detach().numpy())
    assert model.params["lm_head"]["weight"].shape == (VOCAB, TINY["hidden_size"])


def test_tied_embeddings_round_trip(hf_llama, tmp_path):
    torch_model, path = hf_llama(tie_word_embeddings=True)
    model = LlamaForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "out")
    assert "lm_head.weight" not in saved_keys(tmp_path / "out")
    reloaded = hf_load("LlamaForCausalLM", tmp_path / "out")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    np.testing.assert_array_equal(torch_out(reloaded, IDS), torch_out(torch_model, IDS))
    assert_close(ms_out(model, IDS), torch_out(torch_model, IDS), 1e-4, "tied embeddings round trip")


def test_sequence_classification_round_trip(hf_llama, tmp_path):
    torch_model, path = hf_llama(cls_name="LlamaForSequenceClassification", num_labels=3)
    model = msfx.LlamaForSequenceClassification.from_pretrained(path)
    model.save_pretrained(tmp_path / "out")
    assert "score.weight" in saved_keys(tmp_path / "out")
    reloaded = hf_load("LlamaForSequenceClassification", tmp_path / "out")
    assert_same_state(reloaded, torch_model)
    np.testing.assert_array_equal(torch_out(reloaded, IDS), torch_out(torch_model, IDS))


def test_functional_load_and_save_params(tiny, tmp_path):
    torch_model, path = tiny
    params = load_params(msfx.llama, path)
    assert params.config.model_type == "llama"
    flat = flatten_keys(dict(params))
    assert set(flat) == set(torch_model.state_dict())
    save_params(params, params.config, tmp_path)
    reloaded = hf_load("LlamaForCausalLM", tmp_path)
    assert_same_state(reloaded, torch_model)


# ---------------------------------------------------------------- 2. sharding

@pytest.mark.parametrize("max_shard_size", ["100KB", 60_000])
def test_sharded_save_loads_both_ways(tiny, tiny_msfx, tmp_path, max_shard_size):
    torch_model, _ = tiny
    tiny_msfx.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert not (tmp_path / SAFE_WEIGHTS_NAME).exists()
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(torch_model.state_dict())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in torch_model.state_dict().values())
    for shard in shards:
        assert shard.name.endswith(f"-of-{len(shards):05d}.safetensors")
    reloaded = hf_load("LlamaForCausalLM", tmp_path)
    assert_same_state(reloaded, torch_model)
    np.testing.assert_array_equal(torch_out(reloaded, IDS), torch_out(torch_model, IDS))
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_array_equal(ms_out(again, IDS), ms_out(tiny_msfx, IDS))


@pytest.mark.parametrize("size, expected", [(12345, 12345), ("5GB", 5 * 10**9), ("5GiB", 5 * 2**30),
                                            ("200KiB", 200 * 1024), ("1.5MB", 1_500_000), ("100kb", 100_000)])
def test_parse_shard_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5", "5TB", "five GB", ""])
def test_parse_shard_size_rejects(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)


def test_hf_sharded_checkpoint_loads_in_msfx(tiny, tiny_msfx, tmp_path):
    torch_model, _ = tiny
    torch_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 3
    assert (tmp_path / SAFE_WEIGHTS_INDEX_NAME).is_file()
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_array_equal(ms_out(model, IDS), ms_out(tiny_msfx, IDS))
    assert_close(ms_out(model, IDS), torch_out(torch_model, IDS), 1e-4, "hf sharded checkpoint loads in msfx")


def test_resave_into_same_directory_leaves_no_stale_files(tiny, tmp_path):
    torch_model, path = tiny
    shutil.copytree(path, tmp_path / "m")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")  # overwrite the file it was loaded from
    assert not (tmp_path / "m" / SAFE_WEIGHTS_NAME).exists()
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")  # and back to a single file: shards and index removed
    assert sorted(p.name for p in (tmp_path / "m").glob("model*")) == [SAFE_WEIGHTS_NAME]
    assert_same_state(hf_load("LlamaForCausalLM", tmp_path / "m"), torch_model)


def test_missing_shard_is_named(tiny_msfx, tmp_path):
    tiny_msfx.save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(OSError, match=victim.name):
        LlamaForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------- 3. bad checkpoints and inputs

def test_missing_tensor_is_named(tiny, tmp_path):
    key = "model.layers.1.mlp.down_proj.weight"
    bad = rewrite_checkpoint(tiny[1], tmp_path / "bad", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensors: {key}"):
        LlamaForCausalLM.from_pretrained(bad)


def test_config_with_more_layers_than_checkpoint_names_missing_layer(tiny, tmp_path):
    bad = shutil.copytree(tiny[1], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensors: .*model\.layers\.2\.self_attn\.q_proj\.weight"):
        LlamaForCausalLM.from_pretrained(bad)


def test_extra_tensor_is_named(tiny, tmp_path):
    key = "model.layers.0.extra.weight"
    bad = rewrite_checkpoint(tiny[1], tmp_path / "bad", lambda s: s.__setitem__(key, torch.zeros(3)))
    with pytest.raises(CheckpointError, match=f"unexpected tensors: {key}"):
        LlamaForCausalLM.from_pretrained(bad)


def test_wrong_shape_is_named_with_both_shapes(tiny, tmp_path):
    key = "model.layers.0.self_attn.q_proj.weight"
    bad = rewrite_checkpoint(tiny[1], tmp_path / "bad", lambda s: s.__setitem__(key, torch.zeros(32, 64)))
    with pytest.raises(CheckpointError) as err:
        LlamaForCausalLM.from_pretrained(bad)
    assert f"{key}: checkpoint (32, 64), model (64, 64)" in str(err.value)


def _truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


def _json_header(header) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded


@pytest.mark.parametrize("corrupt, message", [
    (_truncated, "truncated"),
    (lambda data: data[:5], "truncated"),
    (lambda data: b"", "truncated"),
    (lambda data: np.random.default_rng(0).bytes(4096), "truncated or not a safetensors file"),
    (lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n", "not a safetensors"),
    (lambda data: struct.pack("<Q", 6) + b"\xff\xfe{]}x" + data, "not valid JSON"),
    (lambda data: _json_header([1, 2]), "not a JSON object"),
    (lambda data: _json_header({"model.norm.weight": {"dtype": "F32", "shape": [64]}}), "malformed"),
    (lambda data: _json_header({"model.norm.weight": {"dtype": "Q4", "shape": [64], "data_offsets": [0, 256]}}),
     "unsupported dtype"),
], ids=["half", "5-bytes", "empty", "random-bytes", "lfs-pointer", "bad-json", "json-list", "no-offsets",
        "bad-dtype"])
def test_corrupt_safetensors_file(tiny, tmp_path, corrupt, message):
    bad = shutil.copytree(tiny[1], tmp_path / "bad")
    weights = bad / SAFE_WEIGHTS_NAME
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(CorruptCheckpointError, match=message) as err:
        LlamaForCausalLM.from_pretrained(bad)
    assert str(weights) in str(err.value)
    assert isinstance(err.value, OSError)  # what HF raises for unreadable weights


def test_directory_without_weights_or_config(tiny, tmp_path):
    (tmp_path / "no_weights").mkdir()
    shutil.copy(tiny[1] / "config.json", tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LlamaForCausalLM.from_pretrained(tmp_path / "no_weights")
    (tmp_path / "no_config").mkdir()
    shutil.copy(tiny[1] / SAFE_WEIGHTS_NAME, tmp_path / "no_config")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaForCausalLM.from_pretrained(tmp_path / "no_config")


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 1000, -1])
def test_out_of_range_token_ids(tiny_msfx, bad_id):
    ids = IDS.copy()
    ids[1, 3] = bad_id
    pattern = rf"token id {bad_id}\b.*vocab_size {VOCAB}"
    with pytest.raises(ValueError, match=pattern):
        tiny_msfx(tensor(ids))
    with pytest.raises(ValueError, match=pattern):
        tiny_msfx(ids)  # numpy input too
    with pytest.raises(ValueError, match=pattern):
        tiny_msfx.generate(input_ids=tensor(ids), max_new_tokens=3, jit=False)


def test_out_of_range_token_ids_in_base_model(tiny):
    base = LlamaModel.from_pretrained(tiny[1])
    with pytest.raises(ValueError, match=rf"token id {VOCAB}\b.*vocab_size {VOCAB}"):
        base(tensor(np.array([[5, VOCAB]])))


def test_nonexistent_local_path(tmp_path):
    missing = tmp_path / "does" / "not_exist"
    with pytest.raises(ModelNotFoundError, match="not_exist"):
        LlamaForCausalLM.from_pretrained(missing)
    with pytest.raises(ModelNotFoundError):
        LlamaForCausalLM.from_pretrained(str(missing))
    with pytest.raises(OSError):  # HF code catches OSError
        load_params(msfx.llama, missing)


class NetworkUsed(BaseException):
    """Raised by the patched hub client; a BaseException so no `except Exception` hides it."""


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if huggingface_hub tries to reach the hub."""
    from huggingface_hub import HfApi

    def refuse(*args, **kwargs):
        raise NetworkUsed("the hub was contacted although offline mode was requested")

    for method in ("repo_info", "model_info", "list_repo_tree"):
        monkeypatch.setattr(HfApi, method, refuse)


def test_uncached_hub_id_offline_env(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="offline") as err:
        LlamaForCausalLM.from_pretrained("msfx-tests/not-in-any-cache", cache_dir=tmp_path)
    assert "msfx-tests/not-in-any-cache" in str(err.value)
    # the env alone (no cache_dir, no local_files_only) keeps it off the network
    with pytest.raises(ModelNotFoundError, match="offline"):
        LlamaForCausalLM.from_pretrained("msfx-tests/not-in-any-cache-either")


def test_uncached_hub_id_local_files_only(tmp_path, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError, match="offline"):
        LlamaForCausalLM.from_pretrained("msfx-tests/not-in-any-cache", cache_dir=tmp_path, local_files_only=True)


@pytest.mark.parametrize("dtype", ["float8", "int8", "float64", "half ", torch.float32, np.float32])
def test_unknown_dtype(tiny, dtype):
    with pytest.raises(ValueError, match="unsupported dtype") as err:
        LlamaForCausalLM.from_pretrained(tiny[1], dtype=dtype)
    for accepted in ("'auto'", "'float32'", "'float16'", "'bfloat16'"):
        assert accepted in str(err.value)


@pytest.mark.parametrize("cls_name, config, model_type", [
    ("GPT2LMHeadModel", transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=1, n_head=2),
     "gpt2"),
    ("BertModel", transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=37), "bert"),
])
def test_other_architecture_is_refused(tmp_path, cls_name, config, model_type):
    getattr(transformers, cls_name)(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=f"'{model_type}' checkpoint; this model needs 'llama'"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=f"'{model_type}'"):
        load_params(msfx.llama, tmp_path)


def test_generate_beyond_max_position_embeddings_warns(tiny_msfx, caplog):
    """As HF: a warning past `max_position_embeddings`, and rope positions go on (tokens vs HF in
    tests/test_generation_edges.py)."""
    limit = TINY["max_position_embeddings"]
    out = tiny_msfx.generate(input_ids=tensor(random_ids(1, limit + 1)), max_new_tokens=1, jit=False,
                             eos_token_id=None)
    assert out.shape == (1, limit + 2)
    assert f"exceeded the model's predefined maximum length ({limit})" in caplog.text
    caplog.clear()
    # exactly at the limit: no warning
    out = tiny_msfx.generate(input_ids=tensor(random_ids(1, limit - 2)), max_new_tokens=2, jit=False,
                             eos_token_id=None)
    assert out.shape == (1, limit)
    assert "predefined maximum length" not in caplog.text


# ---------------------------------------------------------------- 4. hub ids from a local HF cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "msfx-tests/tiny-llama"


@pytest.fixture
def hub_cache(tiny, tmp_path):
    """A hub cache dir laid out exactly as huggingface_hub writes it: blobs, snapshot symlinks,
    `refs/main` holding the commit hash (no newline)."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot.mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    generation = json.loads((tiny[1] / "generation_config.json").read_text())
    generation["eos_token_id"] = [2, 50]  # a marker: the snapshot's generation config is the one used
    files = {"config.json": (tiny[1] / "config.json").read_bytes(),
             "model.safetensors": (tiny[1] / SAFE_WEIGHTS_NAME).read_bytes(),
             "generation_config.json": json.dumps(generation).encode()}
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return cache


@pytest.mark.parametrize("offline", ["local_files_only", "HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE=true"])
def test_hub_id_from_local_cache_offline(tiny, tiny_msfx, hub_cache, monkeypatch, no_network, offline):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    kwargs = {}
    if offline == "local_files_only":
        kwargs["local_files_only"] = True
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline.split("=")[1])
    assert resolve_model_dir(REPO_ID, cache_dir=hub_cache, **kwargs) == \
        hub_cache / "models--msfx-tests--tiny-llama" / "snapshots" / COMMIT
    model = LlamaForCausalLM.from_pretrained(REPO_ID, cache_dir=hub_cache, **kwargs)
    np.testing.assert_array_equal(ms_out(model, IDS), ms_out(tiny_msfx, IDS))
    assert_close(ms_out(model, IDS), torch_out(tiny[0], IDS), 1e-4, "hub id from local cache offline")
    assert model.generation_config.eos_token_id == [2, 50]
    params = load_params(msfx.llama, REPO_ID, cache_dir=hub_cache, **kwargs)
    assert params.config.num_hidden_layers == TINY["num_hidden_layers"]


def test_hub_revisions_from_local_cache(tiny_msfx, hub_cache, no_network):
    model = LlamaForCausalLM.from_pretrained(REPO_ID, cache_dir=hub_cache, local_files_only=True, revision=COMMIT)
    np.testing.assert_array_equal(ms_out(model, IDS), ms_out(tiny_msfx, IDS))
    for revision in ("v9.9", "f" * 40):
        with pytest.raises(ModelNotFoundError, match="offline") as err:
            LlamaForCausalLM.from_pretrained(REPO_ID, cache_dir=hub_cache, local_files_only=True, revision=revision)
        assert REPO_ID in str(err.value)
    with pytest.raises(ModelNotFoundError, match="offline"):
        LlamaForCausalLM.from_pretrained("msfx-tests/other-model", cache_dir=hub_cache, local_files_only=True)


# ---------------------------------------------------------------- 5. tree utilities

def test_tree_utilities_round_trip():
    flat = {"model.embed_tokens.weight": 1, "model.layers.0.mlp.up_proj.weight": 2,
            "model.layers.0.mlp.up_proj.bias": 3, "model.layers.1.mlp.up_proj.weight": 4,
            "model.layers.1.mlp.up_proj.bias": 5, "model.norm.weight": 6, "lm_head.weight": 7}
    tree = unflatten_keys(flat)
    assert tree["model"]["layers"][1]["mlp"]["up_proj"]["bias"] == 5
    assert isinstance(tree["model"]["layers"], list) and len(tree["model"]["layers"]) == 2
    assert flatten_keys(tree) == flat
    leaves, keys = flatten(tree)
    assert leaves == list(flat.values()) and keys == list(flat.keys())
    assert unflatten(leaves, keys) == tree
    doubled = tree_map(lambda x: 2 * x, tree)
    assert flatten_keys(doubled) == {k: 2 * v for k, v in flat.items()}
    assert tree["model"]["norm"]["weight"] == 6  # tree_map does not mutate
    # ten or more layers keep numeric (not lexicographic) order
    many = unflatten_keys({f"layers.{i}.w": i for i in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)})
    assert [layer["w"] for layer in many["layers"]] == list(range(11))


def test_tree_utilities_on_real_params(tiny_msfx):
    leaves, keys = flatten(dict(tiny_msfx.params))
    assert len(leaves) == len(tiny_msfx.weights)
    rebuilt = unflatten(leaves, keys)
    assert flatten_keys(rebuilt).keys() == flatten_keys(dict(tiny_msfx.params)).keys()
    shapes = tree_map(lambda t: tuple(t.shape), dict(tiny_msfx.params))
    assert shapes["model"]["layers"][1]["self_attn"]["o_proj"]["weight"] == (64, 64)


@pytest.mark.parametrize("keys", [["layers.0.w", "layers.2.w"], ["layers.1.w"], ["a.0", "a.1", "a.3"]])
def test_unflatten_keys_gaps_raise(keys):
    with pytest.raises(ValueError, match="not 0..n-1"):
        unflatten_keys({k: 0 for k in keys})


# ---------------------------------------------------------------- 6. the README quick tour

def save_tiny_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary, with Llama's special tokens and BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = "A list of colors : red , blue Portugal is".split()
    vocab = ["<pad>", "<s>", "</s>", "<unk>", *words]
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>", pad_token="<pad>", padding_side="left")
    tokenizer.save_pretrained(path)


def test_readme_quick_tour(tiny, tmp_path):
    torch_model, source = tiny
    path = str(shutil.copytree(source, tmp_path / "tiny-llama"))
    save_tiny_tokenizer(Path(path))

    # --- as in the README
    from mindspore import tensor
    from transformers import AutoTokenizer
    from msfx import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(["A list of colors: red, blue", "Portugal is"], padding=True, return_tensors="np")
    outputs = model(tensor(inputs.input_ids))
    generated_ids = model.generate(input_ids=tensor(inputs.input_ids), max_new_tokens=30, use_cache=True,
                                   do_sample=False)
    texts = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)
    # ---

    assert inputs.input_ids.shape == (2, 9) and 3 not in inputs.input_ids  # no <unk>: the vocab covers it
    assert_close(outputs.logits.asnumpy(), torch_out(torch_model, inputs.input_ids), 1e-4, "readme quick tour")
    with torch.no_grad():
        expected = torch_model.generate(input_ids=torch.tensor(inputs.input_ids), max_new_tokens=30, use_cache=True,
                                        do_sample=False)
    np.testing.assert_array_equal(generated_ids, expected.numpy())
    assert texts == tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert texts[0].startswith("A list of colors : red , blue") and texts[1].startswith("Portugal is")


# ---------------------------------------------------------------- 7. msfx without torch

def test_msfx_works_without_torch(tiny, tmp_path):
    torch_model, path = tiny
    ids = random_ids(2, 5, seed=3)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "logits.npy", torch_out(torch_model, ids))
    with torch.no_grad():
        np.save(tmp_path / "generated.npy", torch_model.generate(torch.tensor(ids), max_new_tokens=3,
                                                                 do_sample=False).numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        import msfx
        from mindspore import tensor
        d = {str(tmp_path)!r}
        ids = np.load(d + "/ids.npy")
        model = msfx.LlamaForCausalLM.from_pretrained({str(path)!r})
        logits = model(tensor(ids)).logits.asnumpy()
        assert np.abs(logits - np.load(d + "/logits.npy")).max() <= 1e-4
        out = model.generate(input_ids=tensor(ids), max_new_tokens=3)
        np.testing.assert_array_equal(out, np.load(d + "/generated.npy"))
        assert sys.modules["torch"] is None
        print("OK without torch")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK without torch" in result.stdout
