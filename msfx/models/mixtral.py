"""HF-named Mixtral classes over `msfx.architectures.mixtral` (see `msfx.models.llama.llama_family`)."""
from msfx.architectures import mixtral
from msfx.models.llama import llama_family

MixtralModel, MixtralForCausalLM, MixtralForSequenceClassification, AUTO_CLASSES = llama_family(
    "Mixtral", mixtral, __name__, moe=True)
