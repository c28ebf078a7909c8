"""HF's `Trainer` and `TrainingArguments` over msfx models, with the compiled `TrainStep`.

Follows `transformers.Trainer` (5.x): the same arguments (`TrainingArguments` is HF's own
dataclass, extended), the same loop arithmetic (updates per epoch, `max_steps`, warmup, logging /
evaluation / saving by strategy through HF's own `DefaultFlowCallback`, `TrainerState`,
`TrainerControl` and callbacks, `log_history`), the same loss normalization under gradient
accumulation (`num_items_in_batch` for causal LMs, the mean over micro-batches otherwise), and
`evaluate` / `predict` returning HF's metric names. Datasets are anything indexable that yields
dicts (a `datasets.Dataset`, a list of dicts); collators are `transformers`' own with
`return_tensors="np"`.

What differs from HF, on purpose:
- the step is `msfx.train.TrainStep` (one compiled loss graph per batch shape: pad to a few shapes,
  e.g. a collator's `pad_to_multiple_of`, to avoid recompiling);
- the parameters train as float32 master leaves; `bf16` / `fp16` set the compute dtype (see
  `msfx.train.step`);
- checkpoints hold safetensors / JSON instead of torch pickles, are written atomically
  (`msfx.train.checkpoint`), and resuming continues bit for bit: the data order of every epoch is a
  function of `seed` and the epoch, the dropout masks of `seed` and the step (`msfx.layers.dropout`:
  the same rates at the same places as HF, other draws), and the RNG states are restored;
- data parallel runs under MindSpore's `msrun` instead of torchrun / accelerate
  (`msfx.train.distributed`): worker `r` of `N` trains on per-device batches `r, r + N, ...` of
  the epoch's order (accelerate's sharding, so a global batch is `per_device_train_batch_size * N *
  gradient_accumulation_steps` consecutive rows), the gradients are summed inside the compiled
  update, worker 0 logs and writes the checkpoints, every worker evaluates the whole eval set.
  `zero_stage=1` shards the optimizer state (ZeRO-1); checkpoints hold the full state either way.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import mindspore as ms
import numpy as np
import transformers
from mindspore import Tensor
from safetensors.numpy import load_file, save_file
from transformers import DataCollatorWithPadding, default_data_collator
from transformers.trainer_callback import (CallbackHandler, DefaultFlowCallback, ExportableState, PrinterCallback,
                                           ProgressCallback, TrainerCallback, TrainerControl, TrainerState)
from transformers.trainer_utils import (EvalPrediction, IntervalStrategy, PredictionOutput, SaveStrategy, TrainOutput,
                                        speed_metrics)

from msfx.errors import CorruptCheckpointError
from msfx.jit import Graph
from msfx.inputs import check_token_ids
from msfx.jit import no_host_reads
from msfx.layers.losses import IGNORE_INDEX
from msfx.modeling import PreTrainedModel
from msfx.params import flatten, unflatten
from msfx.peft import PeftModel
from msfx.train import checkpoint as ckpt
from msfx.train.distributed import ZERO_STAGES, data_parallel
from msfx.train.optim import SGD, AdamW
from msfx.train.schedules import get_schedule, warmup_steps_for
from msfx.train.step import TrainStep, batch_tensor, causal_lm_items

TRAINER_STATE_NAME = "trainer_state.json"
SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length")
# The `TrainingArguments` msfx's Trainer honours (read here, in `DefaultFlowCallback` / `TrainerState`, or by the
# reporting callbacks `report_to` names); any other set to a non-default value is named in a warning.
HONOURED = frozenset({
    "output_dir", "per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs", "max_steps",
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "optim",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "gradient_accumulation_steps", "max_grad_norm",
    "bf16", "fp16", "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
    "disable_tqdm", "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
    "trackio_static_space_id", "eval_strategy", "eval_steps", "eval_delay", "save_strategy", "save_steps",
    "save_total_limit", "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "seed",
    "data_seed", "use_cpu", "dataloader_drop_last", "remove_unused_columns", "train_sampling_strategy",
    "length_column_name", "jit", "zero_stage",
    "do_train", "do_eval", "do_predict", "resume_from_checkpoint",  # for scripts: HF's Trainer ignores them too
})
_LABEL_COLUMNS = ("label", "label_ids", "labels")
_SPAN_LABELS = ("start_positions", "end_positions")


def label_names(model) -> tuple[str, ...]:
    """HF's `find_labels`: the arguments of `model` that take labels: `start_positions` and
    `end_positions` for question answering, else `labels`."""
    return _SPAN_LABELS if "QuestionAnswering" in type(model).__name__ else ("labels",)


def _nested_concat(batches: list[tuple[np.ndarray, ...]]) -> np.ndarray | tuple[np.ndarray, ...]:
    """Per-batch tuples of arrays concatenated position by position (`_pad_concat`); one array when
    each batch has one (HF's predictions: logits, or a QA model's start and end logits)."""
    joined = tuple(_pad_concat([batch[i] for batch in batches]) for i in range(len(batches[0])))
    return joined[0] if len(joined) == 1 else joined


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """`transformers.TrainingArguments` (every argument with HF's name, default and meaning), plus:

    - `warmup_ratio`: HF 4.x's warmup fraction of the total steps (HF 5.x folds it into
      `warmup_steps` < 1, which works too); used when `warmup_steps` is 0.
    - `jit`: compile the training and evaluation steps with `mindspore.jit` (False: eager, for debugging).
    - `use_cpu` defaults to True: it only silences torch's device checks; msfx trains on MindSpore's
      device (`mindspore.set_context(device_target=...)`).
    - `zero_stage`: under `msrun`, 1 shards the AdamW / SGD state over the workers (ZeRO-1, each keeps
      1/N of it); 0 (default) keeps it whole on every worker. Ignored in a single process.
    """

    warmup_ratio: float = field(default=0.0, metadata={"help": "Linear warmup over this fraction of the steps."})
    jit: bool = field(default=True, metadata={"help": "Compile the steps with mindspore.jit."})
    use_cpu: bool = field(default=True, metadata={"help": "Ignored by msfx (torch's device selection)."})
    zero_stage: int = field(default=0, metadata={"help": "1: shard the optimizer state over the msrun workers."})

    def __post_init__(self):
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {self.zero_stage!r}")
        super().__post_init__()


class MsfxProgressCallback(ProgressCallback):
    """HF's tqdm progress bar, with the latest loss and learning rate on the bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=logs["loss"], lr=f"{logs.get('learning_rate', 0):.3g}")


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    ms.set_seed(seed)


