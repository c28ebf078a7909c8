"""HF-named Gemma 3 text classes over `msfx.architectures.gemma3_text` (see `msfx.models.llama.llama_family`)."""
from msfx.architectures import gemma3_text
from msfx.models.llama import llama_family

Gemma3TextModel, Gemma3ForCausalLM, Gemma3TextForSequenceClassification, AUTO_CLASSES = llama_family(
    "Gemma3", gemma3_text, __name__, ("Gemma3TextModel", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"))
