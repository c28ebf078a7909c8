"""HF's `generate` for the wrappers: argument handling and dispatch to `msfx.decode`'s loops.

Follows `transformers.GenerationMixin.generate` (5.x): the generation config is merged from the
call, the checkpoint's `generation_config.json` and HF's defaults; special tokens, attention
mask, lengths, logits processors and stopping criteria are prepared as HF prepares them (into a
`msfx.decode.options.DecodeOptions`); then greedy/sampling (`decode_loop`) or beam search
(`beam_search`) runs over an explicit KV cache, and the result is packaged as HF's output classes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from mindspore import Tensor
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from msfx.decode.generate import DecodeState, decode_loop
from msfx.decode.options import BeamOptions, DecodeOptions, GenerationStats, Recorder
from msfx.decode.processors import build_logits_processors
from msfx.decode.sampling import make_rng
from msfx.decode.search import BeamSearchResult, beam_search
from msfx.decode.seq2seq import DecoderStep, Seq2SeqDecodeState
from msfx.decode.step import widens
from msfx.decode.stopping import StopStringCriteria
from msfx.backend import lacks_bf16_kernels
from msfx.inputs import check_token_ids

logger = logging.getLogger(__name__)


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)`'s result (HF's `GenerateDecoderOnlyOutput`, numpy).

    `sequences`: int64 `[batch, seq + new_tokens]`; `scores` (with `output_scores=True`) and
    `logits` (with `output_logits=True`): one float32 `[batch, vocab]` array per generated step,
    the processed scores the token was picked from and the raw logits; None when not requested.
    """

    sequences: np.ndarray | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Any = None


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """`generate(..., num_beams>1, return_dict_in_generate=True)`'s result (HF's
    `GenerateBeamDecoderOnlyOutput`, numpy).

    `sequences`: int64 `[batch * num_return_sequences, seq + new_tokens]`, best first per row;
    `sequences_scores` (with `output_scores=True`): float32 `[batch * num_return_sequences]`, the
    length-penalized sum of the tokens' log-probs; `scores` (with `output_scores=True`) and
    `logits` (with `output_logits=True`): one float32 `[batch * num_beams, vocab]` array per step,
    the processed log-probs and the raw logits; `beam_indices`: int32 `[batch *
    num_return_sequences, new_tokens]`, the beam row each token came from (-1 after the end).
    """

    sequences: np.ndarray | None = None
    sequences_scores: np.ndarray | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    beam_indices: np.ndarray | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Any = None


@dataclass
class GenerateEncoderDecoderOutput(ModelOutput):
    """HF's `GenerateEncoderDecoderOutput` (numpy): as `GenerateDecoderOnlyOutput`, `sequences` being
    the decoder's tokens (`decoder_start_token_id` first)."""

    sequences: np.ndarray | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    encoder_attentions: tuple | None = None
    encoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    decoder_hidden_states: tuple | None = None
    cache: Any = None


@dataclass
class GenerateBeamEncoderDecoderOutput(ModelOutput):
    """HF's `GenerateBeamEncoderDecoderOutput` (numpy): as `GenerateBeamDecoderOnlyOutput`, `sequences`
    being the decoder's tokens (`decoder_start_token_id` first)."""

    sequences: np.ndarray | None = None
    sequences_scores: np.ndarray | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    beam_indices: np.ndarray | None = None
    encoder_attentions: tuple | None = None
    encoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    decoder_hidden_states: tuple | None = None
    cache: Any = None


# keyword arguments `generate` accepts besides GenerationConfig fields (HF's model kwargs)
_MODEL_KWARGS = {"use_cache", "output_attentions", "output_hidden_states", "return_dict"}


