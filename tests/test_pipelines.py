"""`msfx.pipeline` against `transformers.pipeline` (PyTorch) on the same tiny random checkpoints.

Each task runs both pipelines on the same inputs and arguments and compares the outputs: the same
dicts and strings, scores within 1e-4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import make_hf_llama
from test_generate_outputs import tiny_tokenizer
from test_gpt2 import make_hf_gpt2

import msfx
from msfx import GPT2LMHeadModel, LlamaForCausalLM

TOL = 1e-4
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w7 w8{% endif %}")


def assert_same(ours, theirs, path: str = "output") -> None:
    """Equal structure, strings and ints; floats (scores) within TOL."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), path
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{path}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(theirs, (float, np.floating)):  # HF's numpy scores (token-classification) keep their type
        same_kind = type(ours) is type(theirs) if isinstance(theirs, np.floating) else isinstance(ours, float)
        assert same_kind and abs(ours - theirs) <= TOL, f"{path}: {ours!r} vs {theirs!r}"
    elif isinstance(theirs, (np.ndarray, torch.Tensor)):
        theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=0, err_msg=path)
    else:
        assert type(ours) is type(theirs) and ours == theirs, f"{path}: {ours!r} vs {theirs!r}"


def assert_same_ranking(ours, theirs) -> None:
    """Zero-shot results (a list of `{"score", "label"}` per input): the same score per label within TOL,
    sorted by score as HF's. Labels whose scores tie within TOL may come in either order (a tiny CLIP
    scored two labels 0.5 and 0.5, torch 0.5 and 0.49999997)."""
    if theirs and isinstance(theirs[0], list):
        assert isinstance(ours, list) and len(ours) == len(theirs)
        return [assert_same_ranking(a, b) for a, b in zip(ours, theirs)]
    assert_same({r["label"]: r["score"] for r in ours}, {r["label"]: r["score"] for r in theirs})
    assert [r["score"] for r in ours] == sorted((r["score"] for r in ours), reverse=True)
    for a, b in zip(ours, theirs):
        assert a["label"] == b["label"] or abs(a["score"] - b["score"]) <= TOL, f"{ours} vs {theirs}"


def chat_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"  # the pipelines switch it to left, as HF's does
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------- text-generation

@pytest.fixture(scope="module")
def causal_lms(tmp_path_factory):
    """{name: (torch model, checkpoint dir with the tokenizer)} for a tiny Llama and a tiny GPT-2."""
    built = {"llama": make_hf_llama(tmp_path_factory.mktemp("llama")),
             "gpt2": make_hf_gpt2(tmp_path_factory.mktemp("gpt2"))}
    for _, path in built.values():
        chat_tokenizer().save_pretrained(path)
    return built


PROMPTS = ["w5 w9 w13", "w40 w2 w17 w80 w33 w61", "w3"]
CHAT = [{"role": "user", "content": "w10 w11 w12"}]
GENERATION_CASES = {
    "string": ("w5 w9 w13", dict(max_new_tokens=6)),
    "strings_batched_new_text": (PROMPTS, dict(max_new_tokens=5, batch_size=2, return_full_text=False)),
    "strings_one_by_one_tensors": (PROMPTS[:2], dict(max_new_tokens=4, return_tensors=True)),
    "beams_two_sequences": ("w20 w21", dict(max_new_tokens=4, num_beams=3, num_return_sequences=2)),
    "repetition_penalty_max_length": ("w30 w31 w32", dict(max_length=12, repetition_penalty=1.3)),
    "prefix_max_length": ("w5 w9", dict(prefix="w60 w61 w62 ", max_length=9)),
    "chat": (CHAT, dict(max_new_tokens=5)),
    "chats_batched": ([CHAT, CHAT + [{"role": "assistant", "content": "w50"}]], dict(max_new_tokens=3, batch_size=2)),
    "chat_prefill_new_text": (CHAT + [{"role": "assistant", "content": "w50 w51"}],
                              dict(max_new_tokens=3, return_full_text=False)),
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(GENERATION_CASES))
def test_text_generation_matches_hf(causal_lms, family, case):
    torch_model, path = causal_lms[family]
    inputs, kwargs = GENERATION_CASES[case]
    theirs = transformers.pipeline("text-generation", model=torch_model, tokenizer=chat_tokenizer())(
        inputs, do_sample=False, **kwargs)
    ours = msfx.pipeline("text-generation", model=str(path))(inputs, do_sample=False, **kwargs)
    assert_same(ours, theirs)


