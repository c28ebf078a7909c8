"""`msfx serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one msfx model.

A causal LM answers `POST /v1/chat/completions` and `POST /v1/completions` (streamed as
server-sent events with `stream: true`); a BERT encoder answers `POST /v1/embeddings`; both list
themselves at `GET /v1/models`, and `GET /health` reports the queue and counters. Requests queue
for one model thread (`msfx.serving.engine`) and run one at a time, each through
`model.generate`. Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from msfx.generation import GenerationMixin
from msfx.serving.engine import Engine, Generation
from msfx.serving.protocol import (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, OpenAIError,
                                   _GenerationRequest, parse)
from msfx.serving.text import Detokenizer

DEFAULT_MAX_TOKENS = 512


def mean_pooled(model, batch: dict) -> np.ndarray:
    """sentence-transformers' `Pooling(mean)` + `Normalize` (all-MiniLM-L6-v2's modules) over an encoder's
    last hidden state: float32 `[batch, hidden]` unit rows. `batch`: a tokenizer's numpy output."""
    from mindspore import Tensor

    mask = batch["attention_mask"]
    hidden = model(Tensor(batch["input_ids"].astype(np.int32)), attention_mask=mask,
                   token_type_ids=batch.get("token_type_ids")).last_hidden_state.asnumpy()
    weights = mask[..., None].astype(np.float32)
    mean = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


