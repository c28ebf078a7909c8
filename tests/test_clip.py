"""Numerical parity of msfx's CLIP with HF transformers (PyTorch) as the oracle.

Each model is a tiny random HF PyTorch `CLIPModel` (fixed seed, `initializer_factor` 3, random
LayerNorm weights and random biases everywhere, eager attention) saved to disk and loaded into
msfx. In float32 msfx must match torch within 1e-4 (max abs) on a right-padded text batch and
images drawn here and prepared by `CLIPImageProcessor`: both towers' last hidden states, pooled
outputs and every hidden state, the projections, `logits_per_image` / `logits_per_text` and the
loss, for a `quick_gelu` config with the legacy pooling (`eos_token_id == 2`: the largest id) and a
`gelu` config with an explicit end-of-text id. The towers load from their own checkpoints and
from the full one; other image sizes work with `interpolate_pos_encoding`; `save_pretrained`
output reloads in HF; bad inputs give clear errors.

Run with `-s` to see the table of measured max abs diffs printed at the end of the module.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw

import msfx
from msfx.errors import CheckpointError
from msfx.models.clip import (CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel,
                              CLIPVisionModelWithProjection)

from oracle import Diffs, assert_close, save_tiny

TOL = 1e-4
IMAGE, PATCH, SEQ = 30, 10, 10
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=24, pad_token_id=1, bos_token_id=0)
VISION = dict(hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE,
              patch_size=PATCH, projection_dim=24)
CASES = {"quick_gelu_legacy_eos": dict(hidden_act="quick_gelu", eos_token_id=2),
         "gelu_explicit_eos": dict(hidden_act="gelu", eos_token_id=50)}
DIFFS = Diffs("CLIP max abs diffs vs HF (float32):")
_print_measured_diffs = DIFFS.report()


def _token_batch(eos: int) -> tuple[np.ndarray, np.ndarray]:
    """3 rows of SEQ tokens: bos, random tokens, the end-of-text token, right padding (pad id 1;
    for the legacy config the end-of-text token is the vocabulary's largest id, 98)."""
    rng = np.random.default_rng(0)
    end, lengths = (98 if eos == 2 else eos), (SEQ, 7, 4)
    ids = np.ones((3, SEQ), np.int64)
    mask = np.zeros((3, SEQ), np.int64)
    for row, n in enumerate(lengths):
        body = rng.integers(3, 90 if eos == 2 else 99, n - 2)
        body[body == end] = 3  # one end-of-text token per row; ids above `eos` stay (the explicit rule must skip them)
        ids[row, :n] = [0, *body, end]
        mask[row, :n] = 1
    return ids, mask


def _images(size: tuple[int, int] = (48, 40)) -> list[Image.Image]:
    images = []
    for k in range(3):
        image = Image.new("RGB", size, (40 * k, 120, 200 - 50 * k))
        draw = ImageDraw.Draw(image)
        draw.rectangle([5 + 3 * k, 4, 30, 25 + 4 * k], fill=(250, 30 * k, 10))
        draw.ellipse([20, 10 + 5 * k, 45, 38], fill=(0, 200, 90 + 40 * k))
        images.append(image)
    return images


def _pixels(size: int = IMAGE) -> np.ndarray:
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor(images=_images(), return_tensors="np")["pixel_values"]


@pytest.fixture(scope="module", params=list(CASES))
def hf_clip(request, tmp_path_factory):
    """(case name, HF CLIPModel in eval mode, its checkpoint directory)."""
    case = CASES[request.param]
    text = dict(TEXT, hidden_act=case["hidden_act"], eos_token_id=case["eos_token_id"])
    vision = dict(VISION, hidden_act=case["hidden_act"])
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24, initializer_factor=3.0,
                                     logit_scale_init_value=1.5)
    model, path = save_tiny(transformers.CLIPModel, config, tmp_path_factory.mktemp(request.param), biases=True)
    return request.param, model, path


def _compare_tower(name: str, ours, theirs) -> None:
    assert_close(ours.last_hidden_state, theirs.last_hidden_state, TOL, f"{name} last_hidden_state", DIFFS)
    assert_close(ours.pooler_output, theirs.pooler_output, TOL, f"{name} pooler_output", DIFFS)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert_close(a, b, TOL, f"{name} hidden_states[{i}]", DIFFS)