def test_text_generation_takes_a_model_instance_and_construction_kwargs(causal_lms):
    torch_model, path = causal_lms["llama"]
    kwargs = dict(max_new_tokens=4, do_sample=False, batch_size=3)
    theirs = transformers.pipeline("text-generation", model=torch_model, tokenizer=chat_tokenizer(), **kwargs)(PROMPTS)
    generator = msfx.pipeline("text-generation", model=LlamaForCausalLM.from_pretrained(path),
                              tokenizer=chat_tokenizer(), **kwargs)
    assert generator.tokenizer.padding_side == "left"
    assert_same(generator(PROMPTS), theirs)
    # stop_sequence becomes generate's stop_strings, as in HF (HF's stop-string matcher needs a real
    # tokenizer decoder, which the word-level test tokenizer lacks; msfx's matcher is tested in test_stop_strings)
    assert generator._sanitize_parameters(stop_sequence="w38")[1] == {"stop_strings": ["w38"],
                                                                      "tokenizer": generator.tokenizer}
    # a call's kwargs override the construction ones
    assert len(generator("w5", max_new_tokens=2, return_tensors=True)[0]["generated_token_ids"]) == 1 + 1 + 2


@pytest.mark.parametrize("init, call", [({}, {}), ({}, dict(do_sample=False)), (dict(max_length=30), {}),
                                        (dict(temperature=0.2), dict(max_new_tokens=3, do_sample=True))])
def test_generation_defaults_are_hf_pipelines(causal_lms, init, call):
    """HF's pipeline defaults (256 new tokens, sampling at 0.7) fill only what the call, the construction
    and the checkpoint's generation config leave unset (the sampling ones only when sampling)."""
    torch_model, path = causal_lms["llama"]
    theirs = transformers.pipeline("text-generation", model=torch_model, tokenizer=chat_tokenizer(), **init)
    ours = msfx.pipeline("text-generation", model=str(path), **init)
    assert ours._prepare_generate_kwargs(dict(call)) == theirs._prepare_generate_kwargs(dict(call))


def test_pipeline_errors_name_the_fix(causal_lms):
    _, path = causal_lms["gpt2"]
    with pytest.raises(ValueError, match="needs model=.*hub id or local directory"):
        msfx.pipeline("text-generation")
    with pytest.raises(ValueError, match="Unknown task 'text-to-video'.*text-generation"):
        msfx.pipeline("text-to-video", model=str(path))
    with pytest.raises(ValueError, match="needs a task"):
        msfx.pipeline(model=str(path))
    with pytest.raises(ValueError, match="needs tokenizer="):
        msfx.pipeline("text-generation", model=GPT2LMHeadModel.from_pretrained(path))
    with pytest.raises(ValueError, match="return_full_text"):
        msfx.pipeline("text-generation", model=str(path))("w3", return_full_text=False, return_text=True)
    with pytest.raises(NotImplementedError, match="handle_long_generation"):
        msfx.pipeline("text-generation", model=str(path))("w3", handle_long_generation="hole")
    with pytest.raises(TypeError, match="msfx model, got transformers.*GPT2LMHeadModel"):
        msfx.pipeline("text-generation", model=causal_lms["gpt2"][0], tokenizer=chat_tokenizer())
    with pytest.raises(ValueError, match="GPT2Model has no `generate`"):
        msfx.pipeline("text-generation", model=msfx.GPT2Model.from_pretrained(path), tokenizer=chat_tokenizer())


# ---------------------------------------------------------------- fill-mask, feature-extraction, text-classification

LABELS = {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}


def bert_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A WordPiece tokenizer over the tiny BERT's 99 ids ([PAD] is id 0, as its config's pad_token_id)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    return transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """{head: (torch model, checkpoint dir with its tokenizer)}: tiny BERTs, and Llama / GPT-2 classifiers."""
    from test_bert import make_hf_bert

    built = {}
    for cls in ("BertForMaskedLM", "BertModel", "BertForSequenceClassification"):
        path = tmp_path_factory.mktemp(cls)
        built[cls] = make_hf_bert(path, cls, id2label=LABELS)
        bert_tokenizer().save_pretrained(path)
    built["llama"] = make_hf_llama(tmp_path_factory.mktemp("llama_cls"), cls_name="LlamaForSequenceClassification",
                                   id2label=LABELS)
    built["gpt2"] = make_hf_gpt2(tmp_path_factory.mktemp("gpt2_cls"), "GPT2ForSequenceClassification",
                                 id2label=LABELS)
    for name in ("llama", "gpt2"):
        tiny_tokenizer().save_pretrained(built[name][1])
    return built


