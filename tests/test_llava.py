"""LLaVA (`LlavaForConditionalGeneration`) against HF + PyTorch on tiny random checkpoints: logits and
hidden states, greedy and beam generation with images (eager and jit), the processor's numpy path,
the save_pretrained round trip, bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers import CLIPVisionConfig, LlavaConfig

import msfx
from oracle import Diffs, assert_close, save_tiny

IMAGE_TOKEN = 99
PATCHES = 16  # a 32x32 image in 8x8 patches
DIFFS = Diffs("LLaVA, max abs diff vs HF + PyTorch (fp32)")
_report = DIFFS.report()

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8, initializer_range=0.2)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, initializer_range=0.2, max_position_embeddings=128)
# (text model, vision_feature_layer, strategy, projector bias, extra features per image)
CASES = {"llama": (transformers.LlamaConfig(**TEXT, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 10000.0}), -2, "default", True, 0),
         "qwen2": (transformers.Qwen2Config(**TEXT, tie_word_embeddings=True), [-3, -1], "full", False, 1)}


def make_hf(tmp_path, case: str):
    text, layer, strategy, bias, _ = CASES[case]
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                         multimodal_projector_bias=bias)
    return save_tiny(transformers.LlavaForConditionalGeneration, config, tmp_path, seed=0, biases=True)


@pytest.fixture(scope="module", params=list(CASES))
def llava(request, tmp_path_factory):
    torch_model, path = make_hf(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, torch_model, path, msfx.AutoModelForImageTextToText.from_pretrained(path)


def prompts(case: str, images_per_row=(1, 2), length: int = 44, seed: int = 1):
    """Random ids `[rows, length]` with each row's image tokens in runs, and the rows' images."""
    per_image = PATCHES + CASES[case][4]
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, IMAGE_TOKEN, (len(images_per_row), length))
    for row, n in enumerate(images_per_row):
        for i in range(n):
            start = 2 + i * (per_image + 1)
            ids[row, start:start + per_image] = IMAGE_TOKEN
    pixels = rng.normal(size=(sum(images_per_row), 3, 32, 32)).astype(np.float32)
    return ids, pixels


def test_logits_and_hidden_states_match_hf(llava):
    case, torch_model, _, model = llava
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    ids, pixels = prompts(case)
    with torch.no_grad():
        expected = torch_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                               output_hidden_states=True)
    got = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
    assert_close(got.logits, expected.logits, 1e-4, f"{case} logits", DIFFS)
    for i, (ours, theirs) in enumerate(zip(got.hidden_states, expected.hidden_states, strict=True)):
        assert_close(ours, theirs, 1e-4, f"{case} hidden state", DIFFS)
    # the images matter: other pixels change the logits
    other = model(input_ids=ids, pixel_values=pixels[::-1].copy()).logits.asnumpy()
    assert np.abs(other - got.logits.asnumpy()).max() > 1e-2


@pytest.mark.parametrize("jit", [False, True])
def test_greedy_generate_with_images_matches_hf(llava, jit):
    case, torch_model, _, model = llava
    ids, pixels = prompts(case, seed=2)
    mask = np.ones_like(ids)
    mask[0, :1] = 0  # a left-padded row
    ours = model.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=10, do_sample=False, jit=jit)
    with torch.no_grad():
        theirs = torch_model.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                                      attention_mask=torch.tensor(mask), max_new_tokens=10, do_sample=False)
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_beam_search_with_images_matches_hf(llava):
    case, torch_model, _, model = llava
    ids, pixels = prompts(case, images_per_row=(1,), seed=3)
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    ours = model.generate(ids, pixel_values=pixels, **kwargs)
    with torch.no_grad():
        theirs = torch_model.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), **kwargs)
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_bf16_error_within_torch_bf16_error(llava):
    """bfloat16 logits with images against the float32 torch reference: msfx's error at most 1.5x
    (max) / 1.2x (mean) torch-bf16's (`test_bf16_encoders`' criterion); generation with images runs
    (eagerly: no CPU bf16 graphs)."""
    from test_bf16_encoders import _check, _torch_runs

    case, _, path, _ = llava
    ids, pixels = prompts(case)
    ref, bf16 = _torch_runs(transformers.LlavaForConditionalGeneration, path, input_ids=ids, pixel_values=pixels)
    model = msfx.AutoModelForImageTextToText.from_pretrained(path, dtype="bfloat16")
    _check(f"{case} logits", model(input_ids=ids, pixel_values=pixels).logits, bf16.logits, ref.logits)
    assert model.generate(ids, pixel_values=pixels, max_new_tokens=2).shape == (2, ids.shape[1] + 2)


def test_processor_numpy_path_and_chat_prompt(tmp_path):
    """`LlavaProcessor` with `return_tensors="np"` expands `<image>` to the patch tokens as HF does;
    generate on its output equals HF's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch_model, path = make_hf(tmp_path / "ck", "llama")
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(IMAGE_TOKEN - 4)] + ["<image>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>", pad_token="<pad>",
                                                     extra_special_tokens={"image_token": "<image>"})
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                         crop_size={"height": 32, "width": 32})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                            vision_feature_select_strategy="default", image_token="<image>",
                                            num_additional_image_tokens=1)
    image = (np.random.default_rng(4).random((40, 48, 3)) * 255).astype(np.uint8)
    inputs = processor(images=[image], text=["w1 <image> w5 w9 w20"], return_tensors="np")
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == PATCHES
    model = msfx.LlavaForConditionalGeneration.from_pretrained(path)
    ours = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        theirs = torch_model.generate(**{k: torch.tensor(v) for k, v in inputs.items()}, max_new_tokens=6,
                                      do_sample=False)
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_save_pretrained_loads_back_in_hf(llava, tmp_path):
    case, torch_model, _, model = llava
    model.save_pretrained(tmp_path)
    reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for (name, ours), theirs in zip(reloaded.state_dict().items(), torch_model.state_dict().values(), strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=name)


def test_bad_inputs_are_refused_before_the_model(llava):
    case, _, _, model = llava
    ids, pixels = prompts(case)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=ids, pixel_values=pixels[:2])  # 3 images' tokens, 2 images
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model.generate(ids, pixel_values=pixels[:1], max_new_tokens=2)
    with pytest.raises(ValueError, match="image size"):
        model(input_ids=ids, pixel_values=pixels[:, :, :24, :24])  # not the configured 32x32
    with pytest.raises(ValueError, match="token id 1[0-9][0-9] in input_ids is out of range"):
        model(input_ids=ids + 100, pixel_values=pixels)
