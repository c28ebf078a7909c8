"""The command line and a newcomer's first steps: GGUF paths in every form, one-line errors for
broken configs and bad sampling values, Ctrl-C during compilation, long prompts' memory."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import left_padded, make_hf_llama, random_ids
from msfx import AutoModelForCausalLM, LlamaForCausalLM
from msfx.cli import main
from msfx.errors import CheckpointError
from msfx.layers import attention
from test_gguf import TOKENS, _tiny_llama_weights, _write_llama
from oracle import hf_run, max_abs_diff, to_np
from test_params import save_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    """`<tmp>/gdir/tiny.gguf`: a tiny llama with a byte-level vocabulary the tokenizer can rebuild."""
    root = tmp_path_factory.mktemp("gguf")
    (root / "gdir").mkdir()
    _write_llama(root / "gdir" / "tiny.gguf", _tiny_llama_weights(),
                 metadata=lambda writer: writer.add_token_scores([0.0] * len(TOKENS)))
    return root


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny HF llama checkpoint with a tokenizer: what `msfx generate --model DIR` needs."""
    _, path = make_hf_llama(tmp_path_factory.mktemp("llama"))
    save_tiny_tokenizer(path)
    return path


def _generate(capsys, *args) -> tuple[int, str]:
    rc = main(["generate", *args, "--prompt", "red blue", "--max-new-tokens", "2", "--eager"])
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------- 13. GGUF paths

@pytest.mark.parametrize("form", ["dir+name", "relative path", "absolute path", "absolute dir+name",
                                  "dir+absolute path"])
def test_gguf_file_in_every_form(gguf_dir, monkeypatch, capsys, form):
    monkeypatch.chdir(gguf_dir)
    args = {"dir+name": ["--model", "gdir", "--gguf-file", "tiny.gguf"],  # the README's form
            "relative path": ["--gguf-file", "gdir/tiny.gguf"],
            "absolute path": ["--gguf-file", str(gguf_dir / "gdir" / "tiny.gguf")],
            "absolute dir+name": ["--model", str(gguf_dir / "gdir"), "--gguf-file", "tiny.gguf"],
            "dir+absolute path": ["--model", "gdir", "--gguf-file", str(gguf_dir / "gdir" / "tiny.gguf")]}[form]
    rc, err = _generate(capsys, *args)
    assert rc == 0, err
    assert "new tokens: 2" in err


def test_gguf_relative_dir_in_the_api(gguf_dir, monkeypatch):
    monkeypatch.chdir(gguf_dir)
    auto = AutoModelForCausalLM.from_pretrained("gdir", gguf_file="tiny.gguf")
    direct = LlamaForCausalLM.from_pretrained("gdir", gguf_file="tiny.gguf")
    ids = random_ids(1, 5, vocab=len(TOKENS))
    np.testing.assert_array_equal(auto(ids).logits.asnumpy(), direct(ids).logits.asnumpy())


def test_missing_gguf_file_is_one_line(gguf_dir, monkeypatch, capsys):
    monkeypatch.chdir(gguf_dir)
    rc, err = _generate(capsys, "--model", "gdir", "--gguf-file", "nope.gguf")
    assert rc == 2 and err.strip() == "msfx generate: error: GGUF file 'nope.gguf' not found in 'gdir'"


def test_gguf_only_directory_names_its_files(gguf_dir, monkeypatch, capsys):
    monkeypatch.chdir(gguf_dir)
    rc, err = _generate(capsys, "--model", "gdir")
    assert rc == 2 and "no config.json in gdir; it holds " in err and "--gguf-file" in err, err


# ---------------------------------------------------------------- 14. broken configs, sampling values

BROKEN_CONFIGS = {
    "bad JSON": (lambda text: text[:-20], r"config.json is not valid JSON: .* line \d+ column \d+"),
    "wrong type": (lambda text: text.replace('"num_hidden_layers": 2', '"num_hidden_layers": "two"'),
                   r"config.json: Field 'num_hidden_layers' expected int, got str"),
    "unknown model_type": (lambda text: text.replace('"model_type": "llama"', '"model_type": "nosuchmodel"'),
                           r"config.json: unknown model_type 'nosuchmodel'"),
    "no model_type": (lambda text: text.replace('"model_type": "llama",', ''), r"config.json has no model_type"),
}