def run_both(task: str, torch_model, path, inputs, **kwargs):
    theirs = transformers.pipeline(task, model=torch_model, tokenizer=transformers.AutoTokenizer.from_pretrained(path))(
        inputs, **kwargs)
    ours = msfx.pipeline(task, model=str(path))(inputs, **kwargs)
    return ours, theirs


FILL_MASK_CASES = {
    "one_mask": ("w5 [MASK] w9 w13", {}),
    "top_k_2": ("w5 [MASK] w9", dict(top_k=2)),
    "targets": ("w5 [MASK] w9", dict(targets=["w7", "w8", "w40", "w8"])),
    "two_masks": ("[MASK] w5 [MASK] w9", dict(top_k=3)),
    "list_batched": (["w5 [MASK] w9", "w1 w2 w3 w4 [MASK] w6 w7"], dict(batch_size=2)),
    "list_of_one": (["w5 [MASK] w9"], dict(top_k=2)),
}


@pytest.mark.parametrize("case", list(FILL_MASK_CASES))
def test_fill_mask_matches_hf(encoders, case):
    inputs, kwargs = FILL_MASK_CASES[case]
    assert_same(*run_both("fill-mask", *encoders["BertForMaskedLM"], inputs, **kwargs))


def test_fill_mask_without_a_mask_raises(encoders):
    with pytest.raises(ValueError, match=r"no mask_token \(\[MASK\]\)"):
        msfx.pipeline("fill-mask", model=str(encoders["BertForMaskedLM"][1]))("w5 w9")


@pytest.mark.parametrize("inputs, kwargs", [("w5 w9 w13", {}), (["w5 w9", "w1 w2 w3 w4 w5"], dict(batch_size=2)),
                                            ("w5 w9 w13 w40", dict(truncation=True))])
def test_feature_extraction_matches_hf(encoders, inputs, kwargs):
    ours, theirs = run_both("feature-extraction", *encoders["BertModel"], inputs, **kwargs)
    assert_same(ours, theirs)  # nested lists of python floats
    ours = msfx.pipeline("feature-extraction", model=str(encoders["BertModel"][1]))("w5 w9", return_tensors=True)
    theirs = transformers.pipeline("feature-extraction", model=encoders["BertModel"][0],
                                   tokenizer=bert_tokenizer())("w5 w9", return_tensors=True)
    assert tuple(ours.shape) == tuple(theirs.shape) == (1, 4, 64)
    assert_same(ours.asnumpy(), theirs)


CLASSIFICATION_CASES = {
    "string": ("w5 w9 w13", {}),
    "top_k_none": ("w5 w9 w13", dict(top_k=None)),
    "top_k_2_sigmoid": ("w5 w9", dict(top_k=2, function_to_apply="sigmoid")),
    "none_function": ("w5 w9", dict(function_to_apply="none")),
    "list_batched": (["w5 w9", "w1 w2 w3 w4 w5 w6", "w8"], dict(batch_size=2)),
    "list_top_k_1": (["w5 w9", "w8 w11"], dict(top_k=1)),
}


@pytest.mark.parametrize("head", ["BertForSequenceClassification", "llama", "gpt2"])
@pytest.mark.parametrize("case", list(CLASSIFICATION_CASES))
def test_text_classification_matches_hf(encoders, head, case):
    inputs, kwargs = CLASSIFICATION_CASES[case]
    assert_same(*run_both("text-classification", *encoders[head], inputs, **kwargs))


def test_sentiment_analysis_alias_and_text_pairs(encoders):
    torch_model, path = encoders["BertForSequenceClassification"]
    pair = {"text": "w5 w9", "text_pair": "w10 w11 w12"}
    assert_same(*run_both("sentiment-analysis", torch_model, path, pair, top_k=None))
    assert_same(*run_both("sentiment-analysis", torch_model, path, [pair, pair]))
    with pytest.raises(ValueError, match="function_to_apply"):
        msfx.pipeline("sentiment-analysis", model=str(path))("w5", function_to_apply="tanh")


# ---------------------------------------------------------------- text2text-generation, summarization, translation
# transformers 5 removed these pipelines: the oracle is HF torch `generate` on the input with the config's
# task prefix and task params, as transformers 4.x's pipelines applied them (pipeline defaults
# max_new_tokens=256, num_beams=4 where neither the task nor the call sets them).

