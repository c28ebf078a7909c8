"""Loading edge cases against HF PyTorch (transformers 5.25) on tiny random checkpoints.

Tied embeddings in each shape of file, a single `model.safetensors` next to a shard index, missing
base tensors (an error, never a random weight) against a missing task head (initialized with a
warning), CLIP's tower and prefixed layouts, and T5's `_keep_in_fp32_modules` under float16.
"""
from __future__ import annotations

import copy
import logging
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from msfx import LlamaForCausalLM, LlamaForSequenceClassification
from msfx.errors import CheckpointError
from msfx.families import FAMILIES
from msfx.models.clip import CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from msfx.models.t5 import T5EncoderModel, T5ForConditionalGeneration
from msfx.params.safetensors_io import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from conftest import make_hf_llama, random_ids
from oracle import assert_close, save_tiny
from test_clip import TEXT, VISION, _pixels, _token_batch
from test_params import hf_load, ms_out, rewrite_checkpoint, saved_keys, torch_out
from test_t5 import IDS as T5_IDS, LABELS as T5_LABELS, MASK as T5_MASK, TINY as T5_TINY

IDS = random_ids(2, 7)
TOL = 1e-4


def _hf_with_info(cls_name: str, path, **kwargs):
    model, info = getattr(transformers, cls_name).from_pretrained(path, output_loading_info=True,
                                                                  attn_implementation="eager", **kwargs)
    return model.eval(), info


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A tiny HF Llama with `tie_word_embeddings=True` (its file holds only `model.embed_tokens.weight`)."""
    return make_hf_llama(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


# ---------------------------------------------------------------- 1. tied embeddings, three shapes of file

def test_tied_checkpoint_with_only_the_embedding_still_loads(tied_llama):
    torch_model, path = tied_llama
    assert "lm_head.weight" not in saved_keys(path)
    model = LlamaForCausalLM.from_pretrained(path)
    assert "lm_head" not in model.params
    assert_close(ms_out(model, IDS), torch_out(torch_model, IDS), TOL,
                 "tied checkpoint with only the embedding still loads")


def test_tied_checkpoint_with_only_the_head_ties_the_embedding_to_it(tied_llama, tmp_path):
    _, path = tied_llama

    def head_only(state):
        state["lm_head.weight"] = state.pop("model.embed_tokens.weight")

    path = rewrite_checkpoint(path, tmp_path / "head_only", head_only)
    hf = hf_load("LlamaForCausalLM", path)  # HF 5.x ties symmetrically: no missing key
    model = LlamaForCausalLM.from_pretrained(path)
    assert "lm_head" not in model.params and model.config.tie_word_embeddings
    assert_close(ms_out(model, IDS), torch_out(hf, IDS), TOL,
                 "tied checkpoint with only the head ties the embedding to it")


def test_tied_checkpoint_with_different_head_keeps_them_apart_and_warns(tied_llama, tmp_path, caplog):
    _, path = tied_llama
    head = torch.randn(*load_file(path / SAFE_WEIGHTS_NAME)["model.embed_tokens.weight"].shape,
                       generator=torch.Generator().manual_seed(3))
    path = rewrite_checkpoint(path, tmp_path / "both", lambda state: state.update({"lm_head.weight": head}))
    hf = hf_load("LlamaForCausalLM", path)
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()  # HF does not tie them
    with caplog.at_level(logging.WARNING, logger="msfx"):
        model = LlamaForCausalLM.from_pretrained(path)
    assert "different values" in caplog.text and "lm_head.weight" in caplog.text
    assert_close(ms_out(model, IDS), torch_out(hf, IDS), TOL,
                 "tied checkpoint with different head keeps them apart and warns")
    # saved untied, it reloads in HF as the same model
    model.save_pretrained(tmp_path / "out")
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= saved_keys(tmp_path / "out")
    np.testing.assert_array_equal(torch_out(hf_load("LlamaForCausalLM", tmp_path / "out"), IDS), torch_out(hf, IDS))


def test_tied_checkpoint_with_an_equal_head_stays_tied(tied_llama, tmp_path, caplog):
    torch_model, path = tied_llama
    path = rewrite_checkpoint(path, tmp_path / "equal", lambda state: state.update(
        {"lm_head.weight": state["model.embed_tokens.weight"].clone()}))
    with caplog.at_level(logging.WARNING, logger="msfx"):
        model = LlamaForCausalLM.from_pretrained(path)
    assert "lm_head" not in model.params and not caplog.text
    assert_close(ms_out(model, IDS), torch_out(torch_model, IDS), TOL, "tied checkpoint with an equal head stays tied")


# ---------------------------------------------------------------- 2. a single file next to an index

def test_single_file_next_to_an_index_is_what_loads(tmp_path):
    torch_model, path = make_hf_llama(tmp_path / "m", seed=0)
    other, _ = make_hf_llama(tmp_path / "other", seed=1)
    other.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    sharded = tmp_path / "sharded"
    for file in [*sharded.glob("model-*-of-*.safetensors"), sharded / SAFE_WEIGHTS_INDEX_NAME]:
        shutil.copy(file, path)  # other weights, sharded, in the same folder
    hf = hf_load("LlamaForCausalLM", path)
    np.testing.assert_array_equal(torch_out(hf, IDS), torch_out(torch_model, IDS))  # HF reads the single file
    model = LlamaForCausalLM.from_pretrained(path)
    assert_close(ms_out(model, IDS), torch_out(hf, IDS), TOL, "single file next to an index is what loads")


# ---------------------------------------------------------------- 3. never a silent random base weight

@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny HF CLIPModel (random norms and biases) and its checkpoint directory."""
    config = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=2), vision_config=VISION, projection_dim=24)
    return save_tiny(transformers.CLIPModel, config, tmp_path_factory.mktemp("clip"), biases=True)


