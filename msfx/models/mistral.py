"""HF-named Mistral classes over `msfx.architectures.mistral` (see `msfx.models.llama.llama_family`)."""
from msfx.architectures import mistral
from msfx.models.llama import llama_family

MistralModel, MistralForCausalLM, MistralForSequenceClassification, AUTO_CLASSES = llama_family(
    "Mistral", mistral, __name__)
