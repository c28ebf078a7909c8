"""The Llama-like families (every `msfx.families` record with a `DecoderSpec`: Qwen2/3, Qwen3-MoE, Mistral,
Mixtral, Phi, Phi-3, Gemma 1/2/3, Granite, StableLM, StarCoder2, GPT-NeoX, OLMo 1/2, SmolLM3) vs HF.

Each family is built tiny with its PyTorch class (random norm weights and biases,
`initializer_range` 0.2, eager attention), saved, and loaded through `msfx.AutoModelForCausalLM`:
logits and every hidden state within 1e-4 (Gemma 2 with both soft-caps set; for the MoE
families also the router logits, the load-balancing loss and the loss with it); greedy `generate`
token-for-token on a left-padded batch, with prompts longer than the sliding window where the
family has one; `save_pretrained` loads back in HF; `...ForSequenceClassification` for the families
whose layout is not Llama's.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import msfx
import msfx.families

from conftest import random_ids
from oracle import save_tiny

BASE = dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, rms_norm_eps=1e-5,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

# one row per Llama-like family of `msfx.families`: the tiny model's config overrides
OVERRIDES = {
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3": dict(head_dim=24, attention_bias=True, use_sliding_window=True, sliding_window=6, max_window_layers=2),
    "mistral": dict(sliding_window=6, head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                   final_logit_softcapping=2.5, tie_word_embeddings=True),
    "gemma3_text": dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24, num_hidden_layers=4,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                        rope_parameters=dict(sliding_attention=dict(rope_type="default", rope_theta=10.0),
                                             full_attention=dict(rope_type="linear", rope_theta=1000.0, factor=4.0))),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
                      decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False),
    "phi3": dict(sliding_window=7, max_position_embeddings=128, original_max_position_embeddings=8,
                 rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                                      short_factor=[1.0, 1.3, 1.7, 2.2], long_factor=[1.5, 2.0, 3.0, 4.0])),
    "olmo2": dict(attention_bias=True),
    "smollm3": dict(no_rope_layers=[1, 0, 1], use_sliding_window=True, sliding_window=6, mlp_bias=True,
                    layer_types=["full_attention", "sliding_attention", "full_attention"]),
    "gemma": dict(head_dim=16, attention_bias=True, hidden_size=32),  # sqrt(32) scales the embeddings
    "granite": dict(attention_multiplier=0.3, embedding_multiplier=3.0, residual_multiplier=0.6, logits_scaling=4.0,
                    attention_bias=True, mlp_bias=True),
    "olmo": dict(clip_qkv=0.6, attention_bias=True),  # N(0, 0.2) weights: many q, k, v entries past the clip
    "starcoder2": dict(sliding_window=6, hidden_act="gelu_pytorch_tanh",
                       rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    "phi": dict(hidden_act="gelu_new", rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                            partial_rotary_factor=0.5)),
    "stablelm": dict(use_qkv_bias=True, use_parallel_residual=True,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)),
    "gpt_neox": dict(num_key_value_heads=None, hidden_act="gelu",  # GPT-NeoX has no GQA
                     rope_parameters=dict(rope_type="linear", rope_theta=100.0, factor=2.0,
                                          partial_rotary_factor=0.25)),
}
# name -> (HF config class, HF causal LM class, config overrides), for every Llama-like record but Llama's
FAMILIES = {name: (record.config_class.__name__, dict(record.auto)["AutoModelForCausalLM"], OVERRIDES[name])
            for name, record in msfx.families.FAMILIES.items() if record.spec is not None and name != "llama"}


def make_hf(tmp_path, family: str, seed: int = 0, **extra):
    """The tiny HF model of `family` (config overrides from `FAMILIES`, then `extra`; random norms and
    biases: `oracle.save_tiny`), saved to `tmp_path`. Returns `(torch_model, tmp_path)`."""
    config_cls, model_cls, overrides = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**BASE, **overrides, **extra})
    return save_tiny(getattr(transformers, model_cls), config, tmp_path, seed, biases=True)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    torch_model, path = make_hf(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, torch_model, path, msfx.AutoModelForCausalLM.from_pretrained(path)


def test_logits_and_hidden_states_match_hf(family):
    name, torch_model, path, model = family
    assert type(model).__name__ == FAMILIES[name][1]
    ids = random_ids(2, 14, seed=1)  # longer than every sliding window and original_max_position_embeddings
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids), output_hidden_states=True)
    got = model(msfx.llama.ms.Tensor(ids), output_hidden_states=True)
    np.testing.assert_allclose(got.logits.asnumpy(), expected.logits.numpy(), atol=1e-4, rtol=0)
    assert len(got.hidden_states) == len(expected.hidden_states)
    for ours, theirs in zip(got.hidden_states, expected.hidden_states):
        np.testing.assert_allclose(ours.asnumpy(), theirs.numpy(), atol=1e-4, rtol=0)


def test_functional_module_loads_and_runs_the_family(family):
    """`msfx.<model_type>` (built from the family's record) loads its checkpoints and its
    `forward` gives the class's logits; it refuses another family's checkpoint."""
    name, _, path, model = family
    core = getattr(msfx, name)
    ids = msfx.llama.ms.Tensor(random_ids(1, 6, seed=2))
    np.testing.assert_array_equal(core.forward(core.load(path), ids).logits.asnumpy(), model(ids).logits.asnumpy())
    other = "qwen2" if name != "qwen2" else "mistral"
    with pytest.raises(msfx.CheckpointError, match=name):
        getattr(msfx, other).load(path)


@pytest.mark.parametrize("jit", [False, True])
def test_greedy_generate_matches_hf_past_the_window(family, jit):
    name, torch_model, path, model = family
    ids = random_ids(3, 9, seed=2)
    mask = np.ones_like(ids)
    ids[1, :2] = ids[2, :5] = mask[1, :2] = mask[2, :5] = 0
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).numpy()
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, jit=jit, **kwargs), expected)


def test_save_pretrained_loads_back_in_hf(family, tmp_path):
    name, torch_model, path, model = family
    model.save_pretrained(tmp_path)
    reloaded = getattr(transformers, FAMILIES[name][1]).from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.tensor(random_ids(1, 10, seed=3))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), torch_model(ids).logits.numpy())
    base = type(msfx.AutoModel.from_pretrained(path)).__name__
    assert base == {"gemma3_text": "Gemma3TextModel"}.get(name, FAMILIES[name][1].replace("ForCausalLM", "Model"))


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_moe_router_logits_and_aux_loss_match_hf(name, tmp_path):
    torch_model, path = make_hf(tmp_path, name)
    model = msfx.AutoModelForCausalLM.from_pretrained(path)
    ids = random_ids(2, 9, seed=4)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(ids),
                               output_router_logits=True)
    got = model(msfx.llama.ms.Tensor(ids), attention_mask=mask, labels=ids, output_router_logits=True)
    sparse = len(expected.router_logits)
    assert sparse == (3 if name == "mixtral" else 2)  # qwen3_moe: layer 1 is a dense MLP (mlp_only_layers)
    assert len(got.router_logits) == sparse
    for ours, theirs in zip(got.router_logits, expected.router_logits):
        np.testing.assert_allclose(ours.asnumpy(), theirs.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.aux_loss.asnumpy(), expected.aux_loss.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.loss.asnumpy(), expected.loss.numpy(), atol=1e-5, rtol=0)
    assert model(msfx.llama.ms.Tensor(ids)).router_logits is None  # config.output_router_logits is False


def test_sliding_window_layers_keep_a_ring_buffer(tmp_path):
    """The KV cache of a sliding-window layer holds its window, not the whole generation (the
    greedy test above checks the tokens past the window against HF)."""
    from msfx.decode.generate import DecodeState

    _, path = make_hf(tmp_path, "qwen2")  # layer 0 full attention, layers 1-2 sliding (window 6)
    model = msfx.AutoModelForCausalLM.from_pretrained(path)
    ids = random_ids(2, 9, seed=5)
    state = DecodeState(model.config, model._compiled_step(False), model._compiled_step(False), ids,
                        np.ones_like(ids), 40)
    assert [k.shape[2] for k in state.cache.keys] == [64, 6, 6]
    logits = state.prefill()
    for _ in range(8):  # past the window: the ring wraps
        logits = state.step(np.argmax(logits.asnumpy(), -1))
    assert [k.shape[2] for k in state.cache.keys] == [64, 6, 6]


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_partial_rotary_factor_with_default_rope_as_hf(name, tmp_path):
    """HF's Phi-3 rotates half of each head with `partial_rotary_factor` 0.5 and default rope; HF's
    Llama (like the other families) ignores the factor for default rope."""
    from conftest import make_hf_llama

    rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)
    if name == "llama":
        torch_model, path = make_hf_llama(tmp_path, rope_parameters=rope)
    else:
        FAMILIES["phi3_partial"] = ("Phi3Config", "Phi3ForCausalLM", dict(rope_parameters=rope))
        torch_model, path = make_hf(tmp_path, "phi3_partial")
        del FAMILIES["phi3_partial"]
    ids = random_ids(2, 12, seed=6)
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).logits.numpy()
    got = msfx.AutoModelForCausalLM.from_pretrained(path)(msfx.llama.ms.Tensor(ids)).logits.asnumpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gemma", "gpt_neox", "olmo", "phi", "stablelm", "starcoder2"])
def test_sequence_classification_matches_hf(name, tmp_path):
    """`...ForSequenceClassification` of the families whose layout is not Llama's (names, norms,
    base prefix): logits at each row's last non-padding token and the loss as HF."""
    config_cls, causal, overrides = FAMILIES[name]
    cls_name = causal.replace("ForCausalLM", "ForSequenceClassification")
    config = getattr(transformers, config_cls)(**{**BASE, **overrides, "num_labels": 3})
    torch_model, path = save_tiny(getattr(transformers, cls_name), config, tmp_path, biases=True)
    ids = random_ids(2, 7, seed=7)
    ids[1, 5:] = BASE["pad_token_id"]  # right padding: row 1 is read at position 4
    labels = np.array([0, 2])
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids), labels=torch.tensor(labels))
    model = msfx.AutoModelForSequenceClassification.from_pretrained(path)
    assert type(model).__name__ == cls_name
    got = model(msfx.llama.ms.Tensor(ids), labels=labels)
    np.testing.assert_allclose(got.logits.asnumpy(), expected.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.loss.asnumpy(), expected.loss.numpy(), atol=0, rtol=1e-5)


