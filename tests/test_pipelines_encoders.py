"""`msfx.pipeline("token-classification")` against `transformers.pipeline` (PyTorch) on the same tiny
random checkpoints (BERT, DistilBERT, ModernBERT); `"question-answering"` (removed in transformers 5)
against transformers 4.x's span selection worked out here from HF torch's start and end logits; and
fill-mask / text-classification on the new families."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import msfx
from test_encoders import FAMILIES, hf_config
from test_pipelines import assert_same

from oracle import save_tiny

NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def wordpiece_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A fast WordPiece tokenizer over 99 ids ([PAD] 0): words w0..w83 and the subwords ##0..##9, so
    "w101" is the word piece "w10" and the subword "##1"."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(84)] + [f"##{i}" for i in range(10)]
    return transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(family, head): (torch model, directory with the tokenizer)}, built on first use."""
    built = {}

    def get(family: str, head: str, **overrides):
        key = (family, head, repr(sorted(overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(head)
            config = hf_config(family, head, **overrides)
            built[key] = save_tiny(getattr(transformers, FAMILIES[family][0] + head), config, path, 1, biases=True)
            wordpiece_tokenizer().save_pretrained(path)
        return built[key]

    return get


def run_both(task: str, torch_model, path, inputs, **kwargs):
    theirs = transformers.pipeline(task, model=torch_model, tokenizer=wordpiece_tokenizer())(inputs, **kwargs)
    ours = msfx.pipeline(task, model=str(path))(inputs, **kwargs)
    return ours, theirs


TOKEN_CASES = {
    "none_all_labels": ("w5 w101 w9 w13 w7", dict(ignore_labels=[])),
    "none_default_ignores_O": ("w5 w101 w9 w13 w7 w22 w23", {}),
    "simple": ("w5 w101 w9 w13 w7 w22 w23 w40", dict(aggregation_strategy="simple", ignore_labels=[])),
    "first": ("w5 w101 w9 w139 w7", dict(aggregation_strategy="first", ignore_labels=[])),
    "average": ("w5 w101 w9 w139 w7", dict(aggregation_strategy="average", ignore_labels=[])),
    "max": ("w5 w101 w9 w139 w7", dict(aggregation_strategy="max")),
    "batched": (["w5 w9", "w1 w2 w3 w4 w5 w61", "w8"], dict(batch_size=2, aggregation_strategy="simple")),
    "split_into_words": (["w5", "w101", "w9"], dict(is_split_into_words=True, ignore_labels=[])),
}


def cases(names, families, default) -> list:
    """`(case, family)` parameters, those not in `default` marked slow (`(case, "*")`: all families)."""
    return [pytest.param(c, f, id=f"{c}-{f}", marks=() if (c, f) in default or (c, "*") in default
                         else pytest.mark.slow) for f in families for c in names]


@pytest.mark.parametrize("case, family", cases(TOKEN_CASES, ["bert", "distilbert", "modernbert"],
                                                {("none_all_labels", "bert"), ("first", "bert"), ("batched", "bert"),
                                                 ("split_into_words", "bert"), ("simple", "*")}))
def test_token_classification_matches_hf(checkpoints, family, case):
    inputs, kwargs = TOKEN_CASES[case]
    torch_model, path = checkpoints(family, "ForTokenClassification", id2label=NER_LABELS)
    ours, theirs = run_both("token-classification", torch_model, path, inputs, **kwargs)
    assert_same(ours, theirs)
    if case == "none_all_labels":
        assert len(ours) == 6 and {e["word"] for e in ours} >= {"w10", "##1"}  # the subword shows


@pytest.mark.parametrize("strategy", ["simple", "first"])
def test_token_classification_stride_matches_hf(checkpoints, strategy):
    """A text longer than `model_max_length` (8) runs in chunks overlapping by `stride` tokens."""
    torch_model, path = checkpoints("bert", "ForTokenClassification", id2label=NER_LABELS)
    text, kwargs = "w5 w101 w9 w13 w7 w22 w23 w40 w41 w42 w139 w44 w45 w46", dict(aggregation_strategy=strategy,
                                                                                   ignore_labels=[], stride=2)
    tokenizer = wordpiece_tokenizer()
    tokenizer.model_max_length = 8
    theirs = transformers.pipeline("token-classification", model=torch_model, tokenizer=tokenizer)(text, **kwargs)
    ours = msfx.pipeline("token-classification", model=str(path), tokenizer=tokenizer)(text, **kwargs)
    assert_same(ours, theirs)
    assert ours[-1]["end"] == len(text)  # the whole text, not its first 8 tokens


def test_ner_alias_and_bad_arguments(checkpoints):
    _, path = checkpoints("bert", "ForTokenClassification", id2label=NER_LABELS)
    pipe = msfx.pipeline("ner", model=str(path))
    with pytest.raises(ValueError, match="aggregation_strategy must be one of"):
        pipe("w5", aggregation_strategy="longest")
    with pytest.raises(ValueError, match="stride"):
        pipe("w5", stride=2, aggregation_strategy="none")


# ---------------------------------------------------------------- question-answering (transformers 4.x's pipeline)

def expected_answers(torch_model, question: str, context: str, top_k: int = 1, max_answer_len: int = 15,
                     handle_impossible_answer: bool = False) -> list[dict]:
    """transformers 4.x's answers for a context that fits one span, from HF torch's logits: every
    span of context tokens scored by the product of the start and end softmaxes over the context
    tokens and [CLS] (whole words here: one token per word), best first."""
    tokenizer = wordpiece_tokenizer()
    encoded = tokenizer(question, context, return_offsets_mapping=True)
    with torch.no_grad():
        out = torch_model(torch.tensor([encoded["input_ids"]]), token_type_ids=torch.tensor([encoded["token_type_ids"]]))
    allowed = np.array([s == 1 for s in encoded.sequence_ids()])
    allowed[0] = True  # [CLS]

    def probs(logits):
        x = np.where(allowed, logits[0].numpy().astype(np.float64), -np.inf)
        return np.exp(x - x.max()) / np.exp(x - x.max()).sum()

    start, end = probs(out.start_logits), probs(out.end_logits)
    spans = [(start[s] * end[e], s, e) for s in np.flatnonzero(allowed)[1:] for e in np.flatnonzero(allowed)[1:]
             if s <= e < s + max_answer_len]
    offsets = encoded["offset_mapping"]
    answers = [{"score": float(p), "start": offsets[s][0], "end": offsets[e][1],
                "answer": context[offsets[s][0]:offsets[e][1]]} for p, s, e in spans]
    if handle_impossible_answer:
        answers.append({"score": float(start[0] * end[0]), "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
    return answers[0] if top_k == 1 else answers


CONTEXT = "w30 w31 w32 w33 w34 w35 w36 w37 w38 w39 w40 w41"
QA_CASES = {"top_1": {}, "top_3": dict(top_k=3), "short_answers": dict(top_k=4, max_answer_len=2),
            "impossible": dict(top_k=2, handle_impossible_answer=True)}


@pytest.mark.parametrize("case, family", cases(QA_CASES, ["bert", "distilbert", "modernbert"],
                                                {("top_3", "*"), ("impossible", "bert"), ("short_answers", "bert")}))
def test_question_answering_matches_hf_4x(checkpoints, family, case):
    kwargs = QA_CASES[case]
    torch_model, path = checkpoints(family, "ForQuestionAnswering")
    ours = msfx.pipeline("question-answering", model=str(path))(question="w5 w9", context=CONTEXT, **kwargs)
    expected = expected_answers(torch_model, "w5 w9", CONTEXT, **kwargs)
    assert_same(ours, expected)


def test_question_answering_inputs_and_long_contexts(checkpoints):
    torch_model, path = checkpoints("bert", "ForQuestionAnswering")
    pipe = msfx.pipeline("question-answering", model=str(path))
    one = pipe(question="w5 w9", context=CONTEXT)
    assert_same(pipe({"question": "w5 w9", "context": CONTEXT}), one)
    assert_same(pipe("w5 w9", CONTEXT), one)
    assert_same(pipe([{"question": "w5 w9", "context": CONTEXT}] * 2), [one, one])
    # a context longer than max_seq_len is split into overlapping spans; the answer is the best of all spans
    long_context = " ".join(f"w{i}" for i in range(20, 60))
    answer = pipe(question="w5", context=long_context, max_seq_len=16, doc_stride=4)
    assert answer["answer"] == long_context[answer["start"]:answer["end"]] and answer["answer"]
    with pytest.raises(ValueError, match="doc_stride"):
        pipe(question="w5", context=CONTEXT, max_seq_len=8, doc_stride=9)
    with pytest.raises(KeyError, match="question"):
        pipe({"context": CONTEXT})
    with pytest.raises(ValueError, match="top_k"):
        pipe(question="w5", context=CONTEXT, top_k=0)


# ---------------------------------------------------------------- fill-mask, text-classification on the new families

@pytest.mark.parametrize("family", [pytest.param("distilbert", marks=pytest.mark.slow), "modernbert"])
def test_fill_mask_and_text_classification_on_new_families(checkpoints, family):
    torch_model, path = checkpoints(family, "ForMaskedLM")
    assert_same(*run_both("fill-mask", torch_model, path, "w5 [MASK] w9", top_k=3))
    torch_model, path = checkpoints(family, "ForSequenceClassification",
                                    id2label={0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"})
    assert_same(*run_both("text-classification", torch_model, path, ["w5 w9", "w1 w2 w3"], top_k=None))
