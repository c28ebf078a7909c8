"""Training: causal-LM loss, AdamW / SGD, clipping and LR schedules over flat parameter leaves, a
train step compiled with `mindspore.jit`, and HF's `Trainer` / `TrainingArguments` over msfx models."""
from msfx.train.losses import causal_lm_loss, causal_lm_loss_fn, causal_lm_loss_sum, count_items
from msfx.train.optim import SGD, AdamW, clip_by_global_norm, decay_mask
from msfx.train.schedules import SCHEDULES, get_schedule, warmup_steps_for
from msfx.train.step import LossScaler, StepResult, TrainStep, make_train_step

__all__ = ["SCHEDULES", "SGD", "AdamW", "LossScaler", "StepResult", "TrainStep", "causal_lm_loss", "causal_lm_loss_fn",
           "causal_lm_loss_sum", "clip_by_global_norm", "count_items", "decay_mask", "get_schedule", "make_train_step",
           "warmup_steps_for"]