@pytest.mark.parametrize("case", BROKEN_CONFIGS)
def test_broken_config_is_one_line_naming_file_and_field(llama_dir, tmp_path, capsys, case):
    edit, message = BROKEN_CONFIGS[case]
    path = Path(shutil.copytree(llama_dir, tmp_path / "broken"))
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(edit(text))
    assert (path / "config.json").read_text() != text
    rc, err = _generate(capsys, "--model", str(path))
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"msfx generate: error: {path / 'config.json'}")
    assert "upgrade" not in err
    assert re.search(message, err), err
    for cls in (AutoModelForCausalLM, LlamaForCausalLM):  # the API raises the same error
        with pytest.raises(CheckpointError, match=message):
            cls.from_pretrained(path)


def test_sampling_flags_without_do_sample_warn(llama_dir, capsys):
    rc, err = _generate(capsys, "--model", str(llama_dir), "--temperature", "0.5", "--top-k", "3")
    assert rc == 0
    assert "warning: --temperature, --top-k only apply with --do-sample" in err


@pytest.mark.parametrize("flag, value, message", [
    ("temperature", 0.0, r"`temperature` \(=0.0\) has to be a strictly positive float"),
    ("temperature", -1.0, r"`temperature` \(=-1.0\) has to be a strictly positive float"),
    ("top_k", -1, r"`top_k` has to be a strictly positive integer \(or 0 to disable it\), but is -1"),
    ("top_p", 0.0, r"`top_p` has to be a float > 0 and <= 1, but is 0.0"),
    ("top_p", 1.5, r"`top_p` has to be a float > 0 and <= 1, but is 1.5"),
])
def test_bad_sampling_values_are_refused(llama_dir, capsys, flag, value, message):
    rc, err = _generate(capsys, "--model", str(llama_dir), "--do-sample", f"--{flag.replace('_', '-')}", str(value))
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=random_ids(1, 4), max_new_tokens=2, do_sample=True, **{flag: value})
    # greedy decoding ignores them, as HF does (a checkpoint may carry temperature=0 for greedy use)
    assert model.generate(input_ids=random_ids(1, 4), max_new_tokens=2, **{flag: value}).shape == (1, 6)


# ---------------------------------------------------------------- 15. long prompts

def test_long_prompt_attends_in_query_blocks_and_matches_hf(hf_llama, monkeypatch):
    torch_model, path = hf_llama(max_position_embeddings=2048, num_key_value_heads=2)
    ids, mask = left_padded(2, 1100, pads=[0, 37], seed=7)
    # 10 MiB of float32 scores over 2 x 4 heads x 1100 keys: blocks of 297 queries, the last short
    monkeypatch.setattr(attention, "SCORE_BLOCK_BYTES", 10 * 2**20)
    blocks, attend = [], attention._attend
    monkeypatch.setattr(attention, "_attend", lambda q, *args: blocks.append(q.shape[2]) or attend(q, *args))
    model = LlamaForCausalLM.from_pretrained(path)
    logits = model(ids, attention_mask=mask).logits
    assert blocks == [297, 297, 297, 209] * 2  # two layers
    real = mask.astype(bool)
    assert max_abs_diff(to_np(logits)[real], to_np(hf_run(torch_model, ids, mask).logits)[real]) <= 1e-4
    blocks.clear()
    model(ids[:, :1024], attention_mask=mask[:, :1024])
    assert blocks == [1024, 1024]  # up to LONG_QUERIES queries: one block, the graph as before


def test_long_prompt_compiled_prefill_generates_as_hf(hf_llama, monkeypatch):
    torch_model, path = hf_llama(max_position_embeddings=2048)
    ids = random_ids(1, 1100, seed=8)
    monkeypatch.setattr(attention, "SCORE_BLOCK_BYTES", 8 * 2**20)  # several blocks in the traced prefill
    blocks, attend = [], attention._attend
    monkeypatch.setattr(attention, "_attend", lambda q, *args: blocks.append(q.shape[2]) or attend(q, *args))
    model = LlamaForCausalLM.from_pretrained(path)
    ours = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, jit=True)
    with torch.no_grad():
        theirs = torch_model.generate(input_ids=torch.tensor(ids), max_new_tokens=3, do_sample=False)
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert len(blocks) > 2 and max(blocks) < 1100


