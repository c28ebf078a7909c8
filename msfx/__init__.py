"""msfx: Hugging Face Transformers models running natively on MindSpore.

Swap the import (`from msfx import LlamaForCausalLM`) and keep the `transformers` tokenizer and
config. Research code calls the functional cores directly: `msfx.llama.forward(params, ids)`.

Names are imported on first use (PEP 562), so `msfx --help` and argument errors do not wait for
MindSpore and transformers to import.
"""
import importlib as _importlib
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

# public name -> (module, attribute; None: the module itself)
_NAMES = {
    **{name: ("msfx.models.auto", name) for name in (
        "AutoModel", "AutoModelForCausalLM", "AutoModelForImageClassification", "AutoModelForMaskedLM",
        "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification", "AutoModelForTextEncoding",
        "AutoModelForZeroShotImageClassification", "AutoModelForImageTextToText")},
    **{name: ("msfx.errors", name) for name in ("CheckpointError", "CorruptCheckpointError", "ModelNotFoundError")},
    "KVCache": ("msfx.decode.cache", "KVCache"),
    "Trainer": ("msfx.train.trainer", "Trainer"),
    "TrainingArguments": ("msfx.train.trainer", "TrainingArguments"),
    "pipeline": ("msfx.pipelines", "pipeline"),
    **{core: (f"msfx.architectures.{core}", None)
       for core in ("bert", "clip", "dinov2", "gpt2", "llama", "llava", "siglip", "t5", "vit")},
    # classes no Auto class picks (HF's auto mappings have no entry for them)
    **{name: ("msfx.models.clip", name) for name in ("CLIPTextModelWithProjection", "CLIPVisionModelWithProjection")},
    "SiglipTextModel": ("msfx.models.siglip", "SiglipTextModel"),
}


def _family_names() -> dict:
    """Every family's classes by HF's names, and the other Llama-like families' functional modules
    (`msfx.qwen2`), from the table in `msfx.families`."""
    from msfx.families import FAMILIES

    names = {name: record for record in FAMILIES.values() for _, name in record.auto}
    names |= {t: record for t, record in FAMILIES.items() if record.spec is not None and t != "llama"}
    return names


def __getattr__(name: str):
    if name in _NAMES:
        module, attribute = _NAMES[name]
        value = _importlib.import_module(module)
        value = value if attribute is None else getattr(value, attribute)
    elif name == "__all__":
        value = sorted(_NAMES) + sorted(_family_names())
    elif not name.startswith("_") and name in (family := _family_names()):
        record = family[name]
        if name == record.model_type:
            from msfx.architectures.llama import family_module

            value = family_module(name)
        else:
            value = record.class_named(name)
    else:
        raise AttributeError(f"module 'msfx' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__getattr__("__all__")))
