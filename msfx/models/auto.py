"""HF's Auto classes (`AutoModelForCausalLM`, ...) over msfx's families.

They dispatch on `config.model_type` through the table of `msfx.families` (each record lists its
classes by Auto class, with the names transformers' auto mappings use, e.g. `gpt2` ->
`GPT2LMHeadModel` for `AutoModelForCausalLM`; a test checks them against transformers'). Adding a
family adds nothing here. (transformers' mappings themselves need torch to import.)
"""
from __future__ import annotations

import os

from msfx.families import FAMILIES, family
from msfx.params.config import read_config
from msfx.params.hub import resolve_gguf_file, resolve_model_dir

_HUB_KEYS = ("revision", "cache_dir", "local_files_only", "token")


def supported_classes() -> dict[str, dict[str, str]]:
    """Auto class name -> {model_type: msfx class name} for every class msfx provides."""
    table = {}
    for auto in AUTO_CLASSES:
        table[auto.__name__] = {model_type: name for model_type, record in FAMILIES.items()
                                if (name := dict(record.auto).get(auto.__name__)) is not None}
    return table


class _AutoModel:
    """Base of the Auto classes: `from_pretrained` / `from_config` dispatch on `config.model_type`."""

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(f"{type(self).__name__} is designed to be instantiated using "
                               f"`{type(self).__name__}.from_pretrained(...)` or `.from_config(config)`")

    @classmethod
    def model_class(cls, config):
        """The msfx class for `config` (a transformers config).

        Raises:
            ValueError: a model_type msfx does not support, or one without a class for this task.
        """
        model_type = config.model_type
        if model_type not in FAMILIES:
            raise ValueError(f"msfx does not support model_type {model_type!r} (in {cls.__name__}); "
                             f"supported model types: {', '.join(sorted(FAMILIES))}")
        model_class = family(model_type).auto_class(cls.__name__)
        if model_class is None:
            supported = sorted(t for t, record in FAMILIES.items() if cls.__name__ in dict(record.auto))
            raise ValueError(f"{cls.__name__} has no class for model_type {model_type!r} in msfx; model types "
                             f"it supports: {', '.join(supported) or 'none'}")
        return model_class

    @classmethod
    def from_config(cls, config, **kwargs):
        """A randomly initialized model of the class `config` selects (HF's `from_config`)."""
        return cls.model_class(config)(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, config=None,
                        gguf_file: str | None = None, **kwargs):
        """Load with the class the checkpoint's config selects; arguments as the class's `from_pretrained`.

        Raises:
            ValueError: see `model_class`; and the loading errors of `PreTrainedModel.from_pretrained`.
        """
        if config is None:
            hub = {k: kwargs[k] for k in _HUB_KEYS if k in kwargs}
            if gguf_file is not None:
                from msfx.params.gguf import gguf_config, read_gguf
                gguf_file = str(resolve_gguf_file(pretrained_model_name_or_path, gguf_file, **hub))
                config = gguf_config(read_gguf(gguf_file))
                kwargs["config"] = config
            else:
                directory = resolve_model_dir(pretrained_model_name_or_path, **hub)
                config = read_config(directory)
                pretrained_model_name_or_path = directory
        else:
            kwargs["config"] = config
        return cls.model_class(config).from_pretrained(pretrained_model_name_or_path, *args, gguf_file=gguf_file,
                                                       **kwargs)


def _auto(name: str) -> type:
    doc = (f"HF's `{name}`: `{name}.from_pretrained(ref)` returns the msfx class for the checkpoint's "
           "`model_type` and this task.")
    return type(name, (_AutoModel,), {"__doc__": doc, "__module__": __name__})


AutoModel = _auto("AutoModel")
AutoModelForCausalLM = _auto("AutoModelForCausalLM")
AutoModelForSeq2SeqLM = _auto("AutoModelForSeq2SeqLM")
AutoModelForSequenceClassification = _auto("AutoModelForSequenceClassification")
AutoModelForMaskedLM = _auto("AutoModelForMaskedLM")
AutoModelForTokenClassification = _auto("AutoModelForTokenClassification")
AutoModelForQuestionAnswering = _auto("AutoModelForQuestionAnswering")
AutoModelForTextEncoding = _auto("AutoModelForTextEncoding")
AutoModelForZeroShotImageClassification = _auto("AutoModelForZeroShotImageClassification")

AUTO_CLASSES = (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                AutoModelForMaskedLM, AutoModelForTokenClassification, AutoModelForQuestionAnswering,
                AutoModelForTextEncoding, AutoModelForZeroShotImageClassification)


def supported_table() -> str:
    """The README's table of supported architectures: one row per `model_type` in `FAMILIES`, with
    its classes and the Auto classes that pick them (markdown)."""
    rows = ["| model_type | classes (Auto class) |", "|---|---|"]
    table = supported_classes()
    for model_type in sorted(FAMILIES):
        picks: dict[str, list[str]] = {}
        for auto, classes in table.items():
            if model_type in classes:
                picks.setdefault(classes[model_type], []).append(auto)
        cells = [f"`{name}` ({', '.join(autos)})" for name, autos in picks.items()]
        rows.append(f"| `{model_type}` | {'<br>'.join(cells)} |")
    return "\n".join(rows)