_ATTENTION_MEMORY = """
import resource
import mindspore as ms
import numpy as np
from msfx.layers import attention
n = 3072
rng = np.random.default_rng(0)
q, k, v = (ms.Tensor(rng.standard_normal((1, 8, n, 8)).astype(np.float32)) for _ in range(3))
bias = attention.attention_bias(ms.Tensor(np.ones((1, n), np.int32)), attention.arange(n))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
attention.scaled_dot_product_attention(q, k, v, bias, 0.35).asnumpy()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10)
"""


def test_long_attention_memory_is_bounded():
    """One 3072-query attention over 8 heads: 302 MB per whole score matrix; the peak grew by
    2025 MiB before query blocks, 421 MiB with them."""
    out = subprocess.run([sys.executable, "-c", _ATTENTION_MEMORY], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    growth_mib = float(out.stdout.split()[-1])
    assert growth_mib < 1000, growth_mib


# ---------------------------------------------------------------- 16. Ctrl-C, MindSpore's log

# `python -m msfx generate ...` (runpy, as -m runs it), with a SIGINT sent 0.1 s into the first
# compile of the decode step (it takes ~1 s for the tiny model).
_INTERRUPTED_RUN = """
import os, runpy, signal, sys, threading
import msfx.jit as step
compile_and_run = step.call_in_fresh_thread
def interrupted(fn, *args):
    print("compiling", file=sys.stderr, flush=True)
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    return compile_and_run(fn, *args)
step.call_in_fresh_thread = interrupted
sys.argv = ["msfx", *sys.argv[1:]]
runpy.run_module("msfx", run_name="__main__")
"""


def test_ctrl_c_during_first_compile_exits_130(llama_dir):
    out = subprocess.run([sys.executable, "-c", _INTERRUPTED_RUN, "generate", "--model", str(llama_dir), "--prompt",
                          "red blue", "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert "compiling" in out.stderr
    assert "terminate called" not in out.stderr
    assert out.returncode == 130, out.stderr[-2000:]
    assert out.stderr.rstrip().endswith("msfx generate: KeyboardInterrupt")


_MINDSPORE_FIRST = """
import sys
import mindspore
import msfx
from msfx.cli import main
sys.exit(main(["generate", "--model", sys.argv[1], "--prompt", "red blue", "--max-new-tokens", "3"]))
"""


@pytest.mark.parametrize("glog_v", [None, "2"])
def test_mindspore_imported_first_compiles_quietly(llama_dir, glog_v):
    # MindSpore's own ops (no fused kernels) are what the analyzer warns about
    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"} | {"PYTHONPATH": str(REPO_ROOT), "MSFX_KERNELS": "0"}
    if glog_v is not None:  # a level the user chose is kept: the analyzer's warnings show (8 here)
        env["GLOG_v"] = glog_v
    out = subprocess.run([sys.executable, "-c", _MINDSPORE_FIRST, str(llama_dir)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("[WARNING] ANALYZER" in out.stderr) == (glog_v == "2"), out.stderr[-2000:]


_NO_HEAVY_IMPORTS = """
import sys
import msfx
from msfx.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = [name for name in ("mindspore", "transformers", "torch") if name in sys.modules]
print("heavy:", heavy)
"""


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["generate", "--max-new-tokens", "-1"],
                                  ["serve", "--port", "99999"]])
def test_help_and_argument_errors_import_neither_mindspore_nor_transformers(argv):
    """`import msfx` is lazy (PEP 562): the CLI answers these before any heavy import (< 1 s)."""
    out = subprocess.run([sys.executable, "-c", _NO_HEAVY_IMPORTS, *argv], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert "heavy: []" in out.stdout, out.stdout + out.stderr
    if "--port" in argv:
        assert "must be a TCP port in 1..65535, got 99999" in out.stderr, out.stderr
