"""`zero-shot-image-classification`: HF's `ZeroShotImageClassificationPipeline`
(`transformers/pipelines/zero_shot_image_classification.py`) over msfx's CLIP."""
from __future__ import annotations

import numpy as np
from transformers.image_utils import load_image

from msfx.pipelines.base import Pipeline, to_numpy
from msfx.pipelines.text import softmax


class ZeroShotImageClassificationPipeline(Pipeline):
    """Score an image against `candidate_labels` put into `hypothesis_template` ("This is a photo of {}."):
    `[{"score", "label"}]` sorted by score (softmax over the labels of `logits_per_image`); a list of
    images gives a list of such lists. Images: PIL images, local paths, URLs or base64 (HF's `load_image`)."""

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
        inputs = {"pixel_values": np.asarray(self.image_processor(images=[image], return_tensors="np")["pixel_values"],
                                             dtype=np.float32)}
        sequences = [hypothesis_template.format(label) for label in candidate_labels]
        text_inputs = self.tokenizer(sequences, return_tensors="np", **{"padding": True, **(tokenizer_kwargs or {})})
        inputs["candidate_labels"] = candidate_labels
        inputs["text_inputs"] = [dict(text_inputs)]
        return inputs

    def _forward(self, model_inputs: dict) -> dict:
        text_inputs = model_inputs["text_inputs"]
        text_inputs = text_inputs[0] if isinstance(text_inputs[0], dict) else text_inputs[0][0]  # batched: a list each
        outputs = self.model(**self._model_inputs({**text_inputs, "pixel_values": model_inputs["pixel_values"]}))
        return {"candidate_labels": model_inputs["candidate_labels"], "logits": to_numpy(outputs.logits_per_image)}

    def postprocess(self, model_outputs: dict) -> list[dict]:
        probs = softmax(model_outputs["logits"][0].astype(np.float32))
        pairs = sorted(zip(probs.tolist(), model_outputs["candidate_labels"]), key=lambda x: -x[0])
        return [{"score": score, "label": label} for score, label in pairs]