def test_clip_model_matches_hf(hf_clip):
    case, torch_model, path = hf_clip
    ids, mask = _token_batch(torch_model.config.text_config.eos_token_id)
    pixels = _pixels()
    assert pixels.dtype == np.float32 and pixels.shape == (3, 3, IMAGE, IMAGE)
    model = CLIPModel.from_pretrained(path)
    out = model(ids, pixels, mask, return_loss=True, output_hidden_states=True)
    with torch.no_grad():
        expected = torch_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                               attention_mask=torch.tensor(mask), return_loss=True, output_hidden_states=True)
        text_features = torch_model.get_text_features(torch.tensor(ids), torch.tensor(mask)).pooler_output
        image_features = torch_model.get_image_features(torch.tensor(pixels)).pooler_output
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "loss"):
        assert_close(getattr(out, name), getattr(expected, name), TOL, f"{case} {name}", DIFFS)
    _compare_tower(f"{case} text", out.text_model_output, expected.text_model_output)
    _compare_tower(f"{case} vision", out.vision_model_output, expected.vision_model_output)
    assert_close(model.get_text_features(ids, mask).pooler_output, text_features, TOL, f"{case} get_text_features",
                 DIFFS)
    assert_close(model.get_image_features(pixels).pooler_output, image_features, TOL, f"{case} get_image_features",
                 DIFFS)
    assert float(np.abs(out.logits_per_image.asnumpy()).max()) > 0.5  # not vanishingly small
    as_tuple = model(ids, pixels, mask, return_dict=False)  # no loss: the tuple starts at logits_per_image
    np.testing.assert_array_equal(as_tuple[0].asnumpy(), out.logits_per_image.asnumpy())
    assert isinstance(as_tuple[-1], tuple)  # the vision tower's output, as a tuple too


def test_bf16_error_within_torch_bf16_error(hf_clip):
    """bfloat16 `CLIPModel` against the float32 torch reference: msfx's error at most 1.5x (max) /
    1.2x (mean) torch-bf16's (`test_bf16_encoders`' criterion), for quick_gelu and gelu. The 3x3
    `logits_per_image` get the max bound only: a mean of 9 values is noise (gelu: 1.28x torch's mean,
    from embeddings within 1.05x)."""
    from test_bf16_encoders import MAX_FACTOR, _check, _errors, _torch_runs

    case, torch_model, path = hf_clip
    ids, mask = _token_batch(torch_model.config.text_config.eos_token_id)
    pixels = _pixels()
    ref, bf16 = _torch_runs(transformers.CLIPModel, path, input_ids=ids, pixel_values=pixels, attention_mask=mask)
    out = CLIPModel.from_pretrained(path, dtype="bfloat16")(ids, pixels, mask)
    ours_max, torch_max, _, _ = _errors(out.logits_per_image.astype(ms.float32).asnumpy(),
                                        bf16.logits_per_image.float().numpy(), ref.logits_per_image.numpy(), slice(None))
    assert 0 < ours_max <= MAX_FACTOR * torch_max, (ours_max, torch_max)
    for field in ("text_embeds", "image_embeds"):
        _check(f"{case} {field}", getattr(out, field), getattr(bf16, field), getattr(ref, field))
    for field in ("last_hidden_state", "pooler_output"):
        _check(f"{case} vision {field}", getattr(out.vision_model_output, field),
               getattr(bf16.vision_model_output, field), getattr(ref.vision_model_output, field))


def test_towers_load_from_the_full_checkpoint_and_their_own(hf_clip, tmp_path):
    case, torch_model, path = hf_clip
    ids, mask = _token_batch(torch_model.config.text_config.eos_token_id)
    pixels = _pixels()
    with torch.no_grad():
        text = torch_model.text_model(torch.tensor(ids), torch.tensor(mask), output_hidden_states=True)
        vision = torch_model.vision_model(torch.tensor(pixels), output_hidden_states=True)
        text_embeds = torch_model.text_projection(text.pooler_output)
        image_embeds = torch_model.visual_projection(vision.pooler_output)
    # a text-only and a vision-only checkpoint, as HF saves them
    hf_text = transformers.CLIPTextModelWithProjection.from_pretrained(path, attn_implementation="eager")
    hf_text.save_pretrained(tmp_path / "text")
    hf_vision = transformers.CLIPVisionModelWithProjection.from_pretrained(path, attn_implementation="eager")
    hf_vision.save_pretrained(tmp_path / "vision")
    for source in (path, tmp_path / "text"):
        where = "full" if source == path else "own"
        model = CLIPTextModel.from_pretrained(source)
        assert model.config.model_type == "clip_text_model"
        _compare_tower(f"{case} CLIPTextModel ({where})", model(ids, mask, output_hidden_states=True), text)
        out = CLIPTextModelWithProjection.from_pretrained(source)(ids, mask)
        assert_close(out.text_embeds, text_embeds, TOL, f"{case} text_embeds ({where})", DIFFS)
    for source in (path, tmp_path / "vision"):
        where = "full" if source == path else "own"
        model = CLIPVisionModel.from_pretrained(source)
        _compare_tower(f"{case} CLIPVisionModel ({where})", model(pixels, output_hidden_states=True), vision)
        out = CLIPVisionModelWithProjection.from_pretrained(source)(pixels)
        assert_close(out.image_embeds, image_embeds, TOL, f"{case} image_embeds ({where})", DIFFS)
    assert type(msfx.AutoModel.from_pretrained(tmp_path / "text")) is CLIPTextModel
    assert type(msfx.AutoModelForTextEncoding.from_pretrained(tmp_path / "text")) is CLIPTextModel
    assert type(msfx.AutoModel.from_pretrained(tmp_path / "vision")) is CLIPVisionModel
    assert type(msfx.AutoModelForZeroShotImageClassification.from_pretrained(path)) is CLIPModel


