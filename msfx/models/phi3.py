"""HF-named Phi3 classes over `msfx.architectures.phi3` (see `msfx.models.llama.llama_family`)."""
from msfx.architectures import phi3
from msfx.models.llama import llama_family

Phi3Model, Phi3ForCausalLM, Phi3ForSequenceClassification, AUTO_CLASSES = llama_family("Phi3", phi3, __name__)
