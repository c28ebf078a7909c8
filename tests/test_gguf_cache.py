"""`msfx.params.gguf.gguf_checkpoint`: a GGUF file converted once into a cached HF checkpoint
directory (config, float32 safetensors, tokenizer), found again by the file's hash."""
import numpy as np
import pytest
from transformers import AutoTokenizer

from msfx.params import gguf as msfx_gguf
from msfx.params.gguf import gguf_checkpoint, gguf_config, gguf_state_dict, gguf_tokenizer, read_gguf
from msfx.params.safetensors_io import checkpoint_files, iter_tensors

from test_gguf import TOKENS, _tiny_llama_weights, _write_llama


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSFX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _with_scores(writer):
    writer.add_token_scores([0.0] * len(TOKENS))


def test_converted_once_then_read_from_the_cache(tmp_path, cache, monkeypatch):
    path = _write_llama(tmp_path / "tiny.gguf", _tiny_llama_weights(seed=2), metadata=_with_scores)
    reader = read_gguf(path)
    config = gguf_config(reader)
    directory = gguf_checkpoint(path)
    assert directory.parent == cache / "gguf"
    stored = {name: array for name, array, _ in iter_tensors(checkpoint_files(directory))}
    expected = gguf_state_dict(reader, config)
    assert set(stored) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(stored[name], array, err_msg=name)
    text = "abcd cab"
    assert AutoTokenizer.from_pretrained(directory)(text)["input_ids"] == gguf_tokenizer(reader)(text)["input_ids"]

    def fail(*args):
        raise AssertionError("the cached directory should have been used")

    monkeypatch.setattr(msfx_gguf, "read_gguf", fail)
    assert gguf_checkpoint(path) == directory
    assert [p.name for p in (cache / "gguf").iterdir()] == [directory.name]  # no staging left behind


def test_a_changed_file_is_converted_again(tmp_path, cache):
    path = tmp_path / "tiny.gguf"
    first = gguf_checkpoint(_write_llama(path, _tiny_llama_weights(seed=3), metadata=_with_scores))
    second = gguf_checkpoint(_write_llama(path, _tiny_llama_weights(seed=4), metadata=_with_scores))
    assert first != second and len(TOKENS) == gguf_config(read_gguf(str(path))).vocab_size
