"""msfx: Hugging Face Transformers models running natively on MindSpore.

Swap the import (`from msfx import LlamaForCausalLM`) and keep the `transformers` tokenizer and
config. Research code calls the functional cores directly: `msfx.llama.forward(params, ids)`.
"""
import os as _os
import sys as _sys

# MindSpore's C++ log prints ~120 graph-analyzer warnings while compiling a decode step, in the
# middle of streamed text; keep errors only unless the user set a level (read at its import).
_QUIET_LOG = "GLOG_v" not in _os.environ
_MINDSPORE_FIRST = "mindspore" in _sys.modules
_os.environ.setdefault("GLOG_v", "3")

import mindspore as _ms  # noqa: E402


def _raise_cpp_log_threshold(level: int = 3) -> None:
    """Keep MindSpore's C++ messages below `level` (3: errors) out, after mindspore was imported.

    MindSpore 2.10 has no API for it and reads GLOG_v once; its log macros compare against the
    exported per-submodule table `mindspore::g_ms_submodule_log_levels` (39 ints, `nm -DS
    libmindspore_core.so`), which is raised here. Another MindSpore keeps its log as it is.
    """
    import ctypes

    if not _ms.__version__.startswith("2.10."):
        return
    core = ctypes.CDLL(_os.path.join(_os.path.dirname(_ms.__file__), "lib", "libmindspore_core.so"))
    levels = (ctypes.c_int * 39).in_dll(core, "_ZN9mindspore25g_ms_submodule_log_levelsE")
    for i, current in enumerate(levels):
        levels[i] = max(current, level)


if _QUIET_LOG and _MINDSPORE_FIRST:
    _raise_cpp_log_threshold()

if _ms.get_context("device_target") == "CPU":
    # Synchronous kernel launch: eager CPU steps ran ~10x faster (2.6 s -> 0.2 s per SmolLM2
    # token, measured with MindSpore 2.10); compiled steps are unaffected.
    _ms.runtime.launch_blocking()

from msfx.architectures import (bert, gemma2, gemma3_text, gpt2, llama, mistral, mixtral, modernbert,  # noqa: E402
                                phi3, qwen2, qwen3, qwen3_moe)
from msfx.decode.cache import KVCache  # noqa: E402
from msfx.errors import CheckpointError, CorruptCheckpointError, ModelNotFoundError  # noqa: E402
from msfx.families import FAMILIES as _FAMILIES  # noqa: E402
from msfx.models.auto import (AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,  # noqa: E402
                              AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                              AutoModelForTextEncoding, AutoModelForTokenClassification,
                              AutoModelForZeroShotImageClassification)
from msfx.models import clip as _clip_models  # noqa: E402
from msfx.pipelines import pipeline  # noqa: E402
from msfx.train.trainer import Trainer, TrainingArguments  # noqa: E402

__version__ = "0.1.0"

# every family's classes, by HF's names, from the table in `msfx.families`
_CLASSES = {name: _record.class_named(name) for _record in _FAMILIES.values() for _, name in _record.auto}
# classes no Auto class picks (HF's auto mappings have no entry for them)
_CLASSES |= {"CLIPTextModelWithProjection": _clip_models.CLIPTextModelWithProjection,
             "CLIPVisionModelWithProjection": _clip_models.CLIPVisionModelWithProjection}
globals().update(_CLASSES)

__all__ = ["AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForQuestionAnswering",
           "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification", "AutoModelForTextEncoding",
           "AutoModelForTokenClassification", "AutoModelForZeroShotImageClassification",
           "CheckpointError", "CorruptCheckpointError", "KVCache", "ModelNotFoundError", "Trainer", "TrainingArguments",
           "bert", "gemma2", "gemma3_text", "gpt2", "llama", "mistral", "mixtral", "modernbert", "phi3", "pipeline",
           "qwen2", "qwen3", "qwen3_moe"]
__all__ += sorted(_CLASSES)