def _rng_state() -> dict:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(state), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(saved: Mapping) -> None:
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, cached))


def _pad_concat(arrays: list[np.ndarray], pad: int = IGNORE_INDEX) -> np.ndarray:
    """Concatenate along the batch axis, padding the other axes with `pad` (HF's `nested_concat`)."""
    if len({a.shape[1:] for a in arrays}) == 1:
        return np.concatenate(arrays)
    shape = [max(a.shape[i] for a in arrays) for i in range(1, arrays[0].ndim)]
    out = np.full((sum(a.shape[0] for a in arrays), *shape), pad, arrays[0].dtype)
    row = 0
    for a in arrays:
        out[(slice(row, row + a.shape[0]), *(slice(0, n) for n in a.shape[1:]))] = a
        row += a.shape[0]
    return out


def not_honoured(args: TrainingArguments) -> list[str]:
    """The arguments set to a non-default value that msfx's Trainer ignores (not in `HONOURED`)."""
    reference = type(args)(output_dir=args.output_dir, use_cpu=args.use_cpu)
    names = [f.name for f in dataclasses.fields(args) if f.init and f.name not in HONOURED
             and getattr(args, f.name) != getattr(reference, f.name)]
    if str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "epoch":
        names.append("logging_strategy='epoch'")  # HF logs the epoch's mean loss: msfx logs none
    return names


def _check_arguments(args: TrainingArguments) -> None:
    """Refuses a `train_sampling_strategy` msfx lacks; warns once, naming them, about arguments it ignores.

    Raises:
        ValueError: `train_sampling_strategy` not in `SAMPLING_STRATEGIES`.
    """
    if args.train_sampling_strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"train_sampling_strategy={args.train_sampling_strategy!r} is not supported by msfx.Trainer: "
                         f"use one of {SAMPLING_STRATEGIES}")
    ignored = not_honoured(args)
    if ignored:
        warnings.warn(f"msfx.Trainer ignores these TrainingArguments: {', '.join(ignored)}", stacklevel=3)


def _warn_ignored(**given) -> None:
    """Warns, naming them, about the arguments given that msfx ignores (the predictions are always the
    logits, so `ignore_keys` has nothing to drop; no hyperparameter search)."""
    names = [name for name, value in given.items() if value]
    if names:
        warnings.warn(f"msfx.Trainer ignores the argument(s) {', '.join(names)}", stacklevel=3)


def length_grouped_indices(lengths: Sequence[int], batch_size: int, order: Sequence[int]) -> list[int]:
    """HF's `get_length_grouped_indices` over a given random `order` (HF draws it with `torch.randperm`):
    mega-batches of `min(len // (4 * batch_size), 50)` (at least 1) batches, each sorted by length,
    longest first, and the longest row of all moved to the front."""
    mult = max(min(len(lengths) // (batch_size * 4), 50), 1)
    size = mult * batch_size
    megabatches = [sorted((int(row) for row in order[start:start + size]), key=lambda row: lengths[row], reverse=True)
                   for start in range(0, len(lengths), size)]
    longest = int(np.argmax([lengths[m[0]] for m in megabatches]))
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for megabatch in megabatches for i in megabatch]


class _TrainPlan(NamedTuple):
    """A `Trainer.train` run's sizes: per-device batch, accumulation, this worker's rank among
    `workers`, dataset rows, batches and optimizer updates per epoch, the run's updates and epochs,
    and the learning-rate schedule (update count -> factor)."""

    batch_size: int
    gas: int
    rank: int
    workers: int
    rows: int
    batches_per_epoch: int
    updates_per_epoch: int
    max_steps: int
    epochs: int
    schedule: Callable[[int], float]

    def windows(self, order: Sequence[int]) -> list[list]:
        """An epoch's windows in dataset `order`: this worker's micro-batches (row indices) of each
        global window of `gas * workers` batches (the last window may leave a worker none: zero gradients)."""
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.batches_per_epoch)]
        size = self.gas * self.workers
        return [batches[i:i + size][self.rank::self.workers] for i in range(0, len(batches), size)]


