"""msfx.peft (LoRA) against peft + PyTorch as the oracle.

Checked: an adapter peft wrote gives the same logits in msfx, and one msfx wrote the same logits in
peft (Llama; GPT-2's Conv1D with trained biases), with a negative control (the base model's logits
differ); generation on the adapter gives peft's tokens; `merge_and_unload` saves a plain HF checkpoint
that transformers loads without missing or unexpected keys; `msfx.Trainer` on a LoRA model logs
HF Trainer's losses on peft's model and ends with the same adapter, keeps optimizer state for the
adapter alone, checkpoints only the adapter and resumes exactly; bad configs and files give clear errors.
Run with `-s` to see the measured differences.
"""
from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import msfx
from msfx.errors import CorruptCheckpointError
from msfx.peft import LoraConfig, PeftModel, get_peft_model

from conftest import make_hf_llama, random_ids
from oracle import Diffs, assert_close, hf_run, max_abs_diff, ms_ids, save_tiny
from test_bert import IDS as BERT_IDS, MASK as BERT_MASK, make_hf_bert
from test_t5 import CONFIGS as T5_CONFIGS, IDS as T5_IDS, LABELS as T5_LABELS, MASK as T5_MASK, TINY as T5_TINY
from test_trainer import args_for, lm_rows

DIFFS = Diffs("msfx.peft vs peft + PyTorch, max abs diff")
_report = DIFFS.report()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_hf_llama(tmp_path_factory.mktemp("peft_llama"), seed=0)


def torch_llama(path):
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    model.config._attn_implementation = "eager"
    return model