def test_gpt_neox_sequential_residual_as_hf(tmp_path):
    """GPT-NeoX with `use_parallel_residual=False` (`x + attn(ln1(x))`, then `+ mlp(ln2(.))`) matches
    HF; read as the parallel layout instead, the logits differ (the switch is exercised)."""
    torch_model, path = make_hf(tmp_path, "gpt_neox", use_parallel_residual=False)
    ids = random_ids(2, 8, seed=8)
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).logits.numpy()
    model = msfx.AutoModelForCausalLM.from_pretrained(path)
    np.testing.assert_allclose(model(msfx.llama.ms.Tensor(ids)).logits.asnumpy(), expected, atol=1e-4, rtol=0)
    model.config.use_parallel_residual = True
    assert np.abs(model(msfx.llama.ms.Tensor(ids)).logits.asnumpy() - expected).max() > 1e-2


@pytest.mark.parametrize("name", ["gpt_neox", "phi"])
def test_beam_search_matches_hf(name, tmp_path):
    """Beam search (the cache reordered per step) token-for-token on the parallel-residual layouts."""
    torch_model, path = make_hf(tmp_path, name)
    ids = random_ids(2, 6, seed=9)
    mask = np.ones_like(ids)
    ids[1, :2] = mask[1, :2] = 0
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).numpy()
    model = msfx.AutoModelForCausalLM.from_pretrained(path)
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, jit=False, **kwargs), expected)