@dataclass
class _Tally:
    """Running sums of one `Trainer.train` call: its start time and step, the losses since the
    last log and in all."""

    start: float
    steps_at_start: int
    last_logged: int
    logged_loss: float = 0.0
    total_loss: float = 0.0


class Trainer:
    """`transformers.Trainer` for msfx models (see the module docstring for what differs).

    Args:
        model: an msfx `PreTrainedModel` with a loss head (`...ForCausalLM`, `...ForSequenceClassification`,
            `...ForMaskedLM`, `T5ForConditionalGeneration`, ...), or an `msfx.peft.PeftModel` over one. Only
            Parameters with `requires_grad` train (HF's rule): a LoRA model's adapters get gradients and
            optimizer state, its frozen base weights neither, and its checkpoints hold the adapter alone.
        args: `msfx.TrainingArguments` (default: `output_dir="trainer_output"`).
        data_collator: turns a list of dataset rows into a batch of numpy arrays; default
            `DataCollatorWithPadding(processing_class, return_tensors="np")` with a tokenizer, else
            `default_data_collator(..., return_tensors="np")`.
        train_dataset, eval_dataset: indexable datasets of dict rows (`eval_dataset` may be a dict
            of them, evaluated under `eval_{name}_` prefixes).
        processing_class: the tokenizer; saved with every checkpoint.
        compute_metrics: `EvalPrediction -> dict[str, float]` (predictions: the logits, numpy).
        callbacks: `transformers.TrainerCallback` classes or instances, added to HF's defaults.
        preprocess_logits_for_metrics: `(logits, labels) -> array`, applied per evaluation batch.

    Raises:
        TypeError: `model` is not an msfx model.
        ValueError: an evaluation strategy without `eval_dataset`; an `optim` msfx lacks.
    """

    def __init__(self, model: PreTrainedModel, args: TrainingArguments | None = None,
                 data_collator: Callable | None = None, train_dataset: Sequence | None = None,
                 eval_dataset: Sequence | Mapping[str, Sequence] | None = None, processing_class=None,
                 compute_metrics: Callable[[EvalPrediction], dict] | None = None,
                 callbacks: Sequence[TrainerCallback | type] | None = None,
                 preprocess_logits_for_metrics: Callable | None = None):
        if not isinstance(model, (PreTrainedModel, PeftModel)):
            raise TypeError(f"msfx.Trainer trains msfx models (msfx.PreTrainedModel, msfx.peft.PeftModel), got "
                            f"{type(model).__name__}; "
                            "load the checkpoint with the msfx class of the same name")
        self.model, self.args = model, args if args is not None else TrainingArguments(output_dir="trainer_output")
        self.processing_class, self.compute_metrics = processing_class, compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        if data_collator is None:
            data_collator = DataCollatorWithPadding(processing_class, return_tensors="np") \
                if hasattr(processing_class, "pad") else (lambda rows: default_data_collator(rows, return_tensors="np"))
        self.data_collator = data_collator
        _check_arguments(self.args)
        if self.args.eval_strategy != IntervalStrategy.NO and eval_dataset is None:
            raise ValueError(f"eval_strategy={self.args.eval_strategy.value!r} needs an eval_dataset")
        self.optimizer = self._optimizer()
        self._dp = data_parallel(self.args.zero_stage)  # None in a single process
        forward = model.get_base_model().construct if isinstance(model, PeftModel) else model.construct
        self._inputs = {name for name in inspect.signature(forward).parameters if name != "kwargs"}
        self._causal = bool(getattr(model, "accepts_loss_kwargs", False))
        self._labels = label_names(model)
        self.state = TrainerState()
        self.control = TrainerControl()
        defaults = [DefaultFlowCallback, *self._reporting_callbacks(),
                    PrinterCallback if self.args.disable_tqdm else MsfxProgressCallback]
        self.callback_handler = CallbackHandler(defaults, model, processing_class, self.optimizer, None)
        for callback in callbacks or ():
            self.callback_handler.add_callback(callback)
        params, keys = flatten(dict(model.params))
        self._trained = [p for p in params if p.requires_grad]  # the rest is passed to the steps, untrained
        if not self._trained:
            raise ValueError("the model has no Parameter with requires_grad=True: nothing to train")
        self._leaves = [Tensor(p.asnumpy().astype(np.float32)) for p in self._trained]
        self._keys = [k for p, k in zip(params, keys) if p.requires_grad]
        self._frozen = [Tensor(p.asnumpy().astype(np.float32)) for p in params if not p.requires_grad]
        self._frozen_keys = [k for p, k in zip(params, keys) if not p.requires_grad]
        self._opt_state: list[Tensor] | None = None
        self._optimizer_steps = 0
        self._step: TrainStep | None = None
        self._eval_fns: dict[tuple, Graph] = {}
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    # ----------------------------------------------------------------------------------- setup

    def _reporting_callbacks(self) -> list:
        if not self.args.report_to:
            return []
        from transformers.integrations import get_reporting_integration_callbacks
        return get_reporting_integration_callbacks(self.args.report_to)

    def _optimizer(self) -> AdamW | SGD:
        """HF's `optim` by name: the `adamw_*` variants are AdamW (torch's arithmetic), `sgd` SGD."""
        name = str(getattr(self.args.optim, "value", self.args.optim))
        if name.startswith("adamw"):
            return AdamW(betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
                         weight_decay=self.args.weight_decay)
        if name == "sgd":
            return SGD(weight_decay=self.args.weight_decay)
        raise ValueError(f"optim={name!r} is not supported by msfx.Trainer: use an adamw_* optimizer or 'sgd'")

    def _schedule(self, max_steps: int) -> Callable[[int], float]:
        args = self.args
        warmup = warmup_steps_for(max_steps, args.warmup_steps, args.warmup_ratio)
        kwargs = dict(args.lr_scheduler_kwargs or {})
        name = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
        if name == "polynomial":
            kwargs.setdefault("lr_init", args.learning_rate)
        return get_schedule(name, warmup, max_steps, **kwargs)

    def add_callback(self, callback) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    # ------------------------------------------------------------------------------------ data

    def _row(self, dataset, index: int) -> dict:
        row = dataset[int(index)]
        if not isinstance(row, Mapping):
            raise TypeError(f"dataset rows must be dicts of model inputs, row {index} is a {type(row).__name__}")
        if self.args.remove_unused_columns:  # as HF: drop what the model's forward does not take (text columns)
            row = {k: v for k, v in row.items() if k in self._inputs or k in _LABEL_COLUMNS}
        return dict(row)

    def _batch(self, dataset, indices: Sequence[int], training: bool) -> dict[str, np.ndarray]:
        """Collate rows into numpy arrays and check them on the host, before any graph sees them."""
        batch = self.data_collator([self._row(dataset, i) for i in indices])
        batch = {k: np.asarray(v) for k, v in dict(batch).items() if v is not None}
        config = self.model.config
        if "labels" in batch and getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" not in batch:
            batch["decoder_input_ids"] = self.model._shift_right(batch["labels"]).asnumpy()
        self._check_batch(batch, training)
        return batch

    def _check_batch(self, batch: Mapping[str, np.ndarray], training: bool) -> None:
        """Raises ValueError / TypeError with the tensor named for what the compiled step cannot check."""
        config = self.model.config
        if "input_ids" not in batch and "pixel_values" not in batch:
            raise ValueError(f"the batch has no 'input_ids' (it has {sorted(batch)})")
        if training and any(name not in batch for name in self._labels):
            raise ValueError(f"the batch has no {' / '.join(map(repr, self._labels))} (it has {sorted(batch)}): the "
                             "Trainer trains on the model's loss; for causal LMs "
                             "DataCollatorForLanguageModeling(tokenizer, mlm=False) makes them")
        for name in ("input_ids", "decoder_input_ids"):
            if name in batch:
                try:
                    check_token_ids(batch[name], config.vocab_size)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
        if mask is not None and ids is not None and mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {list(batch['attention_mask'].shape)}, input_ids "
                             f"{list(batch['input_ids'].shape)}")
        for name in _SPAN_LABELS:
            if name in batch and (batch[name].dtype.kind not in "iu" or batch[name].shape[:1] != ids.shape[:1]):
                raise ValueError(f"{name} must be integer token positions [batch], got {batch[name].dtype} "
                                 f"{list(batch[name].shape)}")
        labels = batch.get("labels")
        if labels is None:
            return
        classification = type(self.model).__name__.endswith("ForSequenceClassification")
        per_token = type(self.model).__name__.endswith("ForTokenClassification")
        rows = next(iter(batch.values())).shape[0]
        if classification:
            expected = "[batch] or [batch, num_labels]"
            fits = labels.shape in ((rows,), (rows, config.num_labels))
        elif getattr(config, "is_encoder_decoder", False):
            expected, fits = "[batch, target_length]", labels.ndim == 2 and labels.shape[0] == rows
        else:
            expected, fits = f"like input_ids {list(ids.shape) if ids is not None else ''}", \
                ids is not None and labels.shape == ids.shape
        if not fits:
            raise ValueError(f"labels have shape {list(labels.shape)}, expected {expected}")
        if labels.dtype.kind == "f" and classification:
            return  # regression / multi-label targets
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels must be integer class or token ids, got {labels.dtype}")
        classes = config.num_labels if classification or per_token else config.vocab_size
        bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= classes))]
        if bad.size:
            raise ValueError(f"label {bad[0]} is out of range: labels must be -100 (ignored) or in [0, {classes})")

    def _epoch_order(self, epoch: int, size: int, lengths: Sequence[int] | None) -> np.ndarray:
        """The row order of an epoch by `train_sampling_strategy` (HF's `_get_train_sampler`): a
        function of the seed and the epoch alone (resumable). `lengths`: each row's length, for
        "group_by_length"."""
        if self.args.train_sampling_strategy == "sequential":
            return np.arange(size)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        order = np.random.default_rng([seed, epoch]).permutation(size)
        if self.args.train_sampling_strategy == "group_by_length":
            window = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            return np.asarray(length_grouped_indices(lengths, window, order))
        return order

    def _row_lengths(self, dataset) -> list[int] | None:
        """Row lengths for "group_by_length", as HF's `LengthGroupedSampler`: the `length_column_name`
        column of a `datasets.Dataset`, else the length of each row's first model input.

        Raises:
            ValueError: the rows lack that input.
        """
        if self.args.train_sampling_strategy != "group_by_length":
            return None
        column = self.args.length_column_name
        if column in (getattr(dataset, "column_names", None) or ()):
            return [int(n) for n in dataset[column]]
        names = getattr(self.processing_class, "model_input_names", None)
        name = names[0] if names else "input_ids"
        if not isinstance(dataset[0], Mapping) or name not in dataset[0]:
            raise ValueError("Can only automatically infer lengths for datasets whose items are dictionaries with an "
                             f"'{name}' key.")
        return [len(row[name]) for row in dataset]

    # ---------------------------------------------------------------------------------- losses

    def _loss_fn(self, tree: dict, batch: dict, num_items: Tensor) -> Tensor:
        with self.model.using_params(tree):
            if self._causal:  # normalized by the window's token count, as HF passes num_items_in_batch
                return self.model(**batch, num_items_in_batch=num_items).loss
            return self.model(**batch).loss / num_items

    def _count_items(self, batch: Mapping[str, np.ndarray]) -> float:
        return causal_lm_items(batch) if self._causal else 1.0

    # ---------------------------------------------------------------------------------- training

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None,
              ignore_keys_for_eval: list[str] | None = None) -> TrainOutput:
        """Train on `train_dataset`; `resume_from_checkpoint` True resumes from the newest complete
        checkpoint in `output_dir`, a path from that checkpoint. `trial` (hyperparameter search) and
        `ignore_keys_for_eval` are HF's arguments msfx ignores, with a warning.

        Returns HF's `TrainOutput(global_step, training_loss, metrics)`.

        Raises:
            ValueError: no or an empty `train_dataset`, `resume_from_checkpoint=True` without a
                checkpoint, a bad batch (see `_check_batch`).
            CorruptCheckpointError: the checkpoint to resume from is incomplete or damaged (named).
        """
        _warn_ignored(trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)
        plan = self._plan()
        if self.is_world_process_zero():
            ckpt.clean_partial(self.args.output_dir)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = ckpt.latest_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._start(plan, resume_from_checkpoint)
        tally = _Tally(time.time(), self.state.global_step, self.state.global_step)
        epochs_done, windows_done = divmod(self.state.global_step, plan.updates_per_epoch)
        lengths = self._row_lengths(self.train_dataset)
        for epoch in range(epochs_done, plan.epochs):
            windows = plan.windows(self._epoch_order(epoch, plan.rows, lengths))
            self.control = self.callback_handler.on_epoch_begin(self.args, self.state, self.control)
            for w, window in enumerate(windows):
                if epoch == epochs_done and w < windows_done:
                    continue  # trained before the checkpoint we resumed from
                self._update(window, epoch + (w + 1) / len(windows), plan, tally)
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            self.control = self.callback_handler.on_epoch_end(self.args, self.state, self.control)
            self._maybe_evaluate_and_save()
            if self.control.should_training_stop:
                break
        return self._finish(plan, tally)

    def _plan(self) -> _TrainPlan:
        """The run's sizes from the arguments and the dataset (HF's meaning of each, over `workers`)."""
        args, dataset = self.args, self.train_dataset
        if dataset is None or len(dataset) == 0:
            raise ValueError("Trainer.train needs a non-empty train_dataset")
        batch_size, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
        rank, workers = (self._dp.rank, self._dp.world_size) if self._dp is not None else (0, 1)
        rows = len(dataset)
        batches_per_epoch = rows // batch_size if args.dataloader_drop_last else math.ceil(rows / batch_size)
        if batches_per_epoch == 0:
            raise ValueError(f"train_dataset has {rows} rows, fewer than one batch of {batch_size} with "
                             "dataloader_drop_last=True")
        updates_per_epoch = max(math.ceil(batches_per_epoch / (gas * workers)), 1)
        if args.max_steps > 0:
            max_steps, epochs = args.max_steps, math.ceil(args.max_steps / updates_per_epoch)
        else:
            max_steps, epochs = math.ceil(args.num_train_epochs * updates_per_epoch), math.ceil(args.num_train_epochs)
        return _TrainPlan(batch_size, gas, rank, workers, rows, batches_per_epoch, updates_per_epoch, max_steps,
                          epochs, self._schedule(max_steps))

    def _start(self, plan: _TrainPlan, resume_from_checkpoint) -> None:
        """Fresh state, train step and optimizer state, then the checkpoint's when resuming."""
        args = self.args
        _set_seed(args.seed)
        self.state = TrainerState(stateful_callbacks=[cb for cb in self.callback_handler.callbacks
                                                      if isinstance(cb, ExportableState)])
        # HF's callbacks print on process 0
        self.state.is_world_process_zero = self.state.is_local_process_zero = plan.rank == 0
        self.state.compute_steps(args, plan.max_steps)
        self.state.max_steps, self.state.num_train_epochs = plan.max_steps, plan.epochs
        self.state.train_batch_size = plan.batch_size
        self._step = TrainStep(self._loss_fn, self._keys, self.optimizer, count_items=self._count_items,
                               max_grad_norm=args.max_grad_norm, jit=args.jit,
                               mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else None,
                               dropout_seed=args.seed, grad_reducer=self._dp, frozen_keys=self._frozen_keys)
        if self._dp is not None:
            self._dp.bind([tuple(leaf.shape) for leaf in self._leaves])
        self._opt_state = self.optimizer.init(self._local(self._leaves))
        self._optimizer_steps = 0
        if resume_from_checkpoint:
            self._load_checkpoint(Path(resume_from_checkpoint))
        if self._dp is not None:  # every worker has read the checkpoint before worker 0 may rotate it away
            self._dp.barrier()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)

    def _update(self, window: list, epoch: float, plan: _TrainPlan, tally: _Tally) -> None:
        """One optimizer update over `window` (this worker's micro-batches, as row indices), with
        HF's callbacks, logging, evaluation and saving around it."""
        args = self.args
        self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
        micro = [self._batch(self.train_dataset, indices, training=True) for indices in window]
        lr = args.learning_rate * plan.schedule(self._optimizer_steps)
        self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
        # the dropout masks follow the seed and the step count, both restored on resume
        result = self._step(self._leaves, self._opt_state, micro, lr, self._optimizer_steps + 1,
                            dropout_step=self.state.global_step + 1, frozen_leaves=self._frozen)
        self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
        if result.applied:
            self._leaves, self._opt_state = result.params, result.opt_state
            self._optimizer_steps += 1
        loss = float(result.loss.asnumpy())
        if args.logging_nan_inf_filter and not math.isfinite(loss):  # as HF: the running mean instead
            loss = tally.logged_loss / max(1, self.state.global_step - tally.last_logged)
        tally.logged_loss += loss
        tally.total_loss += loss
        self.state.global_step += 1
        self.state.epoch = epoch
        self.control = self.callback_handler.on_step_end(args, self.state, self.control)
        if self.control.should_log and self.state.global_step > tally.last_logged:
            self.log({"loss": tally.logged_loss / (self.state.global_step - tally.last_logged),
                      "grad_norm": float(result.grad_norm.asnumpy()), "learning_rate": lr})
            tally.logged_loss, tally.last_logged = 0.0, self.state.global_step
        self._maybe_evaluate_and_save()

    def _finish(self, plan: _TrainPlan, tally: _Tally) -> TrainOutput:
        """The best checkpoint's weights when asked, the model's Parameters updated, HF's train metrics."""
        args = self.args
        if args.load_best_model_at_end and self.state.best_model_checkpoint:
            self._leaves = self._checkpoint_leaves(Path(self.state.best_model_checkpoint))
        self._sync_model()
        steps = self.state.global_step - tally.steps_at_start
        # HF's count: the schedule's samples (rows x epochs, or max_steps full windows), pro rata of the steps run
        samples = plan.max_steps * plan.batch_size * plan.gas * plan.workers if args.max_steps > 0 \
            else plan.rows * args.num_train_epochs
        metrics = speed_metrics("train", tally.start, num_samples=samples * steps / max(plan.max_steps, 1),
                                num_steps=steps)
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = tally.total_loss / max(steps, 1)
        if self._step.scaler is not None:
            metrics["train_skipped_steps"] = self._step.scaler.skipped_steps
        self.log(metrics)  # adds `epoch`, which HF's returned metrics hold too
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def _maybe_evaluate_and_save(self) -> None:
        if self.control.should_evaluate:
            new_best = self._update_best(self.evaluate())
            if self.args.save_strategy == SaveStrategy.BEST:  # HF saves exactly when the metric improves
                self.control.should_save = new_best
        if self.control.should_save:
            self._save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _update_best(self, metrics: Mapping[str, float]) -> bool:
        """HF's `_determine_best_metric`: True when `metrics` hold a new best."""
        name = self.args.metric_for_best_model
        if name is None:
            return False
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            raise KeyError(f"metric_for_best_model is {key!r}, which is not in the evaluation metrics "
                           f"{sorted(metrics)}")
        better = np.greater if self.args.greater_is_better else np.less
        if self.state.best_metric is None:
            self.state.best_metric = float("-inf") if self.args.greater_is_better else float("inf")
        if better(metrics[key], self.state.best_metric):
            self.state.best_metric = metrics[key]
            if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
                self.state.best_global_step = self.state.global_step
            return True
        return False

    def log(self, logs: dict[str, float]) -> None:
        """Append `logs` (with `epoch` and `step`) to `state.log_history` and call `on_log`."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def _sync_model(self) -> None:
        """Write the trained leaves into the model's Parameters (in the model's dtype)."""
        for param, leaf in zip(self._trained, self._leaves):
            param.set_data(leaf if leaf.dtype == param.dtype else leaf.astype(param.dtype))
        self.model._steps = {}  # generation steps compiled before training are rebuilt on the new weights

    # ------------------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self) -> None:
        """`checkpoint-{global_step}`, written atomically (`msfx.train.checkpoint`), then rotated."""
        args, state = self.args, self.state
        best = Path(args.output_dir) / f"{ckpt.PREFIX}-{state.best_global_step}" if state.best_global_step else None
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ExportableState):
                state.stateful_callbacks[callback.__class__.__name__] = callback.state()

        slots = self.optimizer.slots()
        opt_state = self._opt_state if self._dp is None else self._dp.full_state(self._opt_state, len(slots))

        def write(path: Path) -> None:
            self.save_model(path)
            n = len(self._keys)
            save_file({f"{slot}.{key}": opt_state[i * n + j].asnumpy()
                       for i, slot in enumerate(slots) for j, key in enumerate(self._keys)},
                      str(path / "optimizer.safetensors"))
            scaler = None if self._step.scaler is None else self._step.scaler.state_dict()
            (path / "scheduler.json").write_text(json.dumps({"optimizer_steps": self._optimizer_steps,
                                                             "loss_scaler": scaler}, indent=2))
            (path / "rng_state.json").write_text(json.dumps(_rng_state()))
            (path / "training_args.json").write_text(args.to_json_string())
            saved = TrainerState(**{**vars(state)})
            if best is not None and (best.is_dir() or best.name == f"{ckpt.PREFIX}-{state.global_step}"):
                saved.best_model_checkpoint = str(best)
            saved.save_to_json(str(path / TRAINER_STATE_NAME))

        if self.is_world_process_zero():
            ckpt.write_checkpoint(args.output_dir, state.global_step, write)
        if self._dp is not None:  # the checkpoint is complete for every worker before any reads it
            self._dp.barrier()
        if best is not None and best.is_dir():
            state.best_model_checkpoint = str(best)
        if self.is_world_process_zero():
            ckpt.rotate_checkpoints(args.output_dir, args.save_total_limit,
                                    Path(state.best_model_checkpoint) if state.best_model_checkpoint else None)

    def _checkpoint_leaves(self, path: Path) -> list[Tensor]:
        """The float32 trained leaves stored in checkpoint `path` (HF layout, any msfx-saved head; a
        LoRA model's adapter in peft's format)."""
        if isinstance(self.model, PeftModel):
            stored = self.model.read_adapter(ckpt.verify_checkpoint(path))
            return [Tensor(stored[key].astype(np.float32)) for key in self._keys]
        loaded = type(self.model).from_pretrained(ckpt.verify_checkpoint(path), dtype="float32")
        stored = dict(zip(*flatten(dict(loaded.params))[::-1]))
        return [Tensor(stored[key].asnumpy()) for key in self._keys]

    def _load_checkpoint(self, path: Path) -> None:
        """Restore the parameters, optimizer and scheduler state, loss scaler, RNG states and
        `TrainerState` from a complete checkpoint."""
        ckpt.verify_checkpoint(path)
        self._leaves = self._checkpoint_leaves(path)
        try:
            stored = load_file(str(path / "optimizer.safetensors"))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CorruptCheckpointError(f"cannot read {path / 'optimizer.safetensors'}: {e}") from e
        names = [f"{slot}.{key}" for slot in self.optimizer.slots() for key in self._keys]
        missing = [name for name in names if name not in stored]
        if missing:
            raise CorruptCheckpointError(f"{path / 'optimizer.safetensors'} lacks the optimizer state "
                                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (another optimizer?)")
        self._opt_state = [Tensor(stored[name]) for name in names]
        if self._dp is not None:  # ZeRO-1: this worker's slice of the full state, whatever the saved worker count
            self._opt_state = self._dp.shard_state(self._opt_state, len(self.optimizer.slots()))
        scheduler = ckpt.read_json(path / "scheduler.json")
        self._optimizer_steps = int(scheduler["optimizer_steps"])
        if self._step.scaler is not None and scheduler.get("loss_scaler"):
            self._step.scaler.load_state_dict(scheduler["loss_scaler"])
        _set_rng_state(ckpt.read_json(path / "rng_state.json"))
        saved = ckpt.read_json(path / TRAINER_STATE_NAME)
        for name in ("global_step", "epoch", "log_history", "best_metric", "best_global_step",
                     "best_model_checkpoint", "total_flos"):
            setattr(self.state, name, saved.get(name, getattr(self.state, name)))
        for callback in self.callback_handler.callbacks:  # HF's `_load_callback_state`
            stored_state = (saved.get("stateful_callbacks") or {}).get(callback.__class__.__name__)
            if isinstance(callback, ExportableState) and isinstance(stored_state, dict):
                for attr, value in stored_state.get("attributes", {}).items():
                    setattr(callback, attr, value)

    def is_world_process_zero(self) -> bool:
        """True on the worker that logs and saves (`msrun`'s rank 0), and in a single process."""
        return self._dp is None or self._dp.rank == 0

    def _local(self, leaves: list[Tensor]) -> list[Tensor]:
        """The leaves whose optimizer state this worker keeps (all but under ZeRO-1)."""
        return leaves if self._dp is None else self._dp.local(leaves)

    def save_model(self, output_dir: str | os.PathLike | None = None) -> None:
        """`save_pretrained` of the trained model (and the tokenizer) into `output_dir` (default
        `args.output_dir`); under `msrun` worker 0 writes, the others return."""
        output_dir = output_dir or self.args.output_dir
        self._sync_model()
        if not self.is_world_process_zero():
            return
        self.model.save_pretrained(output_dir)
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)

    # ------------------------------------------------------------------------------- evaluation

    def _eval_fn(self, names: tuple[str, ...]) -> Graph:
        """`(*trained leaves, *frozen leaves, *batch tensors) -> (loss or 0, logits)` (a QA model: start
        and end logits), compiled per input names."""
        if names not in self._eval_fns:
            keys, model = self._keys + self._frozen_keys, self.model
            n = len(keys)
            has_labels = all(name in names for name in self._labels)
            outputs = ("start_logits", "end_logits") if self._labels == _SPAN_LABELS else ("logits",)

            def forward(*args):
                with no_host_reads(), model.using_params(unflatten(list(args[:n]), keys)):
                    out = model(**dict(zip(names, args[n:])))
                loss = out.loss if has_labels else ms.ops.zeros((), ms.float32)
                return (loss.astype(ms.float32), *(out[name] for name in outputs))

            self._eval_fns[names] = Graph(forward, f"eval{len(self._eval_fns)}", self.args.jit)
        return self._eval_fns[names]

    def _prediction_loop(self, dataset, prefix: str) -> PredictionOutput:
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"{prefix}: the dataset is empty or missing")
        size, start = self.args.per_device_eval_batch_size, time.time()
        losses, predictions, labels = [], [], []
        for begin in range(0, len(dataset), size):
            batch = self._batch(dataset, range(begin, min(begin + size, len(dataset))), training=False)
            names = tuple(sorted(batch))
            tensors = [batch_tensor(batch[k]) for k in names]
            loss, *logits = self._eval_fn(names)(*self._leaves, *self._frozen, *tensors)
            rows = next(iter(batch.values())).shape[0]
            logits = tuple(t.asnumpy() for t in logits)
            found = tuple(batch[name] for name in self._labels if name in batch)
            if len(found) == len(self._labels):
                losses.append(float(loss.asnumpy()) * rows)
                labels.append(found)
            if self.preprocess_logits_for_metrics is not None:
                logits = (np.asarray(self.preprocess_logits_for_metrics(logits[0] if len(logits) == 1 else logits,
                                                                        found[0] if len(found) == 1 else found or None)),)
            predictions.append(logits)
        preds = _nested_concat(predictions)
        label_ids = _nested_concat(labels) if labels else None
        metrics = {}
        if self.compute_metrics is not None and label_ids is not None:
            metrics = dict(self.compute_metrics(EvalPrediction(predictions=preds, label_ids=label_ids)))
        if losses:
            metrics["loss"] = sum(losses) / len(dataset)
        metrics = {k if k.startswith(f"{prefix}_") else f"{prefix}_{k}": v for k, v in metrics.items()}
        metrics.update(speed_metrics(prefix, start, num_samples=len(dataset),
                                     num_steps=math.ceil(len(dataset) / size)))
        return PredictionOutput(predictions=preds, label_ids=label_ids, metrics=metrics)

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Loss (`eval_loss`, the mean over rows) and `compute_metrics` over `eval_dataset`
        (default the Trainer's; a dict of datasets gives `eval_{name}_...` metrics for each).

        Raises:
            ValueError: no evaluation dataset, or an empty one.
        """
        _warn_ignored(ignore_keys=ignore_keys)
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, Mapping):
            metrics = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, None, f"{metric_key_prefix}_{name}"))
            return metrics
        metrics = self._prediction_loop(dataset, metric_key_prefix).metrics
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def predict(self, test_dataset, ignore_keys: list[str] | None = None,
                metric_key_prefix: str = "test") -> PredictionOutput:
        """HF's `PredictionOutput(predictions, label_ids, metrics)` over `test_dataset`: the logits
        (padded with -100 across batches of different lengths) and, with labels, the metrics."""
        _warn_ignored(ignore_keys=ignore_keys)
        output = self._prediction_loop(test_dataset, metric_key_prefix)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics=output.metrics)
        return output

