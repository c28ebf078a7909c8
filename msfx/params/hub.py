"""Resolving a model reference (local directory or hub id) to a local directory."""
from __future__ import annotations

import os
from pathlib import Path

from msfx.errors import ModelNotFoundError

# Everything a checkpoint directory needs, without other frameworks' weights.
_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


def resolve_model_dir(ref: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None,
                      local_files_only: bool = False, token: str | bool | None = None,
                      gguf_file: str | None = None) -> Path:
    """A local directory holding the checkpoint `ref`.

    `ref` is a local directory, or a hub id fetched (or found in the cache) with
    `huggingface_hub.snapshot_download`. `local_files_only=True` or `HF_HUB_OFFLINE=1` restricts
    the lookup to the local cache. With `gguf_file`, only that file and JSON metadata are fetched.

    Raises:
        ModelNotFoundError: `ref` is not a directory and cannot be resolved on the hub or in the
            cache (offline, unknown id, unknown revision, no network).
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", gguf_file] if gguf_file else _PATTERNS
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}
    try:
        return Path(snapshot_download(str(ref), revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                      token=token, allow_patterns=patterns))
    except HFValidationError as e:
        raise ModelNotFoundError(f"{str(ref)!r} is neither a local directory nor a valid hub id") from e
    except Exception as e:  # hub errors: offline cache miss, 404, no network, bad revision
        mode = " (offline: only the local cache was searched)" if offline else ""
        raise ModelNotFoundError(f"cannot find model {str(ref)!r}{mode}: it is not a local directory and "
                                 f"the hub lookup failed with {type(e).__name__}: {e}") from e


def resolve_gguf_file(ref: str | os.PathLike | None, gguf_file: str | os.PathLike, **hub) -> Path:
    """The local path of `gguf_file`: a file of that name inside the directory `ref` (HF's meaning
    of `from_pretrained(ref, gguf_file=name)`), else `gguf_file` itself as a path (absolute or
    relative to the working directory), else that file fetched from the hub id `ref`.

    `hub`: `resolve_model_dir`'s keyword arguments (revision, cache_dir, local_files_only, token).

    Raises:
        FileNotFoundError: no such file (with `ref` None, or not inside `ref`).
        ModelNotFoundError: `ref` is neither a directory nor a hub id that can be fetched.
    """
    if ref is not None and (inside := Path(ref).expanduser() / gguf_file).is_file():
        return inside
    if (path := Path(gguf_file).expanduser()).is_file():
        return path
    if ref is None:
        raise FileNotFoundError(f"GGUF file {str(gguf_file)!r} not found")
    path = resolve_model_dir(ref, gguf_file=str(gguf_file), **hub) / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_file)!r} not found in {str(ref)!r}")
    return path
