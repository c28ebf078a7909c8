"""`msfx serve` through the official `openai` client, against servers this module starts with
`python -m msfx serve` on 127.0.0.1 (one per model, shared by the tests).

The chat server runs a tiny random Llama with a word-level tokenizer and a chat template; its
answers must equal `model.generate`'s tokens in this process (greedy, and sampled with the same
seed). Bad requests must get OpenAI's 4xx error shape with the server answering afterwards, a
client leaving mid-stream must stop its generation, and concurrent streams must all come back
right. The embeddings server runs the real all-MiniLM-L6-v2 (when its package is installed),
compared with HF + PyTorch and sentence-transformers' pooling.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import transformers
from conftest import make_hf_llama
from test_minilm import MODEL_DIR as MINILM_DIR
from test_minilm import SENTENCES, sentence_embeddings
from test_pipelines import chat_tokenizer

import msfx

openai = pytest.importorskip("openai")

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAT_MODEL = "tiny-chat"
CONTEXT = 1024  # the tiny model's max_position_embeddings
EOS = 2
CHAT = [{"role": "user", "content": "w10 w11 w12"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log_path: Path, *args: str):
    """`python -m msfx serve ARGS` on a free port: `(process, base url)`; see `wait_for`."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "msfx", "serve", "--port", str(port), "--log-level", "warning",
                             *args], stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return proc, f"http://127.0.0.1:{port}"


def wait_for(proc, url: str, log_path: Path) -> None:
    """Returns once the server at `url` answers `/health`."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"msfx serve exited: {log_path.read_text()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise TimeoutError("msfx serve did not answer within 180 s")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def health(url: str) -> dict:
    return json.load(urllib.request.urlopen(url + "/health", timeout=10))


def post(url: str, path: str, data: bytes) -> tuple[int, dict]:
    """A raw POST (no client-side checks): the status and the JSON body."""
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """(base url, the msfx model, its tokenizer) for the tiny chat model served in a subprocess."""
    path = tmp_path_factory.mktemp("tiny_chat")
    make_hf_llama(path, max_position_embeddings=CONTEXT)
    chat_tokenizer().save_pretrained(path)
    proc, url = start_server(path / "server.log", "--model", str(path), "--served-model-name", CHAT_MODEL)
    model = msfx.AutoModelForCausalLM.from_pretrained(path)  # while the server starts
    wait_for(proc, url, path / "server.log")
    yield url, model, transformers.AutoTokenizer.from_pretrained(path)
    stop_server(proc)


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(chat_server, ids: list[int], max_tokens: int, **sampling) -> tuple[str, list[int]]:
    """`generate`'s answer to `ids` in this process: (its text, its new token ids)."""
    _, model, tokenizer = chat_server
    kwargs = dict(do_sample=True, top_k=0, **{"top_p": 1.0, **sampling}) if sampling else dict(do_sample=False)
    out = model.generate(input_ids=np.asarray([ids]), max_new_tokens=max_tokens, jit="decode", **kwargs)
    new = out[0, len(ids):].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


def chat_ids(chat_server, messages) -> list[int]:
    return chat_server[2].apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [CHAT_MODEL]
    assert client.models.retrieve(CHAT_MODEL).owned_by == "msfx"


@pytest.mark.parametrize("max_tokens", [6, 40])
def test_chat_greedy_equals_generate(chat_server, client, max_tokens):
    ids = chat_ids(chat_server, CHAT)
    text, new = reference(chat_server, ids, max_tokens)
    finish = "stop" if new[-1] == EOS else "length"
    assert (max_tokens == 40) == (finish == "stop")  # the 40-token answer ends on EOS by itself
    answer = client.chat.completions.create(model=CHAT_MODEL, messages=CHAT, max_tokens=max_tokens, temperature=0)
    assert answer.choices[0].message.content == text and answer.choices[0].finish_reason == finish
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), len(new))
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=CHAT, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed in pieces
    assert chunks[-2].choices[0].finish_reason == finish
    assert chunks[-1].usage.completion_tokens == len(new)


