"""HF-named Qwen2 classes over `msfx.architectures.qwen2` (see `msfx.models.llama.llama_family`)."""
from msfx.architectures import qwen2
from msfx.models.llama import llama_family

Qwen2Model, Qwen2ForCausalLM, Qwen2ForSequenceClassification, AUTO_CLASSES = llama_family("Qwen2", qwen2, __name__)