@pytest.mark.parametrize("size", [(40, 40), (40, 30), (20, 20)])
def test_interpolate_pos_encoding_matches_hf(hf_clip, size):
    case, torch_model, path = hf_clip
    pixels = np.random.default_rng(1).normal(0, 1, (2, 3, *size)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model.vision_model(torch.tensor(pixels), interpolate_pos_encoding=True)
    out = CLIPVisionModel.from_pretrained(path)(pixels, interpolate_pos_encoding=True)
    assert_close(out.last_hidden_state, expected.last_hidden_state, TOL,
                 f"{case} interpolated {size} last_hidden_state", DIFFS)
    assert_close(out.pooler_output, expected.pooler_output, TOL, f"{case} interpolated {size} pooler_output", DIFFS)


def test_save_pretrained_reloads_in_hf(hf_clip, tmp_path):
    case, torch_model, path = hf_clip
    CLIPModel.from_pretrained(path).save_pretrained(tmp_path / "clip")
    reloaded, info = transformers.CLIPModel.from_pretrained(tmp_path / "clip", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in torch_model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)
    CLIPTextModelWithProjection.from_pretrained(path).save_pretrained(tmp_path / "text")
    text = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "text")
    torch.testing.assert_close(text.text_projection.weight, torch_model.text_projection.weight, rtol=0, atol=0)
    torch.testing.assert_close(text.text_model.final_layer_norm.bias, torch_model.text_model.final_layer_norm.bias,
                               rtol=0, atol=0)
    CLIPVisionModel.from_pretrained(path).save_pretrained(tmp_path / "vision")
    vision, info = transformers.CLIPVisionModel.from_pretrained(tmp_path / "vision", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(vision.pre_layrnorm.weight, torch_model.vision_model.pre_layrnorm.weight, rtol=0, atol=0)


def test_bad_inputs_and_checkpoints_raise_clear_errors(hf_clip, tmp_path):
    case, torch_model, path = hf_clip
    model = CLIPVisionModel.from_pretrained(path)
    pixels = _pixels()
    with pytest.raises(ValueError, match="4 channels, the model expects num_channels=3"):
        model(np.zeros((1, 4, IMAGE, IMAGE), np.float32))
    with pytest.raises(ValueError, match="channels first"):
        model(pixels.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"Input image size \(40\*40\) doesn't match model \(30\*30\)"):
        model(np.zeros((1, 3, 40, 40), np.float32))
    with pytest.raises(ValueError, match=r"\[batch, channels, height, width\]"):
        model(pixels[0])
    with pytest.raises(ValueError, match="floating point"):
        model(np.zeros((1, 3, IMAGE, IMAGE), np.uint8))
    with pytest.raises(ValueError, match="smaller than one patch"):
        model(np.zeros((1, 3, 5, 5), np.float32), interpolate_pos_encoding=True)
    text = CLIPTextModel.from_pretrained(path)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
        text(np.full((1, 17), 5))
    with pytest.raises(ValueError, match="out of range"):
        text(np.array([[0, 99]]))
    CLIPVisionModel.from_pretrained(path).save_pretrained(tmp_path / "vision")
    with pytest.raises(CheckpointError, match="'clip_vision_model' checkpoint; CLIPTextModel needs"):
        CLIPTextModel.from_pretrained(tmp_path / "vision")
    with pytest.raises(CheckpointError, match="'clip_vision_model' checkpoint; this model needs 'clip'"):
        CLIPModel.from_pretrained(tmp_path / "vision")