def test_completion_greedy_and_stop_sequences(chat_server, client):
    prompt = "w5 w9 w13"
    ids = chat_server[2](prompt)["input_ids"]
    text, new = reference(chat_server, ids, 8)
    answer = client.completions.create(model=CHAT_MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert answer.choices[0].text == text and answer.usage.completion_tokens == 8
    words = text.split()
    stop = f"{words[3][1:]} {words[4][:2]}"  # spans two tokens: "w15 w51" -> "15 w5"
    cut = text.find(stop)
    needed = next(k for k in range(1, 9) if stop in chat_server[2].decode(new[:k]))
    for stream in (False, True):
        answer = client.completions.create(model=CHAT_MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                           stop=["never", stop], stream=stream,
                                           **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            chunks = list(answer)
            got = "".join(c.choices[0].text for c in chunks if c.choices)
            finish, usage = chunks[-2].choices[0].finish_reason, chunks[-1].usage
        else:
            got, finish, usage = answer.choices[0].text, answer.choices[0].finish_reason, answer.usage
        assert (got, finish, usage.completion_tokens) == (text[:cut], "stop", needed)


def test_seeded_sampling_equals_generate(chat_server, client):
    ids = chat_ids(chat_server, CHAT)
    text, _ = reference(chat_server, ids, 8, temperature=0.9, top_p=0.95, seed=7)
    answers = [client.chat.completions.create(model=CHAT_MODEL, messages=CHAT, max_tokens=8, temperature=0.9,
                                              top_p=0.95, seed=seed).choices[0].message.content for seed in (7, 7, 8)]
    assert answers[0] == answers[1] == text != answers[2]  # the seed reproduces generate's draws; another differs


BAD_REQUESTS = {
    "unknown model": (404, "model", "model_not_found", dict(model="gpt-4o", messages=CHAT)),
    "no messages": (400, "messages", None, dict(model=CHAT_MODEL)),
    "empty messages": (400, "messages", None, dict(model=CHAT_MODEL, messages=[])),
    "negative max_tokens": (400, "max_tokens", None, dict(model=CHAT_MODEL, messages=CHAT, max_tokens=-1)),
    "context overflow": (400, "messages", "context_length_exceeded",
                         dict(model=CHAT_MODEL, messages=CHAT, max_tokens=CONTEXT)),
    "temperature": (400, "temperature", None, dict(model=CHAT_MODEL, messages=CHAT, temperature=2.5)),
    "top_p": (400, "top_p", None, dict(model=CHAT_MODEL, messages=CHAT, top_p=0)),
    "n": (400, "n", None, dict(model=CHAT_MODEL, messages=CHAT, n=2)),
    "unsupported argument": (400, "presence_penalty", None, dict(model=CHAT_MODEL, messages=CHAT, presence_penalty=1)),
    "logit_bias id": (400, "logit_bias", None, dict(model=CHAT_MODEL, messages=CHAT, logit_bias={"5000": 1})),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_and_the_server_goes_on(chat_server, client, case):
    status, param, code, body = BAD_REQUESTS[case]
    got, answer = post(chat_server[0], "/v1/chat/completions", json.dumps(body).encode())
    assert got == status and set(answer) == {"error"}
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert (answer["error"]["type"], answer["error"]["param"], answer["error"]["code"]) == \
        ("invalid_request_error", param, code)
    assert client.chat.completions.create(model=CHAT_MODEL, messages=CHAT, max_tokens=2, temperature=0).choices


def test_malformed_json_and_the_openai_client_errors(chat_server, client):
    status, answer = post(chat_server[0], "/v1/chat/completions", b'{"model": "tiny-chat", "messages": [')
    assert status == 400 and answer["error"]["message"].startswith("We could not parse the JSON body")
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert raised.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=CHAT_MODEL, prompt="w1 " * CONTEXT, max_tokens=1)
    assert raised.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="does not serve embeddings"):
        client.embeddings.create(model=CHAT_MODEL, input="w1")
    assert client.completions.create(model=CHAT_MODEL, prompt="w1", max_tokens=2, temperature=0).choices


def test_a_client_leaving_mid_stream_frees_the_model(chat_server, client):
    url = chat_server[0]
    before = health(url)
    # EOS banned, so only the client leaving can end this generation before 900 tokens
    long = dict(model=CHAT_MODEL, messages=CHAT, max_tokens=900, temperature=0, logit_bias={str(EOS): -100},
                stream=True)
    stream = client.chat.completions.create(**long)
    pieces = [c.choices[0].delta.content for c, _ in zip(stream, range(4))]
    queued = client.chat.completions.create(**long)  # waits behind the first: its role chunk comes at once
    assert next(iter(queued)).choices[0].delta.role == "assistant"
    queued.close()
    stream.close()
    assert pieces[1:] and all(pieces[1:])
    ids = chat_ids(chat_server, CHAT)
    answer = client.chat.completions.create(model=CHAT_MODEL, messages=CHAT, max_tokens=4, temperature=0)
    assert answer.choices[0].message.content == reference(chat_server, ids, 4)[0]
    after = health(url)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 2  # the running one and the queued one
    assert after["generated_tokens"] - before.get("generated_tokens", 0) < 400 + 4  # stopped well before 900, skipped
    assert not after["busy"] and after["queued"] == 0


def test_concurrent_streams_all_answer_right(chat_server, client):
    """16 streaming clients at once: every answer equals generate's; prints requests/s and tokens/s."""
    prompts = [[{"role": "user", "content": " ".join(f"w{(7 * i + j) % 90 + 5}" for j in range(i % 5 + 1))}]
               for i in range(16)]
    expected = [reference(chat_server, chat_ids(chat_server, p), 8)[0] for p in prompts]
    answers, tokens = [None] * len(prompts), [0] * len(prompts)

    def ask(i):
        stream = client.chat.completions.create(model=CHAT_MODEL, messages=prompts[i], max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        answers[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        tokens[i] = chunks[-1].usage.completion_tokens

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    seconds = time.perf_counter() - began
    assert answers == expected
    print(f"\n{len(prompts)} concurrent streams: {len(prompts) / seconds:.1f} requests/s, "
          f"{sum(tokens) / seconds:.1f} tokens/s ({seconds:.2f} s)")


@pytest.mark.slow
def test_the_default_model_is_smollm2(tmp_path):
    """`msfx serve` with no `--model` serves SmolLM2-135M-Instruct's GGUF, as `msfx generate` picks it."""
    from msfx.params.gguf import gguf_checkpoint, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model_dir = gguf_checkpoint(gguf)  # converted once, into the cache the server reads too
    proc, url = start_server(tmp_path / "server.log")
    try:
        model = msfx.AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        wait_for(proc, url, tmp_path / "server.log")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        answer = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages,
                                                max_tokens=24, temperature=0).choices[0].message.content
    finally:
        stop_server(proc)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    out = model.generate(input_ids=np.asarray([ids]), max_new_tokens=24, do_sample=False, jit="decode")
    assert answer == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True) and "Paris" in answer


# ---------------------------------------------------------------- embeddings (all-MiniLM-L6-v2)

@pytest.fixture
def serve_in_thread():
    """Factory: `(model, tokenizer, name) -> base url` of an `OpenAIServer` run by uvicorn on a thread
    of this process (its model thread too), stopped after the test."""
    import uvicorn

    from msfx.serving.app import OpenAIServer

    servers = []

    def start(model, tokenizer, name: str) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(OpenAIServer(model, tokenizer, name).app(), host="127.0.0.1",
                                               port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
        while not server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.should_exit = True


@pytest.mark.skipif(MINILM_DIR is None, reason="the all-MiniLM-L6-v2 package is not installed")
def test_embeddings_equal_sentence_transformers_pooling(serve_in_thread):
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM_DIR)
    url = serve_in_thread(msfx.AutoModel.from_pretrained(MINILM_DIR), tokenizer, "all-MiniLM-L6-v2")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES)
    as_base64 = post(url, "/v1/embeddings", json.dumps(dict(model="all-MiniLM-L6-v2", input=SENTENCES[0],
                                                            encoding_format="base64")).encode())[1]
    with pytest.raises(openai.BadRequestError, match="does not serve chat completions"):
        client.chat.completions.create(model="all-MiniLM-L6-v2", messages=CHAT)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    hf = transformers.AutoModel.from_pretrained(MINILM_DIR, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state.numpy()
    expected = sentence_embeddings(hidden, batch["attention_mask"].numpy())
    got = np.array([d.embedding for d in answer.data])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert answer.usage.prompt_tokens == int(batch["attention_mask"].sum())
    decoded = np.frombuffer(base64.b64decode(as_base64["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, got[0], atol=1e-6)


# ---------------------------------------------------------------- streamed text (no server)

def pieces_of(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[str], int, bool]:
    """`Detokenizer` fed `ids` one at a time: (the pieces, the ids it read, whether a stop sequence ended it)."""
    from msfx.serving.text import Detokenizer

    detokenizer = Detokenizer(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(detokenizer.add(token))
        if detokenizer.stopped:
            break
    return pieces + [detokenizer.finish()], detokenizer.tokens, detokenizer.stopped


@pytest.mark.parametrize("stop, text, read, stopped", [
    ([], "w5 w6 w7 w8", 5, False),                  # no stop: everything, </s> dropped
    (["w7"], "w5 w6 ", 3, True),                    # the answer ends before the stop sequence
    (["6 w7 w", "w6"], "w5 ", 2, True),             # the earliest of several
    (["w8 w9"], "w5 w6 w7 w8", 5, False),           # a held-back prefix that never completes comes out at the end
])
def test_detokenizer_cuts_at_stop_sequences(stop, text, read, stopped):
    tokenizer = chat_tokenizer()
    ids = tokenizer("w5 w6 w7 w8", add_special_tokens=False)["input_ids"] + [EOS]
    pieces, tokens, ended = pieces_of(tokenizer, ids, stop)
    assert ("".join(pieces), tokens, ended) == (text, read, stopped)


def test_detokenizer_pieces_join_to_decode_on_smollm2s_byte_level_tokens():
    """Multi-byte characters split across tokens wait for their last byte; the pieces join to `decode`."""
    from msfx.params.gguf import gguf_tokenizer, read_gguf, smollm2_gguf_path

    try:
        tokenizer = gguf_tokenizer(read_gguf(smollm2_gguf_path()))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    text = "Zürich's café costs 5€ — 東京 is far 🚀🚀, naïve!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens hold part of a character
    pieces, tokens, _ = pieces_of(tokenizer, ids, [])
    assert "".join(pieces) == tokenizer.decode(ids) == text and tokens == len(ids)
    assert all("\ufffd" not in p for p in pieces)
    pieces, _, ended = pieces_of(tokenizer, ids, ["東京"])
    assert "".join(pieces) == "Zürich's café costs 5€ — " and ended
