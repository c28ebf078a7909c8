"""HF-named Gemma 2 classes over `msfx.architectures.gemma2` (see `msfx.models.llama.llama_family`)."""
from msfx.architectures import gemma2
from msfx.models.llama import llama_family

Gemma2Model, Gemma2ForCausalLM, Gemma2ForSequenceClassification, AUTO_CLASSES = llama_family(
    "Gemma2", gemma2, __name__)