def test_adapter_round_trip_with_peft(tiny_llama, tmp_path):
    """peft -> msfx and msfx -> peft, on adapters that change the logits (`init_lora_weights=False`)."""
    _, path = tiny_llama
    ids = random_ids(2, 7)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(torch_llama(path), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "from_peft")
    expected = hf_run(theirs, ids).logits
    loaded = PeftModel.from_pretrained(msfx.LlamaForCausalLM.from_pretrained(path), tmp_path / "from_peft")
    assert loaded.get_nb_trainable_parameters()[0] == 0  # peft's default: loaded for inference
    assert_close(loaded(ms_ids(ids)).logits, expected, 1e-4, "llama: peft adapter in msfx", DIFFS)
    assert max_abs_diff(loaded.get_base_model()(ms_ids(ids)).logits, expected) > 1e-2  # the adapter matters

    ours = get_peft_model(msfx.LlamaForCausalLM.from_pretrained(path), LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, target_modules=r"model\.layers\.\d+\.self_attn\.(q|k)_proj",
        init_lora_weights=False), seed=3)
    assert ours.get_nb_trainable_parameters() == (4 * 4 * (64 + 64), 90_816)
    ours.save_pretrained(tmp_path / "from_msfx")
    config = json.loads((tmp_path / "from_msfx" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True
    assert sorted(load_file(tmp_path / "from_msfx" / "adapter_model.safetensors"))[0] == \
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    theirs = peft.PeftModel.from_pretrained(torch_llama(path), tmp_path / "from_msfx")
    expected = hf_run(theirs, ids).logits
    assert_close(ours(ms_ids(ids)).logits, expected, 1e-4, "llama: msfx adapter in peft", DIFFS)
    tokens = ours.generate(input_ids=ms_ids(ids), max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected_tokens = theirs.generate(input_ids=torch.tensor(ids), max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(tokens, expected_tokens.numpy())

    ours.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    merged.config._attn_implementation = "eager"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_close(hf_run(merged, ids).logits, expected, 1e-4, "llama: merge_and_unload in HF", DIFFS)


def test_gpt2_conv1d_and_biases(tmp_path):
    """GPT-2's Conv1D weights (`fan_in_fan_out`) with every bias trained (`bias="all"`), both ways."""
    config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    _, path = save_tiny(transformers.GPT2LMHeadModel, config, tmp_path / "gpt2", biases=True)
    ids = random_ids(2, 7)
    lora = dict(r=4, target_modules=["c_attn", "mlp.c_proj"], bias="all", init_lora_weights=False)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(path),
                                 peft.LoraConfig(fan_in_fan_out=True, **lora))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("bias"):  # trained biases must travel in the adapter file
                p.add_(0.1)
    theirs.save_pretrained(tmp_path / "from_peft")
    loaded = PeftModel.from_pretrained(msfx.GPT2LMHeadModel.from_pretrained(path), tmp_path / "from_peft")
    assert_close(loaded(ms_ids(ids)).logits, hf_run(theirs, ids).logits, 1e-4, "gpt2: peft adapter in msfx", DIFFS)

    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        ours = get_peft_model(msfx.GPT2LMHeadModel.from_pretrained(path), LoraConfig(**lora))
    ours.save_pretrained(tmp_path / "from_msfx")
    assert sorted(load_file(tmp_path / "from_peft" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "from_msfx" / "adapter_model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(path), tmp_path / "from_msfx")
    assert_close(ours(ms_ids(ids)).logits, hf_run(theirs, ids).logits, 1e-4, "gpt2: msfx adapter in peft", DIFFS)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_peft_adapters_on_other_families(family, tmp_path):
    """BERT classification (`task_type="SEQ_CLS"`: the head trains whole and travels in the file) and
    T5 (`wo`, which HF keeps in float32), with peft's default targets plus those named."""
    if family == "bert":
        _, path = make_hf_bert(tmp_path / "bert", "BertForSequenceClassification", num_labels=3)
        torch_cls, ours_cls = transformers.BertForSequenceClassification, msfx.BertForSequenceClassification
        lora = peft.LoraConfig(r=4, task_type="SEQ_CLS", init_lora_weights=False)
        inputs = dict(input_ids=BERT_IDS, attention_mask=BERT_MASK)
    else:
        config = transformers.T5Config(**T5_TINY, **T5_CONFIGS["gated-gelu"])
        _, path = save_tiny(transformers.T5ForConditionalGeneration, config, tmp_path / "t5")
        torch_cls, ours_cls = transformers.T5ForConditionalGeneration, msfx.T5ForConditionalGeneration
        lora = peft.LoraConfig(r=4, target_modules=["q", "v", "wo"], init_lora_weights=False)
        inputs = dict(input_ids=T5_IDS, attention_mask=T5_MASK, decoder_input_ids=T5_LABELS.clip(0))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(torch_cls.from_pretrained(path, attn_implementation="eager"), lora).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = theirs(**{k: torch.tensor(v) for k, v in inputs.items()}).logits
    loaded = PeftModel.from_pretrained(ours_cls.from_pretrained(path), tmp_path / "adapter")
    got = loaded(**{k: ms_ids(v) for k, v in inputs.items()}).logits
    assert_close(got, expected, 1e-4, f"{family}: peft adapter in msfx", DIFFS)
    ours = loaded.get_base_model()
    assert max_abs_diff(ours(**{k: ms_ids(v) for k, v in inputs.items()}).logits, expected) > 1e-3


def test_trainer_matches_hf_trainer_on_peft(tiny_llama, tmp_path):
    """msfx.Trainer on a LoRA model vs HF's Trainer on peft's: same initial adapter, same rows, AdamW
    with weight decay, warmup, clipping, 2 x 4 accumulation, 5 updates, `lora_dropout=0`."""
    _, path = tiny_llama
    torch.manual_seed(4)
    theirs = peft.get_peft_model(torch_llama(path), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path / "initial")
    rows = lm_rows(8)
    common = dict(gradient_accumulation_steps=2, max_steps=5, warmup_steps=2, weight_decay=0.1, max_grad_norm=1.0,
                  learning_rate=1e-2)
    hf = transformers.Trainer(model=theirs, args=transformers.TrainingArguments(**args_for(tmp_path / "hf", **common)),
                              train_dataset=rows)
    hf.train()
    ours = PeftModel.from_pretrained(msfx.LlamaForCausalLM.from_pretrained(path), tmp_path / "initial",
                                     is_trainable=True)
    trainer = msfx.Trainer(model=ours, args=msfx.TrainingArguments(**args_for(tmp_path / "ms", **common)),
                           train_dataset=rows)
    trainer.train()
    mine = [h for h in trainer.state.log_history if "loss" in h]
    expected = [h for h in hf.state.log_history if "loss" in h]
    loss_rel = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(mine, expected))
    norm_rel = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(mine, expected))
    theirs.save_pretrained(tmp_path / "hf_final")
    ours.save_pretrained(tmp_path / "ms_final")
    want, got = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("hf_final", "ms_final"))
    assert sorted(want) == sorted(got)
    adapter_diff = max(max_abs_diff(got[k], want[k]) for k in want)
    moved = max(max_abs_diff(want[k], v) for k, v in load_file(tmp_path / "initial" / "adapter_model.safetensors").items())
    print(f"\nLoRA Trainer vs HF Trainer on peft x5: loss rel {loss_rel:.2g}, grad-norm rel {norm_rel:.2g}, "
          f"adapter max abs {adapter_diff:.2g} (moved {moved:.2g})")
    assert len(mine) == len(expected) == 5 and loss_rel < 1e-5 and norm_rel < 1e-5
    assert adapter_diff < 1e-5 < moved
    assert len(trainer._opt_state) == 2 * len(got)  # AdamW's two moments, for the adapter leaves only
    base = load_file(path / "model.safetensors")
    assert all(np.array_equal(p.asnumpy(), base[p.name]) for p in ours.get_base_model().weights)  # frozen


def test_trainer_checkpoints_only_the_adapter_and_resumes(tiny_llama, tmp_path):
    _, path = tiny_llama

    def run(output, resume=None, max_steps=4):
        model = get_peft_model(msfx.LlamaForCausalLM.from_pretrained(path), LoraConfig(
            r=2, target_modules="all-linear", lora_dropout=0.1, bias="lora_only"), seed=0)
        args = msfx.TrainingArguments(**args_for(output, max_steps=max_steps, save_strategy="steps", save_steps=2,
                                                 learning_rate=1e-2))
        trainer = msfx.Trainer(model=model, args=args, train_dataset=lm_rows(16))
        trainer.train(resume_from_checkpoint=resume)
        return model.adapter_state(), [h["loss"] for h in trainer.state.log_history if "loss" in h]

    straight, losses = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    optimizer = load_file(checkpoint / "optimizer.safetensors")
    assert all(".lora_" in k for k in adapter) and len(adapter) == 2 * 7 * 2  # 7 linear layers x 2 blocks
    assert len(optimizer) == 2 * len(adapter)
    resumed, resumed_losses = run(tmp_path / "b", resume=checkpoint)
    assert resumed_losses == losses  # the first two restored from the checkpoint's log history
    for key, value in straight.items():
        np.testing.assert_array_equal(resumed[key], value)


def test_bad_configs_and_files(tiny_llama, tmp_path):
    _, path = tiny_llama
    model = msfx.LlamaForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(model, LoraConfig(target_modules=["qq_proj"]))
    with pytest.raises(ValueError, match="embedding"):
        get_peft_model(model, LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="bias must be one of"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="r must be a positive"):
        LoraConfig(r=0)
    get_peft_model(model, LoraConfig(r=4)).save_pretrained(tmp_path / "r4")
    config = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    (tmp_path / "r8").mkdir()
    (tmp_path / "r8" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    (tmp_path / "r8" / "adapter_model.safetensors").write_bytes((tmp_path / "r4" / "adapter_model.safetensors")
                                                                .read_bytes())
    with pytest.raises(CorruptCheckpointError, match="has shape"):
        PeftModel.from_pretrained(msfx.LlamaForCausalLM.from_pretrained(path), tmp_path / "r8")
    frozen = PeftModel.from_pretrained(msfx.LlamaForCausalLM.from_pretrained(path), tmp_path / "r4")
    with pytest.raises(ValueError, match="nothing to train"):  # loaded for inference, as peft's default
        msfx.Trainer(model=frozen, args=msfx.TrainingArguments(**args_for(tmp_path)), train_dataset=lm_rows(4))
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(NotImplementedError, match="use_dora"):
        PeftModel.from_pretrained(msfx.LlamaForCausalLM.from_pretrained(path), tmp_path / "r4")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftModel.from_pretrained(model, tmp_path)
