"""Fine-tune SmolLM2-135M-Instruct (the GGUF `msfx generate` runs) to write number words as digits.

Task: "Write four hundred six in digits." -> "406", for the numbers 1 to 999. The answer depends on
the input and is checked exactly, and the base model mostly fails it (it rambles, counts
"123456789012", or writes "2038" for two hundred thirty-eight). 100 numbers are drawn as the
held-out set first; the other 899 questions are the training corpus.

Format: each question goes through the tokenizer's chat template exactly as `msfx generate` sends
a prompt (default system prompt, then `<|im_start|>assistant\\n`); the target is the digits and
`<|im_end|>` (the eos, so generation stops), the only tokens with a loss (labels -100 elsewhere).
So the saved model answers the plain CLI command, e.g. for a held-out number:

    msfx generate --model OUT_DIR --prompt "Write four hundred forty in digits."   # -> 440

Steps: load (as the CLI does), held-out accuracy, full fine-tuning of all 135M parameters with
`msfx.Trainer` (its compiled step; AdamW, linear warmup and decay, clipping at 1.0), held-out accuracy
again, then `save_pretrained` of the model and the tokenizer. Accuracy: batched greedy `generate`
(left-padded); a reply is right when its first integer is the number.

Measured with the defaults (30 steps of 8 rows, lr 1e-4, 2 CPU cores shared with other jobs,
MindSpore 2.10): held-out accuracy 15% -> 94%; 8 min 21 s wall in all (load 21 s, base eval 44 s,
training 399 s of which ~100 s compile the step, eval 23 s). `msfx generate --model OUT_DIR --prompt
"Write seven hundred eighty-six in digits."` answers 786, and transformers (PyTorch) loads OUT_DIR with
logits within 1.6e-4 of msfx's (logits of magnitude ~30) and the same answer. Peak memory 14.5 GB,
nearly all of it the compiled train step (the weights and AdamW state are 1.6 GB).
(Before `msfx.Trainer` existed, the same recipe with `msfx.train.make_train_step` and its own data
order reached 97%.)

Run: python examples/finetune_smollm2.py --output-dir /tmp/smollm2-digits [--steps N] [--save-steps N --resume]
"""
from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

import msfx  # before numpy/mindspore: it quiets MindSpore's C++ log (compiling a step prints pages of it)
import numpy as np

from msfx.cli import _add_model_args, _load, _positive_int

ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

Example = tuple[str, str]  # (question, answer)


