"""The server's one model thread: requests queue for it and run one at a time.

MindSpore's compiled steps and the model's weights are used from this thread only; the event loop
(the HTTP side) tokenizes, detokenizes and streams. A generation is `model.generate` with the
request as its streamer and stopping criterion, so msfx's own decode loop runs it, and a client
that leaves stops it at the next token.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np


class Generation:
    """One request's generation: `model.generate`'s streamer (`put` / `end`, called on the model
    thread) and stopping criterion (`__call__`); its token ids reach the event loop through
    `tokens()`. `cancel()` stops it before its next token, or skips it while it still queues."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._ids = loop, asyncio.Queue()
        self._stop, self._prompt_seen = threading.Event(), False
        self.disconnected = False  # cancelled because the client left (not by a stop sequence)
        self.stopped_early = False  # the stopping criterion fired: generation ended before its own end
        self.done: asyncio.Future | None = None  # set by `Engine.generate`: generate's outcome

    def cancel(self, disconnected: bool = False) -> None:
        self.disconnected |= disconnected
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate streams the prompt first
            self._prompt_seen = True
            return
        for token in np.asarray(value).reshape(-1).tolist():
            self._send(token)

    def end(self) -> None:
        """Nothing to do: the model thread ends the stream after `generate` returns or raises."""

    def __call__(self, input_ids: np.ndarray, scores: Any = None) -> bool:
        stop = self._stop.is_set()
        self.stopped_early |= stop
        return stop

    def _send(self, item: int | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ids.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass

    async def tokens(self) -> AsyncIterator[int]:
        """The new token ids as generated. Raises what `generate` raised, once its tokens are read."""
        while (token := await self._ids.get()) is not None:
            yield token
        await self.done


class Engine:
    """Runs `model` on one thread; work queues first come, first served.

    `stats` counts `completed` and `cancelled` (stopped early by a client leaving) generations,
    `generated_tokens`, `generation_seconds` (wall time inside `model.generate`) and `embedded_inputs`.
    """

    def __init__(self, model):
        self.model = model
        self._work: queue.Queue[Callable[[], None]] = queue.Queue()
        self.stats: Counter[str] = Counter()  # float seconds among the int counts
        self.busy = False
        threading.Thread(target=self._run_forever, name="msfx-model", daemon=True).start()

    @property
    def queued(self) -> int:
        return self._work.qsize()

    def _run_forever(self) -> None:
        while True:
            task = self._work.get()
            self.busy = True
            task()
            self.busy = False

    def run(self, fn: Callable[[], Any]) -> asyncio.Future:
        """`fn()` on the model thread, awaited from the event loop; not run if cancelled while queued."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def task():
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the awaiting request
                future.set_exception(e)

        self._work.put(task)
        return asyncio.wrap_future(future)

    def generate(self, input_ids: list[int], **kwargs) -> Generation:
        """Queue `model.generate` (greedy or sampled, one sequence) of `input_ids` with `kwargs`;
        the result's `tokens()` yields the new ids. Must be called on the event loop."""
        generation = Generation(asyncio.get_running_loop())

        def work():
            new_tokens, runs = 0, not generation.cancelled  # a client that left while queued costs nothing
            began = time.perf_counter()
            try:
                if runs:
                    out = self.model.generate(input_ids=np.asarray([input_ids], np.int64), streamer=generation,
                                              stopping_criteria=[generation], jit="decode", num_beams=1, **kwargs)
                    new_tokens = out.shape[1] - len(input_ids)
            finally:
                generation._send(None)
                self.stats["generated_tokens"] += new_tokens
                self.stats["generation_seconds"] += time.perf_counter() - began
                cut = generation.disconnected and (generation.stopped_early or not runs)
                self.stats["cancelled" if cut else "completed"] += 1

        generation.done = self.run(work)
        return generation
