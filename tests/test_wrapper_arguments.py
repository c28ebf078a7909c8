"""HF arguments on every wrapper are honoured or refused, never swallowed.

HF's manual decode loop (`out = model(ids, use_cache=True)`, then `model(next_ids,
past_key_values=out.past_key_values, attention_mask=<one column longer>)`) runs over msfx's
`KVCache` with logits within 1e-4 of HF's `DynamicCache` loop, on a left-padded batch, for Llama,
GPT-2, Mistral and Gemma 2 (sliding windows shorter than the loop) and Qwen3-MoE. On every wrapper class an unknown
keyword raises TypeError (HF 5.25 swallows `foo=1`; msfx is stricter), a known HF argument msfx
lacks raises NotImplementedError naming it unless it has HF's default value, which passes.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor

import msfx
from msfx.models import bart, bert, clip, dinov2, gpt2, llava, siglip, t5, vit, whisper
from msfx.families import FAMILIES as MSFX_FAMILIES

from conftest import left_padded, make_hf_llama, random_ids
from test_encoders import hf_config as encoder_config
from test_bart import TINY as BART
from test_clip import TEXT, VISION
from test_gpt2 import TINY_GPT2, make_hf_gpt2
from test_llama_family import BASE, FAMILIES, make_hf
from test_t5 import TINY as T5
from test_whisper import tiny_config as whisper_config

TOL = 1e-4
STEPS = 5


def hf_positions(mask: np.ndarray) -> np.ndarray:
    """HF generate's positions for a left-padded batch: `cumsum(mask) - 1`, 1 on the padding."""
    return np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)


def manual_loop(run, ids: np.ndarray, mask: np.ndarray, tokens: list, positions: bool) -> list[np.ndarray]:
    """HF's manual decode loop: a prefill with `use_cache=True`, then one token per step with the
    previous output's `past_key_values` and the mask one column longer (and the next positions
    when `positions`). `run(ids, mask, position_ids, past)` returns the output; `tokens` are fed
    in turn, or the greedy ones appended when it is empty. Returns each call's logits."""
    past, logits = None, []
    for step in range(STEPS + 1):
        pos = hf_positions(mask)[:, -ids.shape[1]:] if positions else None
        out = run(ids, mask, pos, past)
        logits.append(np.asarray(out.logits.numpy() if isinstance(out.logits, torch.Tensor) else out.logits.asnumpy()))
        past = out.past_key_values
        if len(tokens) <= step:
            tokens.append(logits[-1][:, -1].argmax(-1)[:, None])
        ids, mask = tokens[step], np.concatenate([mask, np.ones((mask.shape[0], 1), mask.dtype)], 1)
    return logits


def hf_run(model):
    def run(ids, mask, pos, past):
        with torch.no_grad():
            return model(torch.tensor(ids), attention_mask=torch.tensor(mask), use_cache=True,
                         position_ids=None if pos is None else torch.tensor(pos), cache=past)
    return run


def msfx_run(model):
    def run(ids, mask, pos, past):
        return model(Tensor(ids.astype(np.int32)), attention_mask=mask, position_ids=pos, past_key_values=past,
                     use_cache=True)
    return run


DECODERS = {"llama": lambda path: make_hf_llama(path, num_key_value_heads=2),
            "gpt2": lambda path: make_hf_gpt2(path),
            "mistral": lambda path: make_hf(path, "mistral"),  # sliding window 6 < 7 + 5 positions
            "gemma2": lambda path: make_hf(path, "gemma2"),  # soft-caps, sliding and full layers
            "qwen3_moe": lambda path: make_hf(path, "qwen3_moe")}  # MoeForCausalLM


