"""The Auto classes: dispatch on `config.model_type`, the same class names as transformers'
auto mappings, and clear errors for what msfx does not support."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers.models.auto.modeling_auto as hf_auto
from transformers import AutoConfig

import msfx
from msfx.models.auto import AUTO_CLASSES, FAMILIES, supported_classes

HF_MAPPINGS = {
    "AutoModelForTokenClassification": hf_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForQuestionAnswering": hf_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    "AutoModel": hf_auto.MODEL_MAPPING_NAMES,
    "AutoModelForCausalLM": hf_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForSeq2SeqLM": hf_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForSequenceClassification": hf_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForMaskedLM": hf_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "AutoModelForTextEncoding": hf_auto.MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES,
    "AutoModelForZeroShotImageClassification": hf_auto.MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES,
}


def test_every_auto_class_picks_the_class_transformers_picks():
    assert {auto.__name__ for auto in AUTO_CLASSES} == set(HF_MAPPINGS)
    for auto, table in supported_classes().items():
        for model_type, name in table.items():
            assert HF_MAPPINGS[auto].get(model_type) == name, (auto, model_type)
            assert getattr(msfx, name).__name__ == name  # exported from msfx


def test_auto_loads_llama_and_saves_what_hf_loads(hf_llama, tmp_path):
    torch_model, path = hf_llama()
    model = msfx.AutoModelForCausalLM.from_pretrained(path)
    assert type(model) is msfx.LlamaForCausalLM
    assert type(msfx.AutoModel.from_pretrained(path)) is msfx.LlamaModel
    assert type(msfx.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)) \
        is msfx.LlamaForSequenceClassification
    assert type(msfx.AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))) is msfx.LlamaForCausalLM
    ids = np.random.default_rng(0).integers(3, 99, (2, 7))
    model.save_pretrained(tmp_path / "saved")
    reloaded = type(torch_model).from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).logits.numpy()
        again = reloaded(torch.tensor(ids)).logits.numpy()
    np.testing.assert_array_equal(again, expected)
    np.testing.assert_allclose(model(msfx.llama.ms.Tensor(ids)).logits.asnumpy(), expected, atol=1e-4)


def test_unsupported_model_type_and_task_name_what_is_supported(tmp_path):
    AutoConfig.for_model("mamba", vocab_size=10, hidden_size=8, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'mamba'.*supported model types: .*llama"):
        msfx.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"AutoModelForMaskedLM has no class for model_type 'llama'"):
        msfx.AutoModelForMaskedLM.from_config(AutoConfig.for_model("llama", num_hidden_layers=1))
    with pytest.raises(EnvironmentError, match="from_pretrained"):
        msfx.AutoModel()
    assert "llama" in FAMILIES


def test_readme_table_is_generated_from_the_registry():
    from pathlib import Path

    from msfx.models.auto import supported_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert supported_table() in readme, "README's model table is stale: run python scripts/update_readme_table.py"
