"""The CLIP vision tower's own model type, "clip_vision_model", for `msfx.models.auto.FAMILIES` (the
classes live in `msfx.models.clip`)."""
from __future__ import annotations

from msfx.models.clip import CLIPVisionModel, CLIPVisionModelWithProjection

__all__ = ["AUTO_CLASSES", "CLIPVisionModel", "CLIPVisionModelWithProjection"]

AUTO_CLASSES = {"AutoModel": CLIPVisionModel}