from test_t5 import hf_t5  # noqa: E402,F401  (the tiny T5 checkpoints of test_t5, relu and gated-gelu)

TASK_PARAMS = {"summarization": {"prefix": "w90 w91 ", "num_beams": 2, "max_length": 9, "min_length": 4,
                                 "no_repeat_ngram_size": 3, "length_penalty": 2.0, "early_stopping": True},
               "translation_en_to_de": {"prefix": "w80 ", "max_length": 8, "num_beams": 3}}


def t5_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over T5's 99 ids (pad 0, eos 1, unk 2), appending </s> as T5's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(96)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                                                pad_token="<pad>")


@pytest.fixture(scope="module")
def t5_checkpoint(hf_t5, tmp_path_factory):
    """(torch T5, directory): test_t5's checkpoint re-saved with `task_specific_params` and the tokenizer."""
    _, torch_model, _ = hf_t5
    torch_model.config.task_specific_params = TASK_PARAMS
    path = tmp_path_factory.mktemp("t5_tasks")
    torch_model.save_pretrained(path)
    t5_tokenizer().save_pretrained(path)
    return torch_model, path


def hf_seq2seq(torch_model, texts: list[str], prefix: str = "", **generate_kwargs) -> list[list[int]]:
    """HF torch generate, one text at a time (as the pipeline runs batch_size=1), special tokens dropped."""
    tokenizer = t5_tokenizer()
    outputs = []
    for text in texts:
        ids = tokenizer(prefix + text, return_tensors="pt")
        with torch.no_grad():
            generated = torch_model.generate(**ids, **generate_kwargs, use_cache=False)  # as test_t5 (HF cache bug)
        outputs.append([tokenizer.decode(row, skip_special_tokens=True) for row in generated])
    return outputs


TEXTS = ["w5 w9 w13 w40", "w7 w70 w3"]


def test_text2text_generation_matches_hf_generate(t5_checkpoint):
    torch_model, path = t5_checkpoint
    pipe = msfx.pipeline("text2text-generation", model=str(path))
    expected = hf_seq2seq(torch_model, TEXTS, max_new_tokens=5, num_beams=4)
    assert all(len(rows[0].split()) >= 2 for rows in expected)  # real words, not only eos
    assert pipe(TEXTS, max_new_tokens=5) == [{"generated_text": rows[0]} for rows in expected]
    expected = hf_seq2seq(torch_model, TEXTS[:1], max_new_tokens=4, num_beams=3, num_return_sequences=2)[0]
    assert pipe(TEXTS[0], max_new_tokens=4, num_beams=3, num_return_sequences=2) == [
        {"generated_text": text} for text in expected]
    tokens = pipe(TEXTS[0], max_new_tokens=4, return_tensors=True)[0]["generated_token_ids"]
    assert t5_tokenizer().decode(tokens, skip_special_tokens=True) == hf_seq2seq(
        torch_model, TEXTS[:1], max_new_tokens=4, num_beams=4)[0][0]


def test_feature_extraction_of_the_t5_encoder_matches_hf(t5_checkpoint):
    _, path = t5_checkpoint
    encoder = transformers.T5EncoderModel.from_pretrained(path, attn_implementation="eager").eval()
    theirs = transformers.pipeline("feature-extraction", model=encoder, tokenizer=t5_tokenizer())(TEXTS, batch_size=2)
    ours = msfx.pipeline("feature-extraction", model=msfx.T5EncoderModel.from_pretrained(path),
                         tokenizer=t5_tokenizer())(TEXTS, batch_size=2)
    assert_same(ours, theirs)


@pytest.mark.parametrize("task, key, params", [("summarization", "summary_text", "summarization"),
                                               ("translation_en_to_de", "translation_text", "translation_en_to_de"),
                                               ("translation", "translation_text", "translation_en_to_de")])
def test_task_prefixes_and_params_from_the_config(t5_checkpoint, task, key, params):
    torch_model, path = t5_checkpoint
    task_params = dict(TASK_PARAMS[params])
    prefix = task_params.pop("prefix")
    pipe = msfx.pipeline(task, model=str(path))
    assert pipe.prefix == prefix
    expected = hf_seq2seq(torch_model, TEXTS, prefix, **task_params)
    assert all(len(rows[0].split()) >= 2 for rows in expected)
    assert pipe(TEXTS) == [{key: rows[0]} for rows in expected]
    # the call's kwargs win over the task's
    expected = hf_seq2seq(torch_model, TEXTS[:1], prefix, **{**task_params, "num_beams": 1, "min_length": 0})
    assert pipe(TEXTS[0], num_beams=1, min_length=0) == [{key: expected[0][0]}]


