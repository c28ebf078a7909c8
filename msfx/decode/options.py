"""What a decode loop (`decode_loop`, `beam_search`) is told and what it reports, as one object each,
so that `generate` prepares them once and the loops take few arguments."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from msfx.decode.sampling import make_rng


@dataclass
class GenerationStats:
    """Timings of the last `decode_loop` call, in seconds and tokens."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    step_times: list = field(default_factory=list)


@dataclass
class Recorder:
    """Where a loop reports: `stats` (timings), `scores` / `logits` (when lists: each step's processed
    scores / a copy of its raw logits appended, HF's `output_scores` / `output_logits`), `streamer`
    (e.g. `transformers.TextStreamer`: the prompt, then each new token column; not with beams)."""

    stats: GenerationStats = field(default_factory=GenerationStats)
    scores: list | None = None
    logits: list | None = None
    streamer: Any = None


@dataclass(frozen=True)
class DecodeOptions:
    """How to continue a prompt (HF's prepared generation config).

    `max_new_tokens`: the most tokens to add. `eos_token_id`: ids that finish a row; `pad_token_id`:
    what finished rows continue with. `logits_processor`: `(sequences int64 [rows, cur_len], scores
    float32 [rows, vocab]) -> scores` (e.g. a `msfx.decode.processors.LogitsProcessorList`).
    `stopping_criteria`: callables `(sequences, scores) -> bool or bool [rows]` that finish rows.
    `max_time`: seconds after which every row finishes. `do_sample`: draw tokens with `rng` (default:
    fresh entropy) instead of taking the best.
    """

    max_new_tokens: int
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    logits_processor: Callable | None = None
    stopping_criteria: tuple[Callable, ...] = ()
    max_time: float | None = None
    do_sample: bool = False
    rng: np.random.Generator | None = None
    recorder: Recorder = field(default_factory=Recorder)

    def sampling_rng(self) -> np.random.Generator | None:
        """`rng`, or when sampling without one a generator from fresh entropy (None for greedy)."""
        return self.rng if self.rng is not None or not self.do_sample else make_rng()

    @property
    def pads_finished(self) -> bool:
        """Whether finished rows continue with `pad_token_id` (HF: with an eos, or a criterion with an
        `eos_token_id` attribute)."""
        return self.pad_token_id is not None and (bool(self.eos_token_id) or any(
            hasattr(c, "eos_token_id") for c in self.stopping_criteria))


@dataclass(frozen=True)
class BeamOptions:
    """Beam search's own settings (HF's names): `early_stopping` True, False or "never"; the best
    `num_return_sequences <= num_beams` hypotheses per prompt are returned."""

    num_beams: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
