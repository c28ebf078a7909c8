"""Reading a checkpoint's `config.json` with errors that name the file and the field."""
from __future__ import annotations

import json
import os
from pathlib import Path

import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from msfx.errors import CheckpointError


def read_config(model_dir: str | os.PathLike, **overrides) -> PretrainedConfig:
    """`AutoConfig.from_pretrained(model_dir, **overrides)` for a local directory, with the file
    checked first, so a bad file gives one line naming it, instead of a traceback from
    transformers' dataclass validation or its advice to upgrade for an unknown `model_type`.

    Raises:
        FileNotFoundError: no `config.json` in `model_dir` (its GGUF files named, if any).
        CheckpointError: `config.json` is not a JSON object (the line and column named), has no
            `model_type` or one transformers does not define, or a field transformers refuses
            (the field named).
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        ggufs = sorted(p.name for p in Path(model_dir).glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass gguf_file= (msfx generate: --gguf-file)" if ggufs else ""
        raise FileNotFoundError(f"no config.json in {model_dir}{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    model_type = data.get("model_type")
    if model_type is None:
        raise CheckpointError(f"{path} has no model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{path}: unknown model_type {model_type!r} (transformers {transformers.__version__} "
                              "does not define it)")
    try:
        return AutoConfig.from_pretrained(model_dir, **overrides)
    except (StrictDataclassError, ValueError, TypeError) as e:  # a field of the wrong type or value
        reason = " ".join(str(e.__cause__ or e).split())
        raise CheckpointError(f"{path}: {reason}") from e