# ---------------------------------------------------------------- zero-shot-image-classification

from test_clip import IMAGE, _images, hf_clip  # noqa: E402,F401  (test_clip's tiny CLIP checkpoints)


def clip_image_processor() -> transformers.CLIPImageProcessor:
    return transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})


@pytest.fixture(scope="module")
def clip_checkpoint(hf_clip):
    """(torch CLIPModel, directory with its tokenizer and image processor saved next to the weights)."""
    _, torch_model, path = hf_clip
    tiny_tokenizer().save_pretrained(path)
    clip_image_processor().save_pretrained(path)
    return torch_model, path


ZERO_SHOT_CASES = {
    "one_image": (0, dict(candidate_labels=["w10", "w11 w12", "w13"])),
    "template": (1, dict(candidate_labels=["w10", "w20"], hypothesis_template="w4 w5 {} w6")),
    "images_batched": ([0, 1, 2], dict(candidate_labels=["w10", "w11 w12", "w13"], batch_size=2)),
    "one_label": (2, dict(candidate_labels=["w30"])),
}


@pytest.mark.parametrize("case", list(ZERO_SHOT_CASES))
def test_zero_shot_image_classification_matches_hf(clip_checkpoint, case):
    torch_model, path = clip_checkpoint
    which, kwargs = ZERO_SHOT_CASES[case]
    images = _images()
    inputs = [images[i] for i in which] if isinstance(which, list) else images[which]
    theirs = transformers.pipeline("zero-shot-image-classification", model=torch_model, tokenizer=tiny_tokenizer(),
                                   image_processor=clip_image_processor())(inputs, **kwargs)
    ours = msfx.pipeline("zero-shot-image-classification", model=str(path))(inputs, **kwargs)
    assert_same_ranking(ours, theirs)


def test_zero_shot_takes_a_model_instance_with_a_processor_and_image_paths(clip_checkpoint, tmp_path):
    torch_model, path = clip_checkpoint
    image_path = tmp_path / "image.png"
    _images()[0].save(image_path)
    labels = ["w10", "w11 w12"]
    theirs = transformers.pipeline("zero-shot-image-classification", model=torch_model, tokenizer=tiny_tokenizer(),
                                   image_processor=clip_image_processor())(str(image_path), candidate_labels=labels)
    processor = transformers.CLIPProcessor(image_processor=clip_image_processor(), tokenizer=tiny_tokenizer())
    classifier = msfx.pipeline("zero-shot-image-classification", model=msfx.CLIPModel.from_pretrained(path),
                               processor=processor)
    assert_same(classifier(str(image_path), candidate_labels=labels), theirs)
    with pytest.raises(ValueError, match="candidate_labels"):
        classifier(str(image_path))


# ---------------------------------------------------------------- image-classification, SigLIP zero-shot

from test_vision import (dinov2_dirs, dinov2_processor, siglip_dirs, siglip_processor, vit_dirs,  # noqa: E402,F401
                         vit_processor)  # (test_vision's tiny checkpoints and numpy image processors)


@pytest.fixture(scope="module")
def classifiers(vit_dirs, dinov2_dirs, siglip_dirs):
    """{family: (torch classifier, dir with its image processor saved beside the weights, processor)}."""
    built = {"vit": (*vit_dirs["gelu"]["ViTForImageClassification"], vit_processor()),
             "dinov2": (*dinov2_dirs["mlp"]["Dinov2ForImageClassification"], dinov2_processor()),
             "siglip": (*siglip_dirs["SiglipForImageClassification"], siglip_processor())}
    for _, path, processor in built.values():
        processor.save_pretrained(path)
    return built


IMAGE_CLASSIFICATION_CASES = {
    "one_image": ("vit", 0, {}),
    "images_batched_top_k": ("vit", [0, 1, 2], dict(batch_size=2, top_k=2)),
    "sigmoid": ("vit", 1, dict(function_to_apply="sigmoid", top_k=1)),
    "dinov2": ("dinov2", [2, 0], dict(top_k=3)),
    "siglip": ("siglip", 1, dict(function_to_apply="none")),
}


