"""The HF documentation examples for T5 and CLIP, run as written with only the import swapped to msfx.

The snippets are the docstring examples of `transformers` 5.24 (`T5Model.forward`, `T5EncoderModel.forward`,
`T5ForConditionalGeneration.forward` with `labels`, `CLIPTextModel.forward`), with three changes that
running on MindSpore needs: `from msfx import ...`, `return_tensors="np"`, and `tensor(...)` from mindspore
where the example hands a torch tensor to the model. The hub ids are replaced by local directories holding a
tiny random HF PyTorch checkpoint and an offline tokenizer (a `tokenizers` word-level model wrapped in
`PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained` reads it back). Each snippet's results must
match HF PyTorch run on the same checkpoint and the same ids within 1e-4 (max abs, float32).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

TOL = 1e-4
WORDS = ("studies have been shown that owning a dog is good for you show cute walks in the park "
         "photo of cat").split()
T5_SPECIAL = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(3)]
CLIP_SPECIAL = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>"]
DIFFS: dict[str, float] = {}


def _save_tokenizer(path, special: list[str], template: str, **tokens) -> dict[str, int]:
    """A word-level tokenizer over `special + WORDS` (lower-cased words split on whitespace and
    punctuation), `template` adding its special tokens, saved to `path` with `tokens` as the named
    special tokens (`eos_token="</s>"`). Returns the vocabulary."""
    vocab = {word: i for i, word in enumerate(special + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=tokens["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.normalizer = normalizers.Lowercase()
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in special if t in template])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)
    fast.add_special_tokens({"additional_special_tokens": [t for t in special if t.startswith("<extra_id")]})
    fast.save_pretrained(path)
    return vocab


@pytest.fixture(scope="module", autouse=True)
def _print_measured_diffs():
    yield
    print("\n\nseed snippets, msfx vs HF torch, max abs diffs:")
    for name, value in DIFFS.items():
        print(f"  {name:<40}  {value:.3g}")


def _check(name: str, ours, theirs: torch.Tensor) -> None:
    """Record and check the max abs difference of an msfx result (Tensor) and HF's."""
    ours = ours.asnumpy()
    assert ours.shape == tuple(theirs.shape), name
    DIFFS[name] = diff = float(np.abs(ours.astype(np.float64) - theirs.detach().double().numpy()).max())
    assert diff <= TOL, f"{name}: max abs diff {diff}"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny random T5 v1.1-style checkpoint (gated-gelu, untied lm_head, random layer-norm weights) and
    its tokenizer (`</s>` appended, `<pad>` 0, `<extra_id_*>` sentinels)."""
    path = tmp_path_factory.mktemp("t5_snippet")
    vocab = _save_tokenizer(path, T5_SPECIAL, "$A </s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(vocab) + 4, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP text tower (gelu, explicit end-of-text id) and its tokenizer (start and end of
    text around each row, `<|pad|>` padding)."""
    path = tmp_path_factory.mktemp("clip_snippet")
    vocab = _save_tokenizer(path, CLIP_SPECIAL, "<|startoftext|> $A <|endoftext|>", bos_token="<|startoftext|>",
                            eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<|unk|>")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                         hidden_act="gelu", pad_token_id=vocab["<|pad|>"],
                                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape))
    model.save_pretrained(path)
    return path


def test_clip_text_model_snippet(clip_dir):
    from transformers import AutoTokenizer
    from msfx import CLIPTextModel

    model = CLIPTextModel.from_pretrained(clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)

    inputs = tokenizer(["a photo of a cat", "a photo of a dog"], padding=True, return_tensors="np")

    outputs = model(**inputs)
    last_hidden_state = outputs.last_hidden_state
    pooled_output = outputs.pooler_output  # pooled (EOS token) states

    hf = transformers.CLIPTextModel.from_pretrained(clip_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(**tokenizer(["a photo of a cat", "a photo of a dog"], padding=True, return_tensors="pt"))
    _check("CLIPTextModel last_hidden_state", last_hidden_state, ref.last_hidden_state)
    _check("CLIPTextModel pooled_output", pooled_output, ref.pooler_output)


def test_t5_model_snippet(t5_dir):
    from mindspore import tensor
    from transformers import AutoTokenizer
    from msfx import T5Model

    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    model = T5Model.from_pretrained(t5_dir)

    input_ids = tokenizer(
        "Studies have been shown that owning a dog is good for you", return_tensors="np"
    ).input_ids  # Batch size 1
    decoder_input_ids = tokenizer("Studies show that", return_tensors="np").input_ids  # Batch size 1

    # preprocess: Prepend decoder_input_ids with start token which is pad token for T5Model.
    decoder_input_ids = model._shift_right(tensor(decoder_input_ids))

    # forward pass
    outputs = model(input_ids=tensor(input_ids), decoder_input_ids=decoder_input_ids)
    last_hidden_states = outputs[0]

    assert 2 not in input_ids  # every word is in the vocabulary: no <unk>
    hf = transformers.T5Model.from_pretrained(t5_dir, attn_implementation="eager").eval()
    hf_decoder_input_ids = hf._shift_right(tokenizer("Studies show that", return_tensors="pt").input_ids)
    np.testing.assert_array_equal(decoder_input_ids.asnumpy(), hf_decoder_input_ids.numpy())
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(input_ids), decoder_input_ids=hf_decoder_input_ids)
    _check("T5Model last_hidden_states", last_hidden_states, ref.last_hidden_state)
    _check("T5Model encoder_last_hidden_state", outputs.encoder_last_hidden_state, ref.encoder_last_hidden_state)


def test_t5_encoder_model_snippet(t5_dir):
    from mindspore import tensor
    from transformers import AutoTokenizer
    from msfx import T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    model = T5EncoderModel.from_pretrained(t5_dir)
    input_ids = tokenizer(
        "Studies have been shown that owning a dog is good for you", return_tensors="np"
    ).input_ids  # Batch size 1
    outputs = model(input_ids=tensor(input_ids))
    last_hidden_states = outputs.last_hidden_state

    hf = transformers.T5EncoderModel.from_pretrained(t5_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(input_ids)).last_hidden_state
    _check("T5EncoderModel last_hidden_states", last_hidden_states, ref)


def test_t5_for_conditional_generation_snippet(t5_dir):
    from mindspore import tensor
    from transformers import AutoTokenizer
    from msfx import T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    model = T5ForConditionalGeneration.from_pretrained(t5_dir)

    # training
    input_ids = tokenizer("The <extra_id_0> walks in <extra_id_1> park", return_tensors="np").input_ids
    labels = tokenizer("<extra_id_0> cute dog <extra_id_1> the <extra_id_2>", return_tensors="np").input_ids
    outputs = model(input_ids=tensor(input_ids), labels=tensor(labels))
    loss = outputs.loss
    logits = outputs.logits

    assert {3, 4, 5} <= set(labels[0].tolist())  # the sentinels are single tokens
    hf = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(input_ids), labels=torch.tensor(labels))
    _check("T5ForConditionalGeneration logits", logits, ref.logits)
    _check("T5ForConditionalGeneration loss", loss, ref.loss)
