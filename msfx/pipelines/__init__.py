"""`msfx.pipeline(task, model=...)`: HF's `transformers.pipeline` over msfx models.

transformers' own pipelines run only torch models; these follow their call shapes, arguments and
output dicts (`transformers/pipelines/`), with transformers' tokenizers and processors (numpy).
"""
from __future__ import annotations

import importlib
import logging
import os

from msfx.modeling import PreTrainedModel
from msfx.models import auto

# task -> (pipeline class "module:Class", msfx Auto class loading a checkpoint for it, needs an image processor)
TASKS: dict[str, tuple[str, str, bool]] = {
    "text-generation": ("text_generation:TextGenerationPipeline", "AutoModelForCausalLM", False),
    "fill-mask": ("text:FillMaskPipeline", "AutoModelForMaskedLM", False),
    "feature-extraction": ("text:FeatureExtractionPipeline", "AutoModel", False),
    "text-classification": ("text:TextClassificationPipeline", "AutoModelForSequenceClassification", False),
    "token-classification": ("token_classification:TokenClassificationPipeline", "AutoModelForTokenClassification",
                             False),
    "question-answering": ("question_answering:QuestionAnsweringPipeline", "AutoModelForQuestionAnswering", False),
    "text2text-generation": ("text2text:Text2TextGenerationPipeline", "AutoModelForSeq2SeqLM", False),
    "summarization": ("text2text:SummarizationPipeline", "AutoModelForSeq2SeqLM", False),
    "translation": ("text2text:TranslationPipeline", "AutoModelForSeq2SeqLM", False),
    "zero-shot-image-classification": ("vision:ZeroShotImageClassificationPipeline",
                                       "AutoModelForZeroShotImageClassification", True),
    "image-classification": ("vision:ImageClassificationPipeline", "AutoModelForImageClassification", True),
    "automatic-speech-recognition": ("speech:AutomaticSpeechRecognitionPipeline", "AutoModelForSpeechSeq2Seq", False),
}
ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}
logger = logging.getLogger(__name__)


def supported_tasks() -> list[str]:
    """Every task name `pipeline` accepts (aliases included; "translation_xx_to_yy" for any languages)."""
    return sorted([*TASKS, "translation_xx_to_yy", *(alias for alias, task in ALIASES.items() if task in TASKS)])


def _task_entry(task: str | None) -> tuple[str, tuple[str, str, bool]]:
    if task is None:
        raise ValueError(f"msfx.pipeline needs a task, one of: {', '.join(supported_tasks())}")
    name = ALIASES.get(task, task)
    if name.startswith("translation_") and len(name.split("_")) == 4:
        return name, TASKS["translation"]
    if name not in TASKS:
        raise ValueError(f"Unknown task {task!r}; msfx supports: {', '.join(supported_tasks())}")
    return name, TASKS[name]


def _load_model(task: str, model, auto_name: str, model_kwargs: dict):
    if model is None:
        raise ValueError(f"pipeline({task!r}) needs model=: msfx has no default checkpoint (and no hub access is "
                         "assumed); pass a hub id or local directory (model='path/to/checkpoint'), or an msfx "
                         "model instance together with tokenizer=")
    if isinstance(model, (str, os.PathLike)):
        return getattr(auto, auto_name).from_pretrained(model, **model_kwargs)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"pipeline({task!r}): model= must be a hub id, a directory or an msfx model, got "
                        f"{type(model).__module__}.{type(model).__name__} (for a transformers model, pass its "
                        "directory: msfx loads the weights itself)")
    return model


def _load_preprocessor(loader_name: str, given, model, task: str, what: str):
    """`given` if an object, else `transformers.<loader_name>.from_pretrained(given or the model's path)`."""
    import transformers

    if given is not None and not isinstance(given, (str, os.PathLike)):
        return given
    ref = given if given is not None else (model if isinstance(model, (str, os.PathLike)) else None)
    if ref is None:
        raise ValueError(f"pipeline({task!r}) with a model instance needs {what}= (e.g. "
                         f"transformers.{loader_name}.from_pretrained(path))")
    from msfx.params.hub import resolve_model_dir
    return getattr(transformers, loader_name).from_pretrained(resolve_model_dir(ref))