@pytest.mark.parametrize("positions", [False, True], ids=["default_positions", "cumsum_positions"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_manual_decode_loop_with_past_key_values_matches_hf(name, positions, tmp_path):
    torch_model, path = DECODERS[name](tmp_path)
    model = msfx.AutoModelForCausalLM.from_pretrained(path)
    ids, mask = left_padded(2, 7, pads=[0, 3], seed=3)
    tokens = []
    expected = manual_loop(hf_run(torch_model), ids, mask, tokens, positions)
    got = manual_loop(msfx_run(model), ids, mask, tokens, positions)
    diffs = [float(np.abs(ours - theirs).max()) for ours, theirs in zip(got, expected)]
    print(f"\n{name} {positions=}: max abs diff per call {['%.2g' % d for d in diffs]}")
    assert max(diffs) <= TOL, f"{name}: max abs diffs per call {diffs}"


def test_cache_outputs_follow_hf(tmp_path):
    """`use_cache` None means `config.use_cache` (True: a cache comes back, as HF); False gives none;
    the tuple of `return_dict=False` holds it where HF's does; a cache passed comes back grown."""
    torch_model, path = make_hf_llama(tmp_path)
    model = msfx.LlamaForCausalLM.from_pretrained(path)
    ids = random_ids(2, 6, seed=2)
    out = model(Tensor(ids.astype(np.int32)))
    assert isinstance(out.cache, msfx.KVCache) and out.past_key_values is out.cache
    assert [k.shape for k in out.cache.keys] == [(2, 4, 6, 16)] * 2
    assert model(Tensor(ids.astype(np.int32)), use_cache=False).cache is None
    with torch.no_grad():
        theirs = torch_model(torch.tensor(ids), labels=torch.tensor(ids), return_dict=False)
    ours = model(Tensor(ids.astype(np.int32)), labels=ids, return_dict=False)
    assert len(ours) == len(theirs) == 3 and isinstance(ours[2], msfx.KVCache)
    step = model(Tensor(ids[:, :1].astype(np.int32)), cache=out.cache, use_cache=False)
    assert step.cache.keys[0].shape[2] == 7  # HF's cache grows even with use_cache=False


def test_bad_caches_raise_named_errors(tmp_path):
    _, path = make_hf_llama(tmp_path)
    model = msfx.LlamaForCausalLM.from_pretrained(path)
    ids = Tensor(random_ids(2, 4).astype(np.int32))
    past = model(ids).cache
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids, cache=past, past_key_values=past)
    with pytest.raises(NotImplementedError, match="KVCache"):
        model(ids, past_key_values=transformers.DynamicCache())
    with pytest.raises(ValueError, match="batch 1"):
        model(ids[:1], past_key_values=past)
    with pytest.raises(ValueError, match="attention_mask"):  # the mask must cover the past positions too
        model(ids[:, :1], attention_mask=np.ones((2, 1)), past_key_values=past)


# ------------------------------------------------------------------ every wrapper class

def _llama_like(family: str):
    if family == "llama":
        return transformers.LlamaConfig(**BASE)
    config_cls, _, overrides = FAMILIES[family]
    return getattr(transformers, config_cls)(**{**BASE, **overrides})


_IDS = random_ids(1, 5, seed=1)
_PIXELS = np.random.default_rng(0).normal(size=(1, 3, VISION["image_size"], VISION["image_size"])).astype(np.float32)
_CLIP_TEXT = transformers.CLIPTextConfig(**TEXT, eos_token_id=2)
_CLIP_VISION = transformers.CLIPVisionConfig(**VISION)

# class -> (config, inputs)
CLASSES = {MSFX_FAMILIES[family].class_named(name): (_llama_like(family), dict(input_ids=_IDS))
           for family in ["llama", *FAMILIES] for _, name in MSFX_FAMILIES[family].auto}
CLASSES |= {cls: (transformers.GPT2Config(**TINY_GPT2), dict(input_ids=_IDS))
            for cls in (gpt2.GPT2Model, gpt2.GPT2LMHeadModel, gpt2.GPT2ForSequenceClassification)}
CLASSES |= {MSFX_FAMILIES[family].class_named(name): (encoder_config(family), dict(input_ids=_IDS))
            for family in ("bert", "roberta", "xlm-roberta", "distilbert", "modernbert")
            for _, name in MSFX_FAMILIES[family].auto}
CLASSES |= {t5.T5EncoderModel: (transformers.T5Config(**T5), dict(input_ids=_IDS))}
CLASSES |= {cls: (transformers.T5Config(**T5), dict(input_ids=_IDS, decoder_input_ids=_IDS[:, :3]))
            for cls in (t5.T5Model, t5.T5ForConditionalGeneration)}
_BART_IDS = np.concatenate([_IDS[:, :-1] % BART["vocab_size"], [[BART["eos_token_id"]]]], 1)  # the classifier reads eos
CLASSES |= {cls: (config_class(**BART), dict(input_ids=_BART_IDS))
            for config_class, classes in ((transformers.BartConfig, (bart.BartModel, bart.BartForConditionalGeneration,
                                                                      bart.BartForSequenceClassification,
                                                                      bart.BartForQuestionAnswering)),
                                          (transformers.MBartConfig, (bart.MBartModel, bart.MBartForConditionalGeneration,
                                                                       bart.MBartForSequenceClassification,
                                                                       bart.MBartForQuestionAnswering)))
            for cls in classes}
CLASSES |= {cls: (_CLIP_TEXT, dict(input_ids=_IDS)) for cls in (clip.CLIPTextModel, clip.CLIPTextModelWithProjection)}
CLASSES |= {cls: (_CLIP_VISION, dict(pixel_values=_PIXELS))
            for cls in (clip.CLIPVisionModel, clip.CLIPVisionModelWithProjection)}
CLASSES[clip.CLIPModel] = (transformers.CLIPConfig(text_config=_CLIP_TEXT.to_dict(),
                                                   vision_config=_CLIP_VISION.to_dict()),
                           dict(input_ids=_IDS, pixel_values=_PIXELS))
_IMAGE = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
              image_size=VISION["image_size"], patch_size=VISION["patch_size"])