@pytest.mark.parametrize("name", ["phi", "stablelm"])
def test_qk_layernorm_as_hf(name, tmp_path):
    """`qk_layernorm`: Phi's one LayerNorm over each head of q and k, StableLM's own LayerNorm per
    head (`q_layernorm.norms.N`, stacked inside the compiled step too)."""
    torch_model, path = make_hf(tmp_path, name, qk_layernorm=True)
    ids = random_ids(2, 8, seed=10)
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).logits.numpy()
        tokens = torch_model.generate(torch.tensor(ids), max_new_tokens=4, do_sample=False, eos_token_id=None)
    model = msfx.AutoModelForCausalLM.from_pretrained(path)
    np.testing.assert_allclose(model(msfx.llama.ms.Tensor(ids)).logits.asnumpy(), expected, atol=1e-4, rtol=0)
    jit = name == "stablelm"  # the per-head weights stacked in a compiled step
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, jit=jit),
                                  tokens.numpy())


def test_bf16_error_within_torch_bf16_error(family):
    """bfloat16 logits on a left-padded batch against the float32 torch reference: msfx's error at most
    1.5x (max) / 1.2x (mean) torch-bf16's over the real tokens (`test_bf16_encoders`' criterion)."""
    from test_bf16_encoders import _check, _torch_runs

    name, _, path, _ = family
    ids = random_ids(2, 14, seed=1)
    mask = np.ones_like(ids)
    ids[1, :3] = mask[1, :3] = 0
    ref, bf16 = _torch_runs(getattr(transformers, FAMILIES[name][1]), path, input_ids=ids, attention_mask=mask)
    out = msfx.AutoModelForCausalLM.from_pretrained(path, dtype="bfloat16")(ids, attention_mask=mask)
    _check(f"{name} logits", out.logits, bf16.logits, ref.logits, mask.astype(bool))