@pytest.fixture(scope="module")
def hf_t5(tmp_path_factory):
    """A tiny HF T5ForConditionalGeneration (relu, tied head; random norms) and its directory."""
    config = transformers.T5Config(**T5_TINY, feed_forward_proj="relu")
    return save_tiny(transformers.T5ForConditionalGeneration, config, tmp_path_factory.mktemp("t5"))


def _without(src, dst, drop):
    return rewrite_checkpoint(src, dst, lambda state: [state.pop(k) for k in [k for k in state if drop(k)]])


def test_clip_missing_base_tensor_raises_naming_it(hf_clip, tmp_path):
    _, path = hf_clip
    path = _without(path, tmp_path / "clip", lambda k: k == "text_model.final_layer_norm.weight")
    with pytest.raises(CheckpointError, match=r"missing tensors: text_model\.final_layer_norm\.weight$"):
        CLIPModel.from_pretrained(path)


def test_t5_missing_decoder_blocks_raise_naming_them(hf_t5, tmp_path):
    _, path = hf_t5
    path = _without(path, tmp_path / "t5", lambda k: k.startswith("decoder.block.1."))
    with pytest.raises(CheckpointError, match=r"missing tensors: decoder\.block\.1\.layer\.0\.SelfAttention\.k"):
        T5ForConditionalGeneration.from_pretrained(path)
    T5EncoderModel.from_pretrained(path)  # the encoder alone is all there


def test_keys_under_an_unknown_prefix_raise(hf_clip, hf_t5, tmp_path):
    llama = make_hf_llama(tmp_path / "llama_source")
    for name, (_, path), cls in (("clip", hf_clip, CLIPModel), ("t5", hf_t5, T5ForConditionalGeneration),
                                 ("llama", llama, LlamaForCausalLM)):
        moved = rewrite_checkpoint(path, tmp_path / name, lambda state: state.update(
            {"wrapper." + k: state.pop(k) for k in list(state)}))
        with pytest.raises(CheckpointError, match=r"missing tensors: .*no checkpoint key fits the model "
                                                  r"\(they start with wrapper\)") as raised:
            cls.from_pretrained(moved)
        if "unexpected tensors" in str(raised.value):  # named as stored, not with the model's prefix added
            assert ", wrapper." in str(raised.value) and ".wrapper." not in str(raised.value), str(raised.value)


def test_a_new_classification_head_is_initialized_with_a_warning(tmp_path, caplog):
    torch_model, path = make_hf_llama(tmp_path / "m")
    with caplog.at_level(logging.WARNING, logger="msfx"):
        model = LlamaForSequenceClassification.from_pretrained(path, num_labels=3)
    assert "newly initialized" in caplog.text and "score.weight" in caplog.text
    np.testing.assert_array_equal(model.params["model"]["norm"]["weight"].asnumpy(),
                                  torch_model.model.norm.weight.detach().numpy())


# ---------------------------------------------------------------- 4. CLIP layouts

