"""Image tasks: HF's `ZeroShotImageClassificationPipeline` (`zero-shot-image-classification`, over
msfx's CLIP and SigLIP) and `ImageClassificationPipeline` (`image-classification`), following
`transformers/pipelines/zero_shot_image_classification.py` and `image_classification.py`."""
from __future__ import annotations

import numpy as np
from transformers.image_utils import load_image

from msfx.pipelines.base import Pipeline, to_numpy
from msfx.pipelines.text import sigmoid, softmax


def _pixel_values(image_processor, images) -> np.ndarray:
    return np.asarray(image_processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)


class ZeroShotImageClassificationPipeline(Pipeline):
    """Score an image against `candidate_labels` put into `hypothesis_template` ("This is a photo of {}."):
    `[{"score", "label"}]` sorted by score (softmax over the labels of `logits_per_image`; for SigLIP,
    each label's sigmoid, its texts padded to 64 tokens, as HF); a list of images gives a list of such
    lists. Images: PIL images, local paths, URLs or base64 (HF's `load_image`)."""

    def _sanitize_parameters(self, tokenizer_kwargs=None, **kwargs):
        preprocess = {k: kwargs.pop(k) for k in ("candidate_labels", "timeout", "hypothesis_template") if k in kwargs}
        if tokenizer_kwargs is not None:
            preprocess["tokenizer_kwargs"] = tokenizer_kwargs
        if kwargs:
            raise TypeError(f"zero-shot-image-classification got unexpected arguments {sorted(kwargs)}")
        return preprocess, {}, {}

    def __call__(self, image=None, candidate_labels=None, **kwargs):
        """Classify `image` (or a list of images) among `candidate_labels` (a list of strings).

        Raises:
            ValueError: no image, or no candidate labels.
        """
        image = kwargs.pop("images", image)
        if image is None:
            raise ValueError("Cannot call the zero-shot-image-classification pipeline without an images argument!")
        if not candidate_labels:
            raise ValueError("zero-shot-image-classification needs candidate_labels (a list of label strings)")
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)

    def preprocess(self, image, candidate_labels=None, hypothesis_template="This is a photo of {}.", timeout=None,
                   tokenizer_kwargs=None) -> dict:
        image = load_image(image, timeout=timeout)
        inputs = {"pixel_values": _pixel_values(self.image_processor, [image])}
        sequences = [hypothesis_template.format(label) for label in candidate_labels]
        defaults = {"padding": True}
        if self._siglip():  # SigLIP pools its last position: every text padded to the length it was trained on
            defaults.update(padding="max_length", max_length=64, truncation=True)
        text_inputs = self.tokenizer(sequences, return_tensors="np", **{**defaults, **(tokenizer_kwargs or {})})
        inputs["candidate_labels"] = candidate_labels
        inputs["text_inputs"] = [dict(text_inputs)]
        return inputs

    def _forward(self, model_inputs: dict) -> dict:
        text_inputs = model_inputs["text_inputs"]
        text_inputs = text_inputs[0] if isinstance(text_inputs[0], dict) else text_inputs[0][0]  # batched: a list each
        outputs = self.model(**self._model_inputs({**text_inputs, "pixel_values": model_inputs["pixel_values"]}))
        return {"candidate_labels": model_inputs["candidate_labels"], "logits": to_numpy(outputs.logits_per_image)}

    def _siglip(self) -> bool:
        return "siglip" in self.model.config.model_type

    def postprocess(self, model_outputs: dict) -> list[dict]:
        probs = (sigmoid if self._siglip() else softmax)(model_outputs["logits"][0].astype(np.float32))
        pairs = sorted(zip(probs.tolist(), model_outputs["candidate_labels"]), key=lambda x: -x[0])
        return [{"score": score, "label": label} for score, label in pairs]


class ImageClassificationPipeline(Pipeline):
    """Classify an image with an `...ForImageClassification` model: the `top_k` (default 5, at most
    `num_labels`) `{"label", "score"}` sorted by score, labels from `config.id2label`; a list of
    images gives a list of such lists. `function_to_apply` "sigmoid", "softmax" or "none" (default:
    HF's choice by `problem_type` / `num_labels`). Images: PIL images, paths, URLs, base64 or arrays."""

    needs_tokenizer = False

    def _sanitize_parameters(self, top_k=None, function_to_apply=None, timeout=None):
        preprocess = {} if timeout is None else {"timeout": timeout}
        postprocess = {} if top_k is None else {"top_k": top_k}
        if function_to_apply is not None:
            function_to_apply = str(getattr(function_to_apply, "value", function_to_apply)).lower()
            if function_to_apply not in ("sigmoid", "softmax", "none"):
                raise ValueError(f"Unrecognized `function_to_apply` argument: {function_to_apply}")
            postprocess["function_to_apply"] = function_to_apply
        return preprocess, {}, postprocess

    def __call__(self, inputs=None, **kwargs):
        """Classify `inputs` (an image or a list of images; `images=` as HF's older spelling).

        Raises:
            ValueError: no image, or an unknown `function_to_apply`.
        """
        inputs = kwargs.pop("images", inputs)
        if inputs is None:
            raise ValueError("Cannot call the image-classification pipeline without an inputs argument!")
        return super().__call__(inputs, **kwargs)

    def preprocess(self, image, timeout=None) -> dict:
        if not isinstance(image, np.ndarray):
            image = load_image(image, timeout=timeout)
        return {"pixel_values": _pixel_values(self.image_processor, image)}

    def _forward(self, model_inputs: dict) -> dict:
        return {"logits": to_numpy(self.model(pixel_values=model_inputs["pixel_values"]).logits)}

    def _default_function(self) -> str:
        config = self.model.config
        if config.problem_type == "regression":
            return "none"
        if config.problem_type == "multi_label_classification" or config.num_labels == 1:
            return "sigmoid"
        if config.problem_type == "single_label_classification" or config.num_labels > 1:
            return "softmax"
        return getattr(config, "function_to_apply", "none")

    def postprocess(self, model_outputs: dict, function_to_apply=None, top_k=5) -> list[dict]:
        function_to_apply = function_to_apply or self._default_function()
        outputs = model_outputs["logits"][0].astype(np.float32)
        scores = {"sigmoid": sigmoid, "softmax": softmax, "none": lambda x: x}[function_to_apply](outputs)
        records = [{"label": self.model.config.id2label[i], "score": float(score)} for i, score in enumerate(scores)]
        records.sort(key=lambda x: x["score"], reverse=True)
        return records[:min(top_k, self.model.config.num_labels)]