def check_sampling_args(config: GenerationConfig) -> None:
    """Refuse, on the host, sampling values HF's warpers refuse or that sample from nothing: with
    `do_sample`, `temperature` <= 0, a negative `top_k` (0 disables it) or `top_p` outside (0, 1]
    (HF's `TopPLogitsWarper` says "> 0" but lets 0 through as greedy and ignores values above 1).

    Raises:
        ValueError: naming the argument and its value.
    """
    if not config.do_sample:
        return
    temperature, top_k, top_p = config.temperature, config.top_k, config.top_p
    if temperature is not None and not temperature > 0:
        raise ValueError(f"`temperature` (={temperature}) has to be a strictly positive float, otherwise your next "
                         "token scores will be invalid. If you're looking for greedy decoding strategies, set "
                         "`do_sample=False`.")
    if top_k is not None and top_k < 0:
        raise ValueError(f"`top_k` has to be a strictly positive integer (or 0 to disable it), but is {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"`top_p` has to be a float > 0 and <= 1, but is {top_p}")


def _as_array(x) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def _as_tuple(values: list | None) -> tuple | None:
    return None if values is None else tuple(values)


@dataclass
class _Prepared:
    """One `generate` call after HF's preparation: the inputs expanded per beam / returned sequence
    (`input_ids` the decoder's start column for an encoder-decoder, whose source is `encoder_inputs`),
    and what the loop is told."""

    config: GenerationConfig
    input_ids: np.ndarray
    attention_mask: np.ndarray
    encoder_inputs: tuple[np.ndarray, np.ndarray] | None
    options: DecodeOptions
    beams: BeamOptions | None  # None: greedy search or sampling
    jit: bool | str
    as_dict: bool


class _Hooks(NamedTuple):
    """What the caller of `generate` plugs into the decode loop (arguments as `generate`'s)."""

    streamer: Any = None
    logits_processor: list | None = None
    stopping_criteria: list | None = None
    tokenizer: Any = None
    seed: int | None = None


def _check_callables(jit, logits_processor, stopping_criteria) -> None:
    if jit not in (True, False, "decode"):
        raise ValueError(f"jit must be True, False or 'decode', got {jit!r}")
    for name, callables in (("logits_processor", logits_processor), ("stopping_criteria", stopping_criteria)):
        torch_based = [type(c).__name__ for c in callables or [] if type(c).__module__.startswith("transformers.")]
        if torch_based:
            raise TypeError(f"{name} holds transformers' torch classes {torch_based}: msfx applies numpy "
                            "callables (see msfx.decode.processors); the built-in ones follow from the "
                            "generation config")


def _check_modes(config: GenerationConfig, streamer) -> tuple[int, bool]:
    """`num_beams` and `return_dict_in_generate` of the merged config, checked against what msfx supports."""
    if config.num_beams is not None and config.num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {config.num_beams}")
    num_beams = config.num_beams or 1
    as_dict = bool(config.return_dict_in_generate)
    if as_dict and (config.output_attentions or config.output_hidden_states):
        raise NotImplementedError("msfx generate does not return attentions or hidden states yet "
                                  "(return_dict_in_generate supports output_scores and output_logits)")
    if streamer is not None and num_beams > 1:
        raise ValueError("`streamer` cannot be used with beam search (yet!). Make sure that `num_beams` is "
                         "set to 1.")
    return num_beams, as_dict


def _special_tokens(config: GenerationConfig, ids: np.ndarray, attention_mask) -> tuple[list[int], int | None]:
    """The eos ids (a list) and the pad id, which defaults to the first eos (HF's `_prepare_special_tokens`)."""
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = config.pad_token_id
    if pad is None and eos:
        if attention_mask is None and ids.shape[0] > 1:
            logger.warning("The attention mask and the pad token id were not set, with a batched input. As a "
                           "consequence, you may observe unexpected behavior. Please pass your input's "
                           "`attention_mask` to obtain reliable results.")
        pad = eos[0]
    return eos, pad


def _decoder_start(config: GenerationConfig, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """An encoder-decoder's first decoder ids and mask, `[batch, 1]`."""
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
    if start is None:
        raise ValueError("`decoder_start_token_id` or `bos_token_id` has to be defined for encoder-decoder "
                         "generation.")
    return np.full((batch, 1), start, np.int64), np.ones((batch, 1), np.int32)


def _stopping_criteria(config: GenerationConfig, stopping_criteria, tokenizer) -> list:
    """The user's criteria, then `StopStringCriteria` for `stop_strings` (which need the tokenizer)."""
    criteria = list(stopping_criteria or [])
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("There are one or more stop strings, either in the arguments to `generate` or in "
                             "the model's generation config, but we could not locate a tokenizer. When generating "
                             "with stop strings, you must pass the model's tokenizer to the `tokenizer` argument "
                             "of `generate`.")
        criteria.append(StopStringCriteria(tokenizer, config.stop_strings))
    return criteria


class GenerationMixin:
    """HF-style `generate` for the wrappers: greedy search, sampling and beam search over the KV cache.

    A wrapper provides `config`, `generation_config`, `_compiled_step(jit)` and may override
    `_decode_state` (e.g. an encoder-decoder runs its encoder there, once).
    """

    # True where positions index a learned table (GPT-2's `wpe`): no length past `max_position_embeddings`
    _learned_positions = False

    def generate(self, input_ids=None, attention_mask=None, generation_config: GenerationConfig | None = None,
                 streamer=None, jit: bool | str = True, *, logits_processor=None, stopping_criteria=None,
                 tokenizer=None, seed: int | None = None,
                 **kwargs) -> np.ndarray | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """Greedy, multinomial-sampling or beam-search generation with HF's argument names.

        Args:
            input_ids: `[batch, seq]` token ids (left-pad batches); a MindSpore tensor or array.
            attention_mask: `[batch, seq]` 1/0; default: 0 where `input_ids == pad_token_id`
                (when pad differs from eos), else all ones, as HF infers it; all ones for an
                encoder-decoder (HF 5.x infers no encoder mask).
            generation_config: defaults to the checkpoint's `generation_config.json`; keyword
                arguments override it and unset values fall back to the checkpoint's, then to
                HF's global defaults (e.g. `top_k=50`, 20 new tokens), as in HF. Supported:
                `max_new_tokens`, `max_length`, `min_new_tokens`, `min_length`, `max_time`,
                `stop_strings`, `eos_token_id`, `pad_token_id`, `do_sample`, `temperature`,
                `top_k`, `top_p`, `min_p`, `typical_p`, `epsilon_cutoff`, `eta_cutoff`,
                `repetition_penalty`, `no_repeat_ngram_size`, `bad_words_ids`, `sequence_bias`,
                `suppress_tokens`, `begin_suppress_tokens`, `forced_bos_token_id`,
                `forced_eos_token_id`, `remove_invalid_values`, `renormalize_logits`,
                `num_beams`, `length_penalty`, `early_stopping`, `num_return_sequences`,
                `use_cache` (False: the whole sequence runs each step, eagerly, as HF recomputes),
                `return_dict_in_generate` with `output_scores` / `output_logits`.
            streamer: an object with `put` / `end`, e.g. `transformers.TextStreamer` (not with beams).
            jit: True compiles the prompt's forward and the decode step with `mindspore.jit`
                (one graph per shape bucket, see `msfx.decode.generate`); "decode" compiles only
                the decode step (for a single prompt, compiling its graph costs more than it
                saves); False runs eagerly. `use_cache=False` always runs eagerly, and so does bfloat16
                on CPU except a Llama-like model's steps (float32 over its bfloat16 matrices,
                `msfx.decode.step.widens`).
            logits_processor: numpy callables `(input_ids [batch, cur_len], scores [batch, vocab])
                -> scores` (e.g. `msfx.decode.processors` classes), merged with the built-in
                ones as HF merges its `logits_processor=` (HF's torch processors do not apply).
            stopping_criteria: callables `(input_ids, scores) -> bool or bool [batch]` on numpy
                arrays (`scores`: this step's processed scores, where HF passes its tuple of
                scores or None; None in beam search); a row stops once one returns True for it.
            tokenizer: the model's tokenizer, needed for `stop_strings` (as in HF).
            seed: the sampling seed (msfx's addition); default: MindSpore's global seed
                (`mindspore.set_seed`), else fresh entropy. A seed reproduces the same samples.

        Returns:
            int64 numpy `[batch * num_return_sequences, seq + new_tokens]`: the prompt followed
            by the generated tokens. (HF returns a torch LongTensor; `transformers` tokenizers
            decode numpy arrays but not MindSpore tensors, so `tokenizer.batch_decode(ids)` works
            as in HF.) With `return_dict_in_generate=True`: a `GenerateDecoderOnlyOutput`, or for
            beam search a `GenerateBeamDecoderOnlyOutput` (HF's fields, numpy arrays).

        Raises:
            TypeError: transformers' own (torch) processors or stopping criteria.
            ValueError: out-of-range token ids, a total length beyond a learned position table
                (GPT-2's `n_positions`; past a rotary model's `max_position_embeddings` HF and msfx
                warn and go on),
                `num_return_sequences` above `num_beams` (or above 1 for greedy), sampling with
                `temperature` <= 0, `top_k` < 0 or `top_p` outside (0, 1], a streamer
                with beam search, `stop_strings` without `tokenizer`, an unknown keyword, or an
                invalid processor argument (as HF raises them).
            NotImplementedError: an option whose logits processor msfx lacks (`top_h`,
                `guidance_scale`, ...), or `output_attentions` / `output_hidden_states` with
                `return_dict_in_generate`.
        """
        hooks = _Hooks(streamer, logits_processor, stopping_criteria, tokenizer, seed)
        prepared = self._prepare_generation(input_ids, attention_mask, generation_config, jit, hooks, kwargs)
        if prepared.options.max_new_tokens <= 0:  # HF returns the prompt
            ids = prepared.input_ids.astype(np.int64)
            return self._output_class(False)(sequences=ids) if prepared.as_dict else ids
        return self._package(prepared, self._run_generation(prepared))

    def _prepare_generation(self, input_ids, attention_mask, generation_config, jit, hooks: _Hooks, kwargs,
                            source: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> _Prepared:
        """HF's preparation in `generate` (arguments as there): config, special tokens, mask, lengths,
        the inputs expanded per beam / returned sequence, processors and criteria. `source`: an
        encoder-decoder's encoder inputs and decoder prompt `(encoder_inputs, encoder_mask, decoder_ids)`
        as numpy, prepared and checked by the wrapper (Whisper's features and start tokens) instead of
        `input_ids`. Raises as `generate`."""
        _check_callables(jit, hooks.logits_processor, hooks.stopping_criteria)
        config, default_max_length = self._merge_generation_config(generation_config, kwargs)
        check_sampling_args(config)
        num_beams, as_dict = _check_modes(config, hooks.streamer)
        vocab_size = self.config.get_text_config().vocab_size
        if source is None:
            ids = check_token_ids(input_ids, vocab_size)
            eos, pad = _special_tokens(config, ids, attention_mask)
            mask = self._attention_mask(ids, attention_mask, pad, eos)
            encoder_inputs = None
            if self.config.is_encoder_decoder:  # the prompt feeds the encoder; the decoder starts from one token
                encoder_inputs, (ids, mask) = (ids, mask), _decoder_start(config, ids.shape[0])
        else:
            ids = check_token_ids(source[2], vocab_size)
            eos, pad = _special_tokens(config, ids, None)
            encoder_inputs, mask = source[:2], np.ones_like(ids, np.int32)
        max_new = self._max_new_tokens(config, ids.shape[1], default_max_length)
        # HF's prepared lengths (`_prepare_generated_length`): absolute, prompt included
        config.max_length = ids.shape[1] + max_new
        if config.min_new_tokens is not None:
            config.min_length = config.min_new_tokens + ids.shape[1]
        criteria = _stopping_criteria(config, hooks.stopping_criteria, hooks.tokenizer)
        copies = max(num_beams, config.num_return_sequences or 1)  # HF's `_expand_inputs_for_generation`
        ids, mask = np.repeat(ids, copies, 0), np.repeat(mask, copies, 0)
        if encoder_inputs is not None:
            encoder_inputs = tuple(np.repeat(x, copies, 0) for x in encoder_inputs)
        processors = build_logits_processors(config, ids.shape[1], hooks.logits_processor, attention_mask=mask)
        recorder = Recorder(GenerationStats(prompt_tokens=int(mask.sum()) // copies),
                            scores=[] if as_dict and config.output_scores else None,
                            logits=[] if as_dict and config.output_logits else None, streamer=hooks.streamer)
        options = DecodeOptions(max_new, tuple(eos), pad, processors, tuple(criteria), config.max_time,
                                bool(config.do_sample), make_rng(hooks.seed) if config.do_sample else None, recorder)
        beams = None if num_beams == 1 else BeamOptions(num_beams, config.length_penalty, config.early_stopping,
                                                        config.num_return_sequences or 1)
        return _Prepared(config, ids, mask, encoder_inputs, options, beams, jit, as_dict)

    def _run_generation(self, prepared: _Prepared) -> np.ndarray | BeamSearchResult:
        """The decode loop (greedy / sampling, or beam search) over a fresh decode state."""
        self.last_generation_stats = prepared.options.recorder.stats
        use_cache = prepared.config.use_cache is not False
        state = self._decode_state(prepared.input_ids, prepared.attention_mask, prepared.options.max_new_tokens,
                                   prepared.jit if use_cache else False, prepared.encoder_inputs, use_cache)
        if prepared.beams is None:
            return decode_loop(state, prepared.input_ids, prepared.options)
        return beam_search(state, prepared.input_ids, prepared.options, prepared.beams)

    def _output_class(self, beams: bool) -> type:
        if self.config.is_encoder_decoder:
            return GenerateBeamEncoderDecoderOutput if beams else GenerateEncoderDecoderOutput
        return GenerateBeamDecoderOnlyOutput if beams else GenerateDecoderOnlyOutput

    def _package(self, prepared: _Prepared, result: np.ndarray | BeamSearchResult):
        """`generate`'s result: the sequences, or with `return_dict_in_generate` HF's output class."""
        recorder = prepared.options.recorder
        scores, logits = _as_tuple(recorder.scores), _as_tuple(recorder.logits)
        if not isinstance(result, BeamSearchResult):
            return self._output_class(False)(sequences=result, scores=scores, logits=logits) if prepared.as_dict \
                else result
        if not prepared.as_dict:
            return result.sequences
        return self._output_class(True)(
            sequences=result.sequences, scores=scores, logits=logits, beam_indices=result.beam_indices,
            sequences_scores=result.sequences_scores if prepared.config.output_scores else None)

    def _decode_state(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int, jit: bool | str,
                      encoder_inputs: tuple[np.ndarray, np.ndarray] | None = None,
                      use_cache: bool = True) -> DecodeState:
        """The model side of one generation over `input_ids` / `attention_mask` `[batch, seq]` (already
        repeated per beam / returned sequence). An encoder-decoder wrapper overrides this: it gets
        the encoder's `(input_ids, attention_mask)` as `encoder_inputs`, runs the encoder once,
        and decodes from `input_ids` (the `decoder_start_token_id` column). Without `use_cache`
        each step runs the whole sequence (`generate` passes `jit` False then)."""
        # a half-precision Llama-like model on CPU computes in float32 over its half matrices when compiled
        widening = bool(jit) and widens(self.arch, self.params, self.config)
        if lacks_bf16_kernels(self.weights[0]) and not widening:  # no bfloat16 CPU graph kernels, not even Reshape
            jit = False
        step = self._compiled_step(bool(jit), widening)
        prefill = step if jit is True else self._compiled_step(False, widening)
        return DecodeState(self.config, prefill, step, input_ids, attention_mask, max_new_tokens,
                           bucket_prompt=jit is True, use_cache=use_cache)

    def _merge_generation_config(self, generation_config: GenerationConfig | None,
                                 kwargs: dict) -> tuple[GenerationConfig, bool]:
        """HF's `_prepare_generation_config`: the call's config (default: the checkpoint's), its
        unset values from the checkpoint's, then from HF's global defaults, then `kwargs` on top.
        Also returns whether `max_length` came only from the defaults."""
        base = self.generation_config if generation_config is None else generation_config
        merged = base.to_dict()
        if generation_config is not None:
            merged.update({k: v for k, v in self.generation_config.to_dict().items() if merged.get(k) is None})
        default_max_length = kwargs.get("max_length") is None and merged.get("max_length") is None
        merged.update({k: v for k, v in GenerationConfig._get_default_generation_params().items()
                       if merged.get(k) is None})
        unused = sorted(set(kwargs) - set(merged) - _MODEL_KWARGS)
        if unused:
            raise ValueError(f"The following `model_kwargs` are not used by the model: {unused} "
                             "(note: typos in the generate arguments will also show up in this list)")
        return GenerationConfig.from_dict({**merged, **kwargs}), default_max_length  # validates, as HF

    def _attention_mask(self, ids: np.ndarray, attention_mask, pad: int | None, eos: list[int]) -> np.ndarray:
        """The given mask (checked), or HF's inferred one (`_prepare_attention_mask_for_generation`), which
        HF 5.x infers for decoder-only models only: an encoder-decoder's source is attended whole."""
        if attention_mask is None and self.config.is_encoder_decoder:
            mask = np.ones_like(ids, np.int32)
        elif attention_mask is None:
            infer = pad is not None and pad not in eos and (ids == pad).any()
            mask = (ids != pad).astype(np.int32) if infer else np.ones_like(ids, np.int32)
            if pad is not None and pad in eos and ids.shape[0] > 1 and (ids == pad).any():
                logger.warning("The attention mask is not set and cannot be inferred from input because pad token "
                               "is same as eos token. Pass `attention_mask` to obtain reliable results.")
        else:
            mask = _as_array(attention_mask)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {list(mask.shape)}; input_ids has {list(ids.shape)}")
            mask = mask.astype(np.int32)
        right_padded = pad is not None and ids.shape[0] > 1 and (ids[:, -1] == pad).any()
        if right_padded and not self.config.is_encoder_decoder:
            logger.warning("A decoder-only architecture is being used, but right-padding was detected! For correct "
                           "generation results, please set `padding_side='left'` when initializing the tokenizer.")
        return mask

    def _max_new_tokens(self, config: GenerationConfig, prompt_len: int, default_max_length: bool) -> int:
        """New tokens to generate from `max_new_tokens` / `max_length`, as HF counts them.

        A total beyond `max_position_embeddings` is logged as a warning (rotary and relative positions
        extend, as in HF), except for `_learned_positions` models.

        Raises:
            ValueError: `max_length` not above the prompt, or a total beyond a learned position table.
        """
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None) or float("inf")  # none for relative positions
        if config.max_new_tokens is not None:
            max_new = config.max_new_tokens
        elif default_max_length:  # HF: 20 new tokens by default, within max_position_embeddings
            max_new = min(config.max_length + prompt_len, limit) - prompt_len
        else:
            max_new = config.max_length - prompt_len
        if max_new <= 0 and config.max_new_tokens is None:
            raise ValueError(f"Input length of input_ids is {prompt_len}, but `max_length` is set to "
                             f"{config.max_length}: increase `max_length` or set `max_new_tokens`")
        if prompt_len + max_new > limit and self._learned_positions:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                             f"max_position_embeddings ({limit}): its learned position embeddings have no "
                             "rows beyond")
        if prompt_len + max_new > limit:  # HF's `MaxLengthCriteria` warns (once the length passes it) and goes on
            logger.warning("This is a friendly reminder - the current text generation call has exceeded the model's "
                           f"predefined maximum length ({limit}). Depending on the model, you may observe "
                           "exceptions, performance degradation, or nothing at all.")
        return max_new


class Seq2SeqGenerationMixin(GenerationMixin):
    """`generate` for an encoder-decoder wrapper (T5, BART, Whisper) whose core module `arch` supplies
    what `msfx.decode.seq2seq` runs (`encoder_forward`, `cross_attention_cache`, `decoder_forward`,
    `decode_step`, `lm_head`, ...)."""

    _decoder_step = None

    def _decode_state(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int,
                      jit: bool | str, encoder_inputs: tuple[np.ndarray, np.ndarray] | None = None,
                      use_cache: bool = True) -> Seq2SeqDecodeState:
        """The encoder-decoder state `generate` decodes with (see `msfx.decode.seq2seq`): the encoder runs
        eagerly; with `jit` True or "decode" the decoder runs one compiled step per token (the model's
        `decoder_step`), with False, or bfloat16 on CPU (no graph kernels), eagerly; without `use_cache`
        eagerly over the whole decoder sequence at each step."""
        compiled = bool(jit) and use_cache and not lacks_bf16_kernels(self.weights[0])
        return Seq2SeqDecodeState(self.arch, self.params, self.config, *encoder_inputs, input_ids, max_new_tokens,
                                  step=self.decoder_step if compiled else None, use_cache=use_cache)

    @property
    def decoder_step(self) -> DecoderStep:
        """The model's compiled decoder step (built on first use; its `compiles` counts the graphs traced)."""
        if self._decoder_step is None:
            self._decoder_step = DecoderStep(self.arch, self.params, self.config)
        return self._decoder_step
