"""peft's `LoraConfig` (peft 0.21): the fields msfx implements, with peft's names, defaults and
`adapter_config.json` spelling; a file with any other peft feature switched on is refused by name."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIASES = ("none", "all", "lora_only")
# peft's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` for msfx's families (used when target_modules is None)
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
                   "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                   "qwen3": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"], "t5": ["q", "v"]}
# peft adds the classification heads to `modules_to_save` for this task (`SEQ_CLS_HEAD_NAMES`)
SEQ_CLS_HEADS = ["classifier", "score"]
# peft fields msfx does not implement, with the value that means "off"; a config with another value is refused
UNSUPPORTED = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
               "layers_pattern": None, "layer_replication": None, "lora_bias": False, "target_parameters": None,
               "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None,
               "megatron_config": None, "arrow_config": None, "use_bdlora": None}


@dataclass
class LoraConfig:
    """peft's `LoraConfig`: LoRA on the modules `target_modules` names (HF module names: a list
    matched against the end of each dotted name, a string as a regex over the whole name, or
    "all-linear"; None: peft's default for the model type), rank `r`, scale `lora_alpha / r`
    (`lora_alpha / sqrt(r)` with `use_rslora`), `lora_dropout` on the adapter's input, `bias`
    ("none", "all" or "lora_only": which biases train too), `modules_to_save` (whole modules trained
    and saved, e.g. a new classification head), `exclude_modules` (as `target_modules`),
    `fan_in_fan_out` (set for GPT-2's `Conv1D` weights), `init_lora_weights` (True: peft's Kaiming-
    uniform A and zero B; "gaussian": A ~ N(0, 1/r); False: B random too, an adapter that is not a no-op).

    Raises:
        ValueError: `r` < 1, a `bias` outside `BIASES`, `lora_dropout` outside [0, 1), an unknown
            `init_lora_weights`.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_type: str = field(default="LORA", init=False)

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES}, got {self.bias!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian' in msfx, got {self.init_lora_weights!r}")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                setattr(self, name, sorted(value) if name != "modules_to_save" else list(value))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        return asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """`adapter_config.json` as peft writes it (peft's defaults for the fields msfx leaves off)."""
        data = {**UNSUPPORTED, **self.to_dict()}
        Path(save_directory, CONFIG_NAME).write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoraConfig":
        """The config in `directory/adapter_config.json` (written by peft or msfx).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a LoRA config.
            NotImplementedError: a peft feature msfx lacks is switched on (named).
        """
        path = Path(directory, CONFIG_NAME)
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a peft adapter directory")
        data = json.loads(path.read_text())
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{path}: peft_type {data['peft_type']!r}; msfx loads LoRA adapters only")
        switched_on = [name for name, off in UNSUPPORTED.items() if data.get(name, off) not in (off, None, {}, False)]
        if switched_on:
            raise NotImplementedError(f"{path} uses peft features msfx does not implement: "
                                      f"{', '.join(f'{n}={data[n]!r}' for n in switched_on)}")
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in names})