_SIGLIP_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                    max_position_embeddings=16)
CLASSES |= {cls: (transformers.ViTConfig(**_IMAGE, num_labels=3), dict(pixel_values=_PIXELS))
            for cls in (vit.ViTModel, vit.ViTForImageClassification)}
CLASSES |= {cls: (transformers.Dinov2Config(**_IMAGE, num_labels=3), dict(pixel_values=_PIXELS))
            for cls in (dinov2.Dinov2Model, dinov2.Dinov2ForImageClassification)}
CLASSES[siglip.SiglipTextModel] = (transformers.SiglipTextConfig(**_SIGLIP_TEXT), dict(input_ids=_IDS))
CLASSES[siglip.SiglipVisionModel] = (transformers.SiglipVisionConfig(**_IMAGE), dict(pixel_values=_PIXELS))
CLASSES |= {cls: (transformers.SiglipConfig(text_config=_SIGLIP_TEXT, vision_config=_IMAGE, num_labels=3), inputs)
            for cls, inputs in ((siglip.SiglipModel, dict(input_ids=_IDS, pixel_values=_PIXELS)),
                                (siglip.SiglipForImageClassification, dict(pixel_values=_PIXELS)))}
CLASSES[llava.LlavaForConditionalGeneration] = (
    transformers.LlavaConfig(vision_config=_CLIP_VISION, text_config=transformers.LlamaConfig(**BASE),
                             image_token_id=BASE["vocab_size"] - 1), dict(input_ids=_IDS))
_FEATURES = np.random.default_rng(1).normal(size=(1, 8, 2 * whisper_config().max_source_positions)).astype(np.float32)
CLASSES |= {cls: (whisper_config(), dict(input_features=_FEATURES, decoder_input_ids=_IDS[:, :3] % 99))
            for cls in (whisper.WhisperModel, whisper.WhisperForConditionalGeneration)}
# HF's defaults, as the HF Trainer and pipelines pass them: accepted by every class
HF_DEFAULTS = dict(output_attentions=False, output_hidden_states=False, return_dict=True, use_cache=False,
                   past_key_values=None, head_mask=None)

_MODELS: dict[type, object] = {}


def _model(cls):
    if cls not in _MODELS:
        _MODELS[cls] = cls(CLASSES[cls][0])
    return _MODELS[cls]


def test_every_wrapper_class_is_covered():
    exported = {getattr(msfx, name) for name in msfx.__all__}
    wrappers = {c for c in exported if isinstance(c, type) and issubclass(c, msfx.modeling.PreTrainedModel)}
    assert wrappers <= set(CLASSES), wrappers - set(CLASSES)


@pytest.mark.parametrize("cls", list(CLASSES), ids=lambda c: c.__name__)
def test_unknown_arguments_raise_type_error_unsupported_ones_name_themselves_defaults_pass(cls):
    model, inputs = _model(cls), CLASSES[cls][1]
    with pytest.raises(TypeError, match=f"{cls.__name__}.construct.*'foo'"):
        model(**inputs, foo=1)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(**inputs, output_attentions=True)
    with pytest.raises(NotImplementedError, match="cu_seq_lens_q"):
        model(**inputs, cu_seq_lens_q=np.arange(3))
    plain, with_defaults = model(**inputs), model(**inputs, **HF_DEFAULTS)
    np.testing.assert_array_equal(plain[0].asnumpy(), with_defaults[0].asnumpy())
    assert type(model(**inputs, return_dict=None)) is type(plain)  # None: config.return_dict, as HF


@pytest.mark.parametrize("cls, argument", [(t5.T5ForConditionalGeneration, "use_cache"), (bert.BertModel, "labels"),
                                           (t5.T5Model, "output_hidden_states"), (bert.BertModel, "use_cache")])
def test_hf_arguments_without_an_msfx_implementation_are_refused(cls, argument):
    with pytest.raises(NotImplementedError, match=argument):
        _model(cls)(**CLASSES[cls][1], **{argument: True})


def test_clip_feature_methods_are_checked_too():
    model = _model(clip.CLIPModel)
    with pytest.raises(TypeError, match="get_text_features.*'pixel_values'"):
        model.get_text_features(_IDS, pixel_values=_PIXELS)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model.get_image_features(_PIXELS, output_attentions=True)


def test_single_segment_token_type_ids_pass_on_models_without_them():
    """`model(**tokenizer(text))` with a tokenizer that returns all-zero `token_type_ids` works on a
    decoder, as in HF; other segment ids are refused (the model has no segment embedding)."""
    model = _model(msfx.LlamaForCausalLM)
    plain = model(input_ids=_IDS).logits.asnumpy()
    np.testing.assert_array_equal(model(input_ids=_IDS, token_type_ids=np.zeros_like(_IDS)).logits.asnumpy(), plain)
    with pytest.raises(NotImplementedError, match="token_type_ids"):
        model(input_ids=_IDS, token_type_ids=np.ones_like(_IDS))