def test_compiled_bf16_decodes_as_float32_over_the_bf16_weights(family, tmp_path):
    """A compiled step over bfloat16 weights computes in float32 (`msfx.decode.step.widens`; not the
    experts' families): greedy tokens and scores are HF float32's on the same checkpoint widened."""
    from msfx.decode.step import widens

    name, _, path, _ = family
    torch_cls = getattr(transformers, FAMILIES[name][1])
    torch_cls.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(tmp_path)
    model = msfx.AutoModelForCausalLM.from_pretrained(tmp_path)
    if name in ("mixtral", "qwen3_moe"):
        assert not widens(model.arch, model.params, model.config)
        return
    assert model.dtype == msfx.llama.ms.bfloat16 and widens(model.arch, model.params, model.config)
    wide = torch_cls.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = random_ids(2, 33, seed=3)  # padded to 2 x 40 prompt rows: the prompt's products run in packed panels
    mask = np.ones_like(ids)
    ids[1, :2] = mask[1, :2] = 0
    kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        expected = wide.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
    out = model.generate(ids, attention_mask=mask, **kwargs)
    np.testing.assert_array_equal(out.sequences, expected.sequences.numpy())
    np.testing.assert_allclose(np.stack(out.scores), np.stack([s.numpy() for s in expected.scores]), atol=1e-4, rtol=0)


def test_compiled_float32_batch_one_decodes_in_the_product_kernels(family):
    """At batch 1 a compiled float32 step's products run in `msfx.kernels` (q, k, v and gate, up fused), the
    prompt's 16 rows (13 tokens, padded) in packed panels: greedy tokens and scores are HF float32's."""
    name, _, path, _ = family
    hf = getattr(transformers, FAMILIES[name][1]).from_pretrained(path, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    ids = random_ids(1, 13, seed=5)
    kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        expected = hf.generate(torch.tensor(ids), **kwargs)
    out = msfx.AutoModelForCausalLM.from_pretrained(path).generate(ids, **kwargs)
    np.testing.assert_array_equal(out.sequences, expected.sequences.numpy())
    np.testing.assert_allclose(np.stack(out.scores), np.stack([s.numpy() for s in expected.scores]), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_bf16_greedy_generate_matches_torch_bf16(family):
    """bfloat16 greedy decoding (eager: HF's roundings) gives torch-bf16's tokens on a left-padded batch
    (~1.3 s per family; 4 of 17 families differed before msfx rounded where HF does)."""
    name, _, path, _ = family
    ids = random_ids(3, 9, seed=2)
    mask = np.ones_like(ids)
    ids[1, :2] = mask[1, :2] = 0
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
    half = getattr(transformers, FAMILIES[name][1]).from_pretrained(path, dtype=torch.bfloat16,
                                                                   attn_implementation="eager").eval()
    with torch.no_grad():
        expected = half.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).numpy()
    model = msfx.AutoModelForCausalLM.from_pretrained(path, dtype="bfloat16")
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, jit=False, **kwargs), expected)
