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

With `--config.lora=True` the model trains through LoRA adapters instead (`msfx.peft`: rank
`lora_r` on every linear layer but the head, `lora_learning_rate`); the adapter is saved in peft's
format to `OUTPUT_DIR/adapter` and the merged model to OUTPUT_DIR (so `msfx generate` runs it as is).
Measured with `lora=True` (under heavy load): held-out accuracy 15% -> 95%, peak memory 7.0 GiB
(AdamW state 37 MiB for 4.9M trained parameters).

Run: python examples/finetune_smollm2.py --config.output_dir=/tmp/smollm2-digits [--config.steps=N]
[--config.save_steps=N --config.resume] [--config.lora=True] (an `ml_collections` config,
`get_config()`; `--help` shows it).
"""
from __future__ import annotations

import random
import re
import resource
import time
from pathlib import Path

import msfx  # before numpy/mindspore: it quiets MindSpore's C++ log (compiling a step prints pages of it)
import numpy as np
from absl import app
from ml_collections import ConfigDict, config_dict, config_flags

from msfx.cli import _load
from msfx.peft import LoraConfig, get_peft_model

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


def train(model, tokenizer, train_examples: list[Example], config: ConfigDict):
    """Fine-tuning with `msfx.Trainer` (its compiled step; AdamW, linear warmup and decay, clipping at
    1.0) of all the weights, or of LoRA adapters with `config.lora` (`model` is then a `PeftModel`); the
    weights are updated in place and the model is returned.

    `config`: `get_config()`'s `steps`, `batch_size`, `learning_rate` (`lora_learning_rate`), `warmup_ratio`,
    `weight_decay`, `seed` and `log_every`; checkpoints go to `OUTPUT_DIR/checkpoints` every `save_steps`
    (0: none).
    """
    encoded = [encode(tokenizer, example) for example in train_examples]
    length = max(len(ids) for ids, _ in encoded)
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in encoded]
    training_args = msfx.TrainingArguments(
        output_dir=str(Path(config.output_dir) / "checkpoints"), max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lora_learning_rate if config.lora else config.learning_rate,
        warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay, max_grad_norm=1.0,
        lr_scheduler_type="linear", logging_steps=config.log_every,
        save_strategy="steps" if config.save_steps else "no", save_steps=config.save_steps or 500, seed=config.seed, report_to="none", disable_tqdm=True)
    trainer = msfx.Trainer(model=model, args=training_args, train_dataset=rows,
                           data_collator=lambda batch: pad_batch([(r["input_ids"], r["labels"]) for r in batch],
                                                                 length, tokenizer.pad_token_id))
    trainer.train(resume_from_checkpoint=True if config.resume else None)
    state = sum(int(np.prod(t.shape)) * 4 for t in trainer._opt_state)
    print(f"AdamW state: {state / 2 ** 20:.1f} MiB for {sum(int(np.prod(t.shape)) for t in trainer._leaves):,} "
          "trained parameters", flush=True)
    return model


POSITIVE = ("steps", "batch_size", "held_out", "eval_batch_size", "max_new_tokens", "log_every", "lora_r")


def get_config() -> ConfigDict:
    """The options and their defaults; each one is set from the command line as `--config.NAME=VALUE`.
    `model` / `gguf_file` / `dtype` as `msfx generate`'s (default: SmolLM2's GGUF); `output_dir` (required)
    gets the fine-tuned model and tokenizer; `held_out` numbers are never trained on; `save_steps`
    checkpoints every N steps (0: none); `resume` resumes from the newest checkpoint; `lora` trains
    LoRA adapters of rank `lora_r` (alpha `lora_alpha`) on every linear layer but the head instead of
    all the weights, at `lora_learning_rate`."""
    return ConfigDict(dict(
        model=config_dict.placeholder(str), gguf_file=config_dict.placeholder(str), dtype="auto",
        output_dir=config_dict.placeholder(str), steps=30, batch_size=8, learning_rate=1e-4, warmup_ratio=0.1,
        weight_decay=0.0, held_out=100, eval_batch_size=100, max_new_tokens=12, log_every=10, seed=0,
        save_steps=0, resume=False, lora=False, lora_r=16, lora_alpha=32, lora_learning_rate=1e-3))


def check_config(config: ConfigDict) -> None:
    """Raises:
        ValueError: `output_dir` unset, a count in `POSITIVE` not positive, or an unknown `dtype`."""
    if not config.output_dir:
        raise ValueError("config.output_dir is required (--config.output_dir=DIR)")
    for name in POSITIVE:
        if config[name] <= 0:
            raise ValueError(f"config.{name} must be a positive integer, got {config[name]}")
    if config.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ValueError(f"config.dtype must be auto, float32, float16 or bfloat16, got {config.dtype!r}")


def main(config: ConfigDict) -> None:
    """Load, evaluate, fine-tune, evaluate and save as the module docstring says (`config`: `get_config()`'s)."""
    check_config(config)
    begin = time.perf_counter()
    model, tokenizer = _load(config)
    train_examples, held_out = make_corpus(config.held_out, config.seed)
    print(f"loaded {model.num_parameters():,} parameters in {time.perf_counter() - begin:.0f} s; "
          f"{len(train_examples)} training questions, {len(held_out)} held out", flush=True)

    def report(label: str, model) -> None:
        start = time.perf_counter()
        accuracy, replies = evaluate(model, tokenizer, held_out, config.eval_batch_size, config.max_new_tokens)
        wrong = [f"{q!r} -> {r!r}" for (q, a), r in zip(held_out, replies) if parse_answer(r) != a]
        print(f"{label}: held-out accuracy {accuracy:.0%} ({time.perf_counter() - start:.0f} s); e.g. "
              f"{held_out[0][0]!r} -> {replies[0]!r}; wrong: {'; '.join(wrong[:3]) or 'none'}", flush=True)

    report("base model", model)
    if config.lora:
        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"), seed=config.seed)
        model.print_trainable_parameters()
    start = time.perf_counter()
    model = train(model, tokenizer, train_examples, config)
    print(f"trained {config.steps} steps of {config.batch_size} in {time.perf_counter() - start:.0f} s", flush=True)
    report("fine-tuned", model)
    if config.lora:
        model.save_pretrained(Path(config.output_dir) / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(config.output_dir)
    tokenizer.save_pretrained(config.output_dir)
    print(f"saved to {Path(config.output_dir)}; total {time.perf_counter() - begin:.0f} s\n"
          f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB\n"
          f"try: msfx generate --model {config.output_dir} --prompt {held_out[0][0]!r}")


def _run(argv: list[str]) -> None:
    if argv[1:]:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config.NAME=VALUE")
    main(_CONFIG.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), "fine-tuning options (see get_config)")
    app.run(_run)
