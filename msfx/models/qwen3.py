"""HF-named Qwen3 classes over `msfx.architectures.qwen3` (see `msfx.models.llama.llama_family`)."""
from msfx.architectures import qwen3
from msfx.models.llama import llama_family

Qwen3Model, Qwen3ForCausalLM, Qwen3ForSequenceClassification, AUTO_CLASSES = llama_family("Qwen3", qwen3, __name__)