def _translation_task(config) -> str:
    """HF 4.x: plain "translation" takes the first `translation_xx_to_yy` of the config's task params."""
    for key in getattr(config, "task_specific_params", None) or {}:
        if key.startswith("translation"):
            logger.warning('"translation" task was used, instead of "translation_XX_to_YY", defaulting to "%s"', key)
            return key
    return "translation"


def pipeline(task: str | None = None, model=None, tokenizer=None, image_processor=None, processor=None,
             feature_extractor=None, dtype=None, model_kwargs: dict | None = None, batch_size: int | None = None,
             **kwargs):
    """Build a pipeline for `task` as `transformers.pipeline` does, running an msfx model.

    Args:
        task: one of `supported_tasks()` (e.g. "text-generation", "fill-mask", "image-classification";
            "sentiment-analysis" is "text-classification", "ner" is "token-classification";
            "question-answering", "summarization" / "translation_en_to_de" run as in transformers 4.x,
            which removed these tasks in 5: the latter two with the T5 config's `task_specific_params`).
        model: a hub id or local checkpoint directory (loaded with msfx's Auto class for the task), or
            an msfx model instance (then pass `tokenizer=`, and for images `image_processor=`).
        tokenizer: a transformers tokenizer, or a path / hub id for `AutoTokenizer`; default: the model's.
        image_processor / processor: for image tasks (`processor=` a `CLIPProcessor` / `SiglipProcessor`, whose
            parts are used); default: the checkpoint's `AutoImageProcessor` (without torchvision, transformers
            gives its PIL / numpy one, e.g. `ViTImageProcessorPil`).
        feature_extractor: for audio tasks (`transformers.WhisperFeatureExtractor`, or a path; default the
            model's; `processor=` a `WhisperProcessor` gives it too).
        dtype: passed to `from_pretrained` (e.g. "bfloat16"), with `model_kwargs`.
        batch_size: default batch size for list inputs.
        **kwargs: the task's call arguments, defaults for every call (HF's pipeline kwargs).

    Raises:
        ValueError: no task or an unknown one (the message lists the supported tasks), no model (msfx
            downloads no default checkpoint), or a model instance without its tokenizer / processor.
        TypeError: a model that is not an msfx model (e.g. a transformers torch model).
    """
    name, (class_path, auto_name, needs_images) = _task_entry(task)
    model_kwargs = dict(model_kwargs or {})
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    loaded = _load_model(name, model, auto_name, model_kwargs)
    if name == "translation":
        name = _translation_task(loaded.config)
    if processor is not None:
        tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        image_processor = image_processor if image_processor is not None else getattr(processor, "image_processor",
                                                                                     None)
        feature_extractor = feature_extractor if feature_extractor is not None else \
            getattr(processor, "feature_extractor", None)
    if name == "automatic-speech-recognition":
        kwargs["feature_extractor"] = _load_preprocessor("AutoFeatureExtractor", feature_extractor, model, name,
                                                         "feature_extractor")
    module, cls = class_path.split(":")
    pipeline_class = getattr(importlib.import_module(f"msfx.pipelines.{module}"), cls)
    if pipeline_class.needs_tokenizer:
        tokenizer = _load_preprocessor("AutoTokenizer", tokenizer, model, name, "tokenizer")
    if needs_images:
        image_processor = _load_preprocessor("AutoImageProcessor", image_processor, model, name, "image_processor")
    return pipeline_class(loaded, tokenizer=tokenizer, image_processor=image_processor, batch_size=batch_size,
                          task=name, **kwargs)


__all__ = ["pipeline", "supported_tasks", "TASKS"]
