"""peft's `PeftModel` over an msfx model: LoRA adapters as extra leaves of its parameter tree, files
in peft's format (`adapter_config.json`, `adapter_model.safetensors` with peft's keys)."""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from msfx.errors import CorruptCheckpointError
from msfx.modeling import PreTrainedModel
from msfx.params import Params, flatten, unflatten
from msfx.params.hub import resolve_model_dir
from msfx.peft.config import SEQ_CLS_HEADS, WEIGHTS_NAME, LoraConfig
from msfx.peft.lora import (CONV1D_MODULES, adapt, find_targets, init_adapter, lora_weight, matches,
                            merged_weight)

PREFIX = "base_model.model."  # peft's key prefix in adapter files


class PeftModel(nn.Cell):
    """A LoRA model: the msfx `model`'s Parameters frozen (`requires_grad=False`) except the biases
    and `modules_to_save` the config trains, plus trainable `lora_A` / `lora_B` Parameters for every
    targeted linear layer. Calls run the model's own forward on a tree where those layers hold a
    `LoraWeight` (peft's unmerged numbers); `msfx.Trainer` trains the Parameters with `requires_grad`.

    `params` is the whole tree (the model's keys plus `...q_proj.lora_A.weight`, ...), `weights` its
    leaves in `flatten` order. `generate` runs on the weights merged with the adapter (computed per
    call, not stored). Unlike peft, `modules_to_save` train in place (no copy of the original module).

    Args:
        model: an msfx `PreTrainedModel`.
        peft_config: `LoraConfig`.
        adapter_name: the one adapter's name (peft's default "default"; not part of the file keys).
        seed: draws the initial adapter (`init_lora_weights`).

    Raises:
        TypeError: `model` is not an msfx model.
        ValueError: see `msfx.peft.lora.find_targets`.
    """

    def __init__(self, model: PreTrainedModel, peft_config: LoraConfig, adapter_name: str = "default",
                 seed: int = 0):
        super().__init__(auto_prefix=False)
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be an msfx PreTrainedModel, got {type(model).__name__}")
        self.base_model, self.active_adapter = model, adapter_name
        self.peft_config = {adapter_name: peft_config}
        leaves, keys = flatten(dict(model.params))
        hf_of = {id(leaf): key for leaf, key in zip(*flatten(model.state_tree()))}
        self._hf_keys = {key: hf_of.get(id(leaf), key) for leaf, key in zip(leaves, keys)}  # tree key -> HF key
        self._find_targets(leaves, keys, peft_config)
        save = list(peft_config.modules_to_save or []) + (SEQ_CLS_HEADS if peft_config.task_type == "SEQ_CLS" else [])
        saved = [key for key in keys if self._trains(key, save, peft_config.bias)]
        for leaf, key in zip(leaves, keys):
            leaf.requires_grad = key in saved
        rng = np.random.default_rng(seed)
        adapter = {}
        for path in sorted(self._targets, key=lambda p: keys.index(p + ".weight")):
            weight = _node(model.params, path)["weight"]
            for name, array in zip(("lora_A", "lora_B"),
                                   init_adapter(tuple(weight.shape), peft_config, path in self._conv1d, rng)):
                adapter[f"{path}.{name}.weight"] = Parameter(Tensor(array), name=f"{path}.{name}.weight")
        self._saved = [*adapter, *saved]  # the tree keys `save_pretrained` writes
        self.adapter = ParameterTuple(list(adapter.values()))
        self.weights, self._param_keys = flatten(unflatten([*leaves, *adapter.values()], [*keys, *adapter]))
        self.params = Params(unflatten(self.weights, self._param_keys), model.config)

    def _find_targets(self, leaves: list, keys: list[str], config: LoraConfig) -> None:
        """Sets `_targets` (the adapted modules' tree paths) and `_conv1d` (those stored `[in, out]`)."""
        model_type = self.base_model.config.model_type
        linear = {key[:-7]: self._hf_keys[key][:-7] for leaf, key in zip(leaves, keys)
                  if key.endswith(".weight") and leaf.ndim == 2}
        hf_targets = set(find_targets(list(linear.values()), config, model_type))
        self._targets = frozenset(path for path, hf in linear.items() if hf in hf_targets)
        self._conv1d = frozenset(p for p in self._targets if p.rsplit(".", 1)[-1] in CONV1D_MODULES.get(model_type, ()))
        if self._conv1d and not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out "
                          "to True.", stacklevel=3)  # peft's message and fix
            config.fan_in_fan_out = True

    def _trains(self, key: str, modules_to_save: list[str], bias: str) -> bool:
        """Whether base leaf `key` trains: inside a `modules_to_save` module, or a bias `bias` selects."""
        parts = self._hf_keys[key].split(".")
        if any(matches(modules_to_save, ".".join(parts[:i])) for i in range(1, len(parts))):
            return True
        return key.endswith(".bias") and (bias == "all" or (bias == "lora_only" and key[:-5] in self._targets))

    def _file_key(self, key: str) -> str:
        """peft's name in adapter files for tree key `key` (a targeted layer's bias is its `base_layer`'s)."""
        module, leaf = key.rsplit(".", 1)
        path, part = module.rsplit(".", 1) if "." in module else ("", module)
        if part in ("lora_A", "lora_B"):
            return f"{PREFIX}{self._hf_keys[path + '.weight'][:-7]}.{part}.weight"
        if leaf == "bias" and module in self._targets:
            return f"{PREFIX}{self._hf_keys[key][:-5]}.base_layer.bias"
        return PREFIX + self._hf_keys[key]

    # ------------------------------------------------------------------------------- forward

    @property
    def config(self):
        return self.base_model.config

    @property
    def generation_config(self):
        return self.base_model.generation_config

    @property
    def accepts_loss_kwargs(self) -> bool:
        return bool(getattr(self.base_model, "accepts_loss_kwargs", False))

    @property
    def scaling(self) -> float:
        return self.peft_config[self.active_adapter].scaling

    def get_base_model(self) -> PreTrainedModel:
        return self.base_model

    def adapted_tree(self, tree: dict | None = None) -> dict:
        """`tree` (default `params`) with a `LoraWeight` at every adapted layer: what the model's forward reads."""
        rate = self.peft_config[self.active_adapter].lora_dropout
        return adapt(self.params if tree is None else tree, self._targets,
                     lambda node, path: lora_weight(node, self.scaling, rate))

    def construct(self, *args, **kwargs):
        """The model's forward (same arguments and outputs) with the adapters applied."""
        with self.base_model.using_params(self.adapted_tree()):
            return self.base_model(*args, **kwargs)

    @contextlib.contextmanager
    def using_params(self, tree: dict) -> Iterator[None]:
        """Within: calls run on `tree` (keyed as `params`) instead of the Parameters."""
        saved = self.params
        self.params = Params(tree, self.config)
        try:
            yield
        finally:
            self.params = saved

    def generate(self, *args, **kwargs):
        """The model's `generate` (same arguments) on its weights merged with the adapter."""
        merged = adapt(self.params, self._targets, self._merge_node)
        base = self.base_model
        with base.using_params(merged):
            base._steps = {}  # compiled steps hold the leaves they were built on
            try:
                return base.generate(*args, **kwargs)
            finally:
                base._steps = {}

    def _merge_node(self, node: dict, path: str):
        return merged_weight(node["weight"], node["lora_A"]["weight"], node["lora_B"]["weight"], self.scaling,
                             path in self._conv1d)

    # ---------------------------------------------------------------------------- parameters

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, all)` parameter counts (the adapters included in all)."""
        sizes = [(int(np.prod(p.shape)), p.requires_grad) for p in self.weights]
        return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def num_parameters(self) -> int:
        return self.get_nb_trainable_parameters()[1]

    # ---------------------------------------------------------------------------------- files

    def adapter_state(self) -> dict[str, np.ndarray]:
        """What `save_pretrained` writes: peft's keys -> arrays (adapters, trained biases, `modules_to_save`)."""
        by_key = dict(zip(self._param_keys, self.weights))
        return {self._file_key(key): by_key[key].asnumpy() for key in self._saved}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` and `adapter_model.safetensors` as peft does (peft's
        `PeftModel.from_pretrained(hf_model, save_directory)` loads them)."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self.peft_config[self.active_adapter].save_pretrained(save_directory)
        save_file(self.adapter_state(), str(Path(save_directory, WEIGHTS_NAME)), metadata={"format": "pt"})

    def read_adapter(self, directory: str | os.PathLike) -> dict[str, np.ndarray]:
        """The arrays of `directory/adapter_model.safetensors` by this model's tree keys.

        Raises:
            CorruptCheckpointError: an unreadable file, or keys missing, unexpected or mis-shaped (named).
        """
        path = Path(directory, WEIGHTS_NAME)
        try:
            stored = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise CorruptCheckpointError(f"cannot read {path}: {e}") from e
        wanted = {self._file_key(key): key for key in self._saved}
        missing = sorted(set(wanted) - set(stored))
        unexpected = sorted(set(stored) - set(wanted))
        if missing or unexpected:
            raise CorruptCheckpointError(f"{path} does not fit this model and config: missing keys {missing[:4]}, "
                                         f"unexpected keys {unexpected[:4]}")
        by_key = dict(zip(self._param_keys, self.weights))
        for name, key in wanted.items():
            if tuple(stored[name].shape) != tuple(by_key[key].shape):
                raise CorruptCheckpointError(f"{path}: {name} has shape {list(stored[name].shape)}, the model "
                                             f"expects {list(by_key[key].shape)}")
        return {key: stored[name] for name, key in wanted.items()}

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Set the adapter (and saved biases / modules) from `directory` (see `read_adapter`)."""
        by_key = dict(zip(self._param_keys, self.weights))
        for key, array in self.read_adapter(directory).items():
            by_key[key].set_data(Tensor(array).astype(by_key[key].dtype))

    @classmethod
    def from_pretrained(cls, model: PreTrainedModel, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, **hub_kwargs) -> "PeftModel":
        """peft's `PeftModel.from_pretrained`: the adapter in `model_id` (a directory or hub id holding
        peft's two files, written by peft or msfx) on `model`; frozen unless `is_trainable`.

        Raises:
            FileNotFoundError, NotImplementedError, ValueError: see `LoraConfig.from_pretrained`.
            CorruptCheckpointError: the weights do not fit `model` (see `read_adapter`).
        """
        directory = resolve_model_dir(model_id, **hub_kwargs)
        config = LoraConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name)
        peft_model.load_adapter(directory)
        if not is_trainable:
            for leaf in peft_model.weights:
                leaf.requires_grad = False
        return peft_model

    # -------------------------------------------------------------------------------- merging

    def merge_and_unload(self) -> PreTrainedModel:
        """Fold the adapters into the model's weights (`W + scaling * B @ A`) and return the model,
        all its Parameters trainable again: `save_pretrained` then writes a plain HF checkpoint."""
        return self.unload(merge=True)

    def unload(self, merge: bool = False) -> PreTrainedModel:
        """The model without the adapters (merged into its weights with `merge`)."""
        for path in self._targets:
            node = _node(self.params, path)
            if merge:
                node["weight"].set_data(self._merge_node(node, path))
        for leaf in self.base_model.weights:
            leaf.requires_grad = True
        return self.base_model


def _node(tree, path: str) -> dict:
    for part in path.split("."):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


def get_peft_model(model: PreTrainedModel, peft_config: LoraConfig, adapter_name: str = "default",
                   seed: int = 0) -> PeftModel:
    """peft's `get_peft_model`: `model` with fresh LoRA adapters (see `PeftModel`)."""
    return PeftModel(model, peft_config, adapter_name, seed)

