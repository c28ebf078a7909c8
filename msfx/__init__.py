"""msfx: Hugging Face Transformers models running natively on MindSpore.

Swap the import (`from msfx import LlamaForCausalLM`) and keep the `transformers` tokenizer and
config. Research code calls the functional cores directly: `msfx.llama.forward(params, ids)`.

Names are imported on first use (PEP 562), so `msfx --help` and argument errors do not wait for
MindSpore and transformers to import.
"""
import importlib as _importlib
import importlib.util as _importlib_util
import os as _os
import sys as _sys

__version__ = "0.1.0"

# MindSpore's C++ log prints ~120 graph-analyzer warnings while compiling a decode step, in the
# middle of streamed text; keep errors only unless the user set a level (read at its import).
if "GLOG_v" not in _os.environ:
    _os.environ["GLOG_v"] = "3"
    if "mindspore" in _sys.modules:  # imported before msfx: too late for GLOG_v
        from msfx.backend import raise_cpp_log_threshold as _raise

        _raise()

# public names outside the family table -> (module, attribute; None: the module itself)
_NAMES = {
    **{name: ("msfx.errors", name) for name in ("CheckpointError", "CorruptCheckpointError", "ModelNotFoundError")},
    "KVCache": ("msfx.decode.cache", "KVCache"),
    "Trainer": ("msfx.train.trainer", "Trainer"),
    "TrainingArguments": ("msfx.train.trainer", "TrainingArguments"),
    "pipeline": ("msfx.pipelines", "pipeline"),
    # classes no Auto class picks (HF's auto mappings have no entry for them)
    **{name: ("msfx.models.clip", name) for name in ("CLIPTextModelWithProjection", "CLIPVisionModelWithProjection")},
    "SiglipTextModel": ("msfx.models.siglip", "SiglipTextModel"),
}


def _family_table() -> dict:
    """name -> how to get it, for every name `msfx.families`' table gives: each family's classes
    (HF's names), the Auto classes picking them, the functional cores (`msfx.llama`) and the other
    Llama-like families' functional modules (`msfx.qwen2`)."""
    from msfx.families import FAMILIES

    table = {}
    for record in FAMILIES.values():
        table[record.core.rsplit(".", 1)[1]] = lambda core=record.core: _importlib.import_module(core)
        for auto, name in record.auto:
            table[name] = lambda record=record, name=name: record.class_named(name)
            table[auto] = lambda auto=auto: getattr(_importlib.import_module("msfx.models.auto"), auto)
        if record.spec is not None and record.model_type != "llama":
            table[record.model_type] = lambda model_type=record.model_type: _importlib.import_module(
                "msfx.architectures.llama").family_module(model_type)
    return table


def __getattr__(name: str):
    if name in _NAMES:
        module, attribute = _NAMES[name]
        value = _importlib.import_module(module)
        value = value if attribute is None else getattr(value, attribute)
    elif name == "__all__":
        value = sorted(_NAMES) + sorted(_family_table())
    elif not name.startswith("_") and name in (table := _family_table()):
        value = table[name]()
    elif not name.startswith("_") and _importlib_util.find_spec(f"msfx.{name}") is not None:
        value = _importlib.import_module(f"msfx.{name}")  # a subpackage (`msfx.train`), as an eager import gave
    else:
        raise AttributeError(f"module 'msfx' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__getattr__("__all__")))
