"""The CLIP text tower's own model type, "clip_text_model", for `msfx.models.auto.FAMILIES` (the
classes live in `msfx.models.clip`)."""
from __future__ import annotations

from msfx.models.clip import CLIPTextModel, CLIPTextModelWithProjection

__all__ = ["AUTO_CLASSES", "CLIPTextModel", "CLIPTextModelWithProjection"]

AUTO_CLASSES = {"AutoModel": CLIPTextModel, "AutoModelForTextEncoding": CLIPTextModel}
