"""LoRA fine-tuning in peft's shape and file format: `get_peft_model(model, LoraConfig(...))`,
`PeftModel.from_pretrained(model, directory)`, `save_pretrained`, `merge_and_unload`.

msfx reads and writes peft's files itself (peft is not imported)."""
from msfx.peft.config import LoraConfig
from msfx.peft.model import PeftModel, get_peft_model

__all__ = ["LoraConfig", "PeftModel", "get_peft_model"]