class _Answer:
    """One completion's response bodies: OpenAI's `chat.completion(.chunk)` or `text_completion`."""

    def __init__(self, chat: bool, model_id: str):
        self.chat, self.model_id, self.created = chat, model_id, int(time.time())
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex

    def choice(self, text: str | None, finish_reason: str | None, stream: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        message = {"role": "assistant"} if first or not stream else {}
        if text is not None:
            message["content"] = text
        return {"index": 0, "delta" if stream else "message": message, "logprobs": None, "finish_reason": finish_reason}

    def body(self, choices: list[dict], stream: bool, usage: dict | None = None) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model_id, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


class _Run:
    """A generation read as text: `pieces()` yields it, then `finish_reason` and `usage` are set."""

    def __init__(self, generation: Generation, detokenizer: Detokenizer, prompt_tokens: int, max_tokens: int,
                 eos: set[int]):
        self.generation, self.detokenizer, self.eos = generation, detokenizer, eos
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.finish_reason: str | None = None

    async def pieces(self):
        last = None
        async for last in self.generation.tokens():
            if piece := self.detokenizer.add(last):
                yield piece
            if self.detokenizer.stopped:  # a stop sequence: no more tokens needed
                self.generation.cancel()
                break
        if piece := self.detokenizer.finish():
            yield piece
        ended = self.detokenizer.stopped or last in self.eos or self.detokenizer.tokens < self.max_tokens
        self.finish_reason = "stop" if ended else "length"

    @property
    def usage(self) -> dict:
        new = self.detokenizer.tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": new, "total_tokens": self.prompt_tokens + new}


class OpenAIServer:
    """The routes over one loaded model.

    Args:
        model: an msfx causal LM (chat and text completions) or BERT encoder (embeddings).
        tokenizer: its transformers tokenizer (a chat template for chat completions).
        model_id: the name clients pass as `model` (others get 404 `model_not_found`).
        default_max_tokens: new tokens when a request gives no `max_tokens` (at most what the
            context leaves).
    """

    def __init__(self, model, tokenizer, model_id: str, default_max_tokens: int = DEFAULT_MAX_TOKENS):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.default_max_tokens, self.created = default_max_tokens, int(time.time())
        self.causal = isinstance(model, GenerationMixin)
        self.context = getattr(model.config, "max_position_embeddings", None) or float("inf")
        eos = model.generation_config.eos_token_id if self.causal else None
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.engine = Engine(model)

    def app(self) -> FastAPI:
        app = FastAPI(title="msfx", description="OpenAI-compatible API over an msfx model")
        app.add_exception_handler(OpenAIError, lambda request, e: e.response())
        app.add_exception_handler(HTTPException, lambda request, e: OpenAIError(  # unknown routes, methods
            e.status_code, str(e.detail), type="invalid_request_error" if e.status_code < 500 else "server_error"
        ).response())
        app.add_exception_handler(Exception, lambda request, e: OpenAIError(
            500, f"{type(e).__name__}: {e}", type="server_error").response())
        app.get("/v1/models")(self.models)
        app.get("/v1/models/{model:path}")(self.model_card)
        app.get("/health")(self.health)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/embeddings")(self.embeddings)
        return app

    # ------------------------------------------------------------ listing

    async def models(self) -> dict:
        return {"object": "list", "data": [await self.model_card(self.model_id)]}

    async def model_card(self, model: str) -> dict:
        self._check_model(model)
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "msfx"}

    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_id, "queued": self.engine.queued, "busy": self.engine.busy,
                **self.engine.stats}

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise OpenAIError(404, f"The model '{model}' does not exist (this server serves '{self.model_id}')",
                              "model", "model_not_found")

    def _check_task(self, causal: bool, what: str) -> None:
        if causal != self.causal:
            kind = "a causal language model" if self.causal else "an encoder"
            raise OpenAIError(400, f"'{self.model_id}' is {kind}: it does not serve {what}", "model")

    # ------------------------------------------------------------ completions

    async def chat_completions(self, request: Request):
        body = parse(await request.body(), ChatCompletionRequest)
        self._check_model(body.model)
        self._check_task(True, "chat completions")
        if not self.tokenizer.chat_template:
            raise OpenAIError(400, f"'{self.model_id}' has no chat template: use /v1/completions", "messages")
        try:
            ids = self.tokenizer.apply_chat_template(body.message_dicts(), add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
        except Exception as e:  # jinja's TemplateError, raised by the template itself (e.g. roles out of order)
            raise OpenAIError(400, f"the chat template refused the messages: {e}", "messages") from e
        return await self._complete(_Answer(True, self.model_id), body, list(ids), "messages", request)

    async def completions(self, request: Request):
        body = parse(await request.body(), CompletionRequest)
        self._check_model(body.model)
        self._check_task(True, "text completions")
        if isinstance(body.prompt, str):
            ids = self.tokenizer(body.prompt)["input_ids"]
        else:
            ids = body.prompt
            if not all(0 <= i < self.model.config.vocab_size for i in ids):
                raise OpenAIError(400, f"prompt token ids must be in [0, {self.model.config.vocab_size})", "prompt")
        return await self._complete(_Answer(False, self.model_id), body, list(ids), "prompt", request)

    def _generate_kwargs(self, body: _GenerationRequest, prompt_tokens: int, param: str) -> dict:
        """`model.generate`'s arguments for `body`. Raises OpenAIError: context overflow, a bad `logit_bias` id."""
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if prompt_tokens == 0:
            raise OpenAIError(400, "the prompt is empty", param)
        room = self.context - prompt_tokens
        max_tokens = min(self.default_max_tokens, room) if max_tokens is None else max_tokens
        if max_tokens > room or room < 1:
            raise OpenAIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                              f"requested {prompt_tokens + max(max_tokens, 1)} tokens ({prompt_tokens} in the "
                              f"{param}, {max(max_tokens, 1)} in the completion). Please reduce the length of the "
                              f"{param} or completion.", param, "context_length_exceeded")
        kwargs = dict(max_new_tokens=int(max_tokens), do_sample=False)
        temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
        if temperature > 0:  # OpenAI has no top-k: switch off the checkpoint's or HF's default 50
            kwargs.update(do_sample=True, temperature=temperature, top_p=body.top_p or 1.0, top_k=0, seed=body.seed)
        if body.logit_bias:
            vocab = self.model.config.vocab_size
            if not all(0 <= token < vocab for token in body.logit_bias):
                raise OpenAIError(400, f"logit_bias token ids must be in [0, {vocab})", "logit_bias")
            kwargs["sequence_bias"] = {(token,): bias for token, bias in body.logit_bias.items()}
        return kwargs

    async def _complete(self, answer: _Answer, body: _GenerationRequest, ids: list[int], param: str,
                        request: Request):
        kwargs = self._generate_kwargs(body, len(ids), param)
        run = _Run(self.engine.generate(ids, **kwargs), Detokenizer(self.tokenizer, body.stop), len(ids),
                   kwargs["max_new_tokens"], self.eos)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._events(answer, run, usage), media_type="text/event-stream")
        watch = asyncio.ensure_future(_cancel_on_disconnect(request, run.generation))
        try:
            text = "".join([piece async for piece in run.pieces()])
        except ValueError as e:  # generate refused the arguments
            raise OpenAIError(400, str(e)) from e
        finally:
            watch.cancel()
        return answer.body([answer.choice(text, run.finish_reason, stream=False)], False, run.usage)

    async def _events(self, answer: _Answer, run: _Run, include_usage: bool):
        """The server-sent events of a streamed completion, ending with `data: [DONE]`."""
        finished = False
        try:
            if answer.chat:
                yield _event(answer.body([answer.choice("", None, stream=True, first=True)], True))
            async for piece in run.pieces():
                yield _event(answer.body([answer.choice(piece, None, stream=True)], True))
            yield _event(answer.body([answer.choice(None, run.finish_reason, stream=True)], True))
            if include_usage:
                yield _event(answer.body([], True, run.usage))
            finished = True
        except Exception as e:  # after the 200 has gone out: report it in the stream, as OpenAI does
            finished = True
            kind = "invalid_request_error" if isinstance(e, ValueError) else "server_error"
            yield _event({"error": {"message": str(e), "type": kind, "param": None, "code": None}})
        finally:
            if not finished:  # the client left (Starlette cancelled this generator): free the model thread
                run.generation.cancel(disconnected=True)
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------ embeddings

    async def embeddings(self, request: Request) -> dict:
        body = parse(await request.body(), EmbeddingRequest)
        self._check_model(body.model)
        self._check_task(False, "embeddings")
        batch = dict(self.tokenizer(body.input, padding=True, return_tensors="np"))
        lengths = batch["attention_mask"].sum(1)
        if lengths.max() > self.context:
            raise OpenAIError(400, f"This model's maximum context length is {self.context} tokens, but an input "
                              f"has {lengths.max()} tokens. Please shorten it.", "input", "context_length_exceeded")
        vectors = await self.engine.run(lambda: mean_pooled(self.model, batch))
        self.engine.stats["embedded_inputs"] += len(body.input)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        tokens = int(lengths.sum())
        return {"object": "list", "data": data, "model": self.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """OpenAI's `float` (a JSON list) or `base64` (little-endian float32 bytes) embedding."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    """Cancels `generation` when the client of a non-streamed request leaves (the ASGI
    server answers `receive()` with `http.disconnect` then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel(disconnected=True)


def load(model_dir: str, dtype: str = "auto"):
    """The model in `model_dir` for serving, with its tokenizer: a causal LM, or a BERT encoder for
    embeddings.

    Raises:
        ValueError: another kind of model (T5, CLIP, a classifier's checkpoint still loads its base).
    """
    from transformers import AutoConfig, AutoTokenizer

    from msfx.models.auto import AutoModel, AutoModelForCausalLM

    model_type = AutoConfig.from_pretrained(model_dir).model_type
    if model_type == "bert":
        model = AutoModel.from_pretrained(model_dir, dtype=dtype)
    elif model_type in ("t5", "clip"):
        raise ValueError(f"{model_dir}: msfx serve serves causal LMs (chat and text completions) and BERT "
                         f"encoders (embeddings), not {model_type}")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(model_dir)


def serve(model_dir: str, model_id: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
          default_max_tokens: int = DEFAULT_MAX_TOKENS, log_level: str = "info") -> int:
    """Load `model_dir` and answer OpenAI's API at `http://host:port/v1` until interrupted."""
    import uvicorn

    model, tokenizer = load(model_dir, dtype)
    app = OpenAIServer(model, tokenizer, model_id, default_max_tokens).app()
    print(f"msfx serve: '{model_id}' at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    # streams still open at Ctrl-C get 2 s, then the server exits
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
    return 0