def test_clip_towers_load_the_unprefixed_layout_as_hf(hf_clip, tmp_path):
    _, path = hf_clip
    ids, mask = _token_batch(2)
    pixels = _pixels()
    for tower, projection, cls, inputs, field in (
            ("text_model.", "text_projection.weight", CLIPTextModelWithProjection, (ids, mask), "text_embeds"),
            ("vision_model.", "visual_projection.weight", CLIPVisionModelWithProjection, (pixels,), "image_embeds")):
        layout = tmp_path / cls.__name__

        def unprefixed(state):
            kept = {k.removeprefix(tower): v for k, v in state.items() if k.startswith(tower) or k == projection}
            state.clear()
            state.update(kept)

        rewrite_checkpoint(path, layout, unprefixed)
        hf, info = _hf_with_info(cls.__name__, layout)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            expected = getattr(hf(*map(torch.tensor, inputs)), field).numpy()
        ours = getattr(cls.from_pretrained(layout)(*inputs), field).asnumpy()
        assert_close(ours, expected, TOL, f"clip towers load the unprefixed layout as hf: {cls.__name__}")


def test_clip_model_loads_keys_under_hf_base_prefix(hf_clip, tmp_path):
    torch_model, path = hf_clip
    prefixed = rewrite_checkpoint(path, tmp_path / "prefixed", lambda state: state.update(
        {"clip." + k: state.pop(k) for k in list(state)}))
    hf, info = _hf_with_info("CLIPModel", prefixed)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = _token_batch(2)
    pixels = _pixels()
    with torch.no_grad():
        expected = hf(torch.tensor(ids), torch.tensor(pixels), torch.tensor(mask)).logits_per_image.numpy()
    out = CLIPModel.from_pretrained(prefixed)(ids, pixels, mask)
    assert_close(out.logits_per_image.asnumpy(), expected, TOL, "clip model loads keys under hf base prefix")


# ---------------------------------------------------------------- 5. _keep_in_fp32_modules

def test_keep_in_fp32_modules_recorded_as_hf():
    """Every family's record holds its classes' HF `_keep_in_fp32_modules` (and no `_strict` ones)."""
    classes = [(record, name) for record in FAMILIES.values() for _, name in record.auto]
    assert len(classes) > 30
    for record, name in classes:
        hf = getattr(transformers, name)
        assert set(record.keep_in_fp32) == set(hf._keep_in_fp32_modules or ()), name
        assert not hf._keep_in_fp32_modules_strict, name
    assert FAMILIES["t5"].keep_in_fp32 == ("wo",)


def test_t5_float16_keeps_wo_in_float32_and_matches_hf_float16(hf_t5, tmp_path):
    torch_model, path = hf_t5
    torch_model = copy.deepcopy(torch_model)
    with torch.no_grad():  # a `wo` output far beyond float16's range (65504), as in large T5s
        torch_model.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(1e5)
    torch_model.save_pretrained(tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert hf.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    decoder_ids = np.where(T5_LABELS == -100, 0, T5_LABELS)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(T5_IDS), attention_mask=torch.tensor(T5_MASK),
                      decoder_input_ids=torch.tensor(decoder_ids)).logits.float().numpy()
    model = T5ForConditionalGeneration.from_pretrained(tmp_path, dtype="float16")
    wo = model.params["encoder"]["block"][0]["layer"][1]["DenseReluDense"]["wo"]["weight"]
    assert wo.dtype == ms.float32 and model.params["shared"]["weight"].dtype == ms.float16
    out = model(input_ids=T5_IDS, attention_mask=T5_MASK, decoder_input_ids=decoder_ids)
    assert out.logits.dtype == ms.float16
    diff = float(np.abs(out.logits.astype(ms.float32).asnumpy() - expected).max())
    assert diff <= 1e-2, diff  # float16 against float16 (measured 3.9e-3; 0.78 with `wo` cast to float16)
    with torch.no_grad():  # uncached: HF's cache is sized by `num_layers`, fewer than the decoder's blocks
        reference = hf.generate(torch.tensor(T5_IDS), attention_mask=torch.tensor(T5_MASK), max_new_tokens=4,
                                do_sample=False, use_cache=False)
    for jit in (True, False):  # the compiled decoder step and the eager one
        generated = model.generate(T5_IDS, attention_mask=T5_MASK, max_new_tokens=4, do_sample=False, jit=jit)
        np.testing.assert_array_equal(np.asarray(generated), reference.numpy())