def number_words(n: int) -> str:
    """English words for 1 <= n <= 999: "four hundred six", "ninety-one"."""
    hundreds, rest = divmod(n, 100)
    parts = [f"{ONES[hundreds]} hundred"] if hundreds else []
    if rest >= 20:
        parts.append(TENS[rest // 10] + (f"-{ONES[rest % 10]}" if rest % 10 else ""))
    elif rest >= 10:
        parts.append(TEENS[rest - 10])
    elif rest:
        parts.append(ONES[rest])
    return " ".join(parts)


def make_corpus(n_held_out: int, seed: int) -> tuple[list[Example], list[Example]]:
    """`(train, held_out)`: every number in 1..999 once, the held-out ones drawn at random first."""
    numbers = list(range(1, 1000))
    random.Random(seed).shuffle(numbers)
    examples = [(f"Write {number_words(n)} in digits.", str(n)) for n in numbers]
    return examples[n_held_out:], examples[:n_held_out]


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The token ids `msfx generate --prompt QUESTION` feeds the model (its chat-template call)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def encode(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)`: prompt + answer + eos; labels -100 except on the answer and the eos."""
    prompt = prompt_ids(tokenizer, example[0])
    answer = tokenizer(example[1], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def pad_batch(rows: list[tuple[list[int], list[int]]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded `input_ids` / `attention_mask` / `labels` `[len(rows), length]`: one fixed shape,
    so the train step compiles once; right padding keeps each row's positions those of the CLI."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    labels = np.full((len(rows), length), -100, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, (row_ids, row_labels) in enumerate(rows):
        ids[r, :len(row_ids)], labels[r, :len(row_ids)], mask[r, :len(row_ids)] = row_ids, row_labels, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def parse_answer(reply: str) -> str | None:
    """The first integer in a reply (the base model often wraps it: "A: 288"), or None."""
    match = re.search(r"\d+", reply)
    return match.group() if match else None


def evaluate(model, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int
             ) -> tuple[float, list[str]]:
    """`(accuracy, replies)`: greedy replies to the questions, left-padded batches; a reply is correct
    when its first integer equals the answer."""
    replies: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = [prompt_ids(tokenizer, q) for q, _ in examples[start:start + batch_size]]
        width = max(map(len, prompts))
        ids = np.array([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], np.int64)
        mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int64)
        # eager: compiling the decode graph took longer than generating these few tokens (measured
        # at load ~7: 100 prompts, 8 new tokens, batches of 50: 49 s eager, 198 s with jit="decode")
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             jit=False)
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    correct = sum(parse_answer(reply) == answer for reply, (_, answer) in zip(replies, examples))
    return correct / len(examples), replies


def train(model, tokenizer, train_examples: list[Example], args: argparse.Namespace):
    """Full fine-tuning with `msfx.Trainer` (its compiled step; AdamW, linear warmup and decay,
    clipping at 1.0); the model's weights are updated in place and it is returned.

    `args`: the command's `steps`, `batch_size`, `learning_rate`, `warmup_ratio`, `weight_decay`,
    `seed` and `log_every`; checkpoints go to `OUTPUT_DIR/checkpoints` every `save_steps` (0: none).
    """
    encoded = [encode(tokenizer, example) for example in train_examples]
    length = max(len(ids) for ids, _ in encoded)
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in encoded]
    training_args = msfx.TrainingArguments(
        output_dir=str(Path(args.output_dir) / "checkpoints"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_ratio, weight_decay=args.weight_decay, max_grad_norm=1.0,
        lr_scheduler_type="linear", logging_steps=args.log_every, save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, seed=args.seed, report_to="none", disable_tqdm=True)
    trainer = msfx.Trainer(model=model, args=training_args, train_dataset=rows,
                           data_collator=lambda batch: pad_batch([(r["input_ids"], r["labels"]) for r in batch],
                                                                 length, tokenizer.pad_token_id))
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _add_model_args(parser)  # --model / --gguf-file / --dtype as `msfx generate` (default: SmolLM2's GGUF)
    parser.add_argument("--output-dir", required=True, help="where to save the fine-tuned model and tokenizer")
    parser.add_argument("--steps", type=_positive_int, default=30)
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--held-out", type=_positive_int, default=100, help="numbers never trained on")
    parser.add_argument("--eval-batch-size", type=_positive_int, default=100)
    parser.add_argument("--max-new-tokens", type=_positive_int, default=12)
    parser.add_argument("--log-every", type=_positive_int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint")
    args = parser.parse_args(argv)

    begin = time.perf_counter()
    model, tokenizer = _load(args)
    train_examples, held_out = make_corpus(args.held_out, args.seed)
    print(f"loaded {model.num_parameters():,} parameters in {time.perf_counter() - begin:.0f} s; "
          f"{len(train_examples)} training questions, {len(held_out)} held out", flush=True)

    def report(label: str, model) -> None:
        start = time.perf_counter()
        accuracy, replies = evaluate(model, tokenizer, held_out, args.eval_batch_size, args.max_new_tokens)
        wrong = [f"{q!r} -> {r!r}" for (q, a), r in zip(held_out, replies) if parse_answer(r) != a]
        print(f"{label}: held-out accuracy {accuracy:.0%} ({time.perf_counter() - start:.0f} s); e.g. "
              f"{held_out[0][0]!r} -> {replies[0]!r}; wrong: {'; '.join(wrong[:3]) or 'none'}", flush=True)

    report("base model", model)
    start = time.perf_counter()
    model = train(model, tokenizer, train_examples, args)
    print(f"trained {args.steps} steps of {args.batch_size} in {time.perf_counter() - start:.0f} s", flush=True)
    report("fine-tuned", model)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved to {Path(args.output_dir)}; total {time.perf_counter() - begin:.0f} s\n"
          f"try: msfx generate --model {args.output_dir} --prompt {held_out[0][0]!r}")


if __name__ == "__main__":
    main()
