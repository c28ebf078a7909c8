"""HF-named Qwen3-MoE classes over `msfx.architectures.qwen3_moe` (see `msfx.models.llama.llama_family`)."""
from msfx.architectures import qwen3_moe
from msfx.models.llama import llama_family

Qwen3MoeModel, Qwen3MoeForCausalLM, Qwen3MoeForSequenceClassification, AUTO_CLASSES = llama_family(
    "Qwen3Moe", qwen3_moe, __name__, moe=True)