@pytest.mark.parametrize("case", list(IMAGE_CLASSIFICATION_CASES))
def test_image_classification_matches_hf(classifiers, case):
    family, which, kwargs = IMAGE_CLASSIFICATION_CASES[case]
    torch_model, path, processor = classifiers[family]
    images = _images()
    inputs = [images[i] for i in which] if isinstance(which, list) else images[which]
    theirs = transformers.pipeline("image-classification", model=torch_model, image_processor=processor)(
        inputs, **kwargs)
    assert_same(msfx.pipeline("image-classification", model=str(path))(inputs, **kwargs), theirs)


def test_image_classification_takes_a_model_instance_and_image_paths(classifiers, tmp_path):
    torch_model, path, processor = classifiers["vit"]
    image_path = tmp_path / "image.png"
    _images()[2].save(image_path)
    theirs = transformers.pipeline("image-classification", model=torch_model, image_processor=processor)(
        str(image_path))
    classifier = msfx.pipeline("image-classification", model=msfx.ViTForImageClassification.from_pretrained(path),
                               image_processor=processor)
    assert_same(classifier(images=str(image_path)), theirs)
    with pytest.raises(ValueError, match="without an inputs argument"):
        classifier()
    with pytest.raises(ValueError, match="Unrecognized `function_to_apply` argument: max"):
        classifier(str(image_path), function_to_apply="max")


@pytest.fixture(scope="module")
def siglip_checkpoint(siglip_dirs):
    """(torch SiglipModel, directory with its tokenizer and image processor saved next to the weights)."""
    torch_model, path = siglip_dirs["SiglipModel"]
    tiny_tokenizer().save_pretrained(path)
    siglip_processor().save_pretrained(path)
    return torch_model, path


@pytest.mark.parametrize("case", ["one_image", "images_batched", "one_label"])
def test_zero_shot_image_classification_with_siglip_matches_hf(siglip_checkpoint, case):
    """HF's SigLIP rules: texts padded to 64 tokens, each label scored by its own sigmoid."""
    torch_model, path = siglip_checkpoint
    which, kwargs = ZERO_SHOT_CASES[case]
    images = _images()
    inputs = [images[i] for i in which] if isinstance(which, list) else images[which]
    theirs = transformers.pipeline("zero-shot-image-classification", model=torch_model, tokenizer=tiny_tokenizer(),
                                   image_processor=siglip_processor())(inputs, **kwargs)
    ours = msfx.pipeline("zero-shot-image-classification", model=str(path))(inputs, **kwargs)
    assert_same_ranking(ours, theirs)
    scores = [r["score"] for r in (ours[0] if isinstance(which, list) else ours)]
    assert len(scores) == 1 or abs(sum(scores) - 1) > 1e-3  # sigmoids, not a softmax


# ---------------------------------------------------------------- without torch

def test_pipelines_run_without_torch(causal_lms, encoders, clip_checkpoint, classifiers, siglip_checkpoint, tmp_path):
    """In a process where `import torch` fails, each task family gives the outputs it gives here."""
    import json
    import subprocess
    import sys
    import textwrap

    image_path = tmp_path / "image.png"
    _images()[0].save(image_path)
    calls = [("text-generation", str(causal_lms["llama"][1]), "w5 w9 w13", dict(max_new_tokens=4, do_sample=False)),
             ("fill-mask", str(encoders["BertForMaskedLM"][1]), "w5 [MASK] w9", dict(top_k=2)),
             ("sentiment-analysis", str(encoders["llama"][1]), "w5 w9", {}),
             ("zero-shot-image-classification", str(clip_checkpoint[1]), str(image_path),
              dict(candidate_labels=["w10", "w11"])),
             ("zero-shot-image-classification", str(siglip_checkpoint[1]), str(image_path),
              dict(candidate_labels=["w10", "w11"])),
             ("image-classification", str(classifiers["dinov2"][1]), str(image_path), dict(top_k=2))]
    expected = [msfx.pipeline(task, model=path)(inputs, **kwargs) for task, path, inputs, kwargs in calls]
    (tmp_path / "calls.json").write_text(json.dumps(calls))
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import msfx
        calls = json.load(open({str(tmp_path / "calls.json")!r}))
        print(json.dumps([msfx.pipeline(task, model=path)(inputs, **kwargs) for task, path, inputs, kwargs in calls]))
        assert sys.modules["torch"] is None
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same(json.loads(result.stdout.strip().splitlines()[-1]), json.loads(json.dumps(expected)))
