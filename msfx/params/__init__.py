"""Parameter pytrees: safetensors / GGUF checkpoints <-> nested dicts of MindSpore tensors."""
from msfx.params.checkpoint import load_params, save_params
from msfx.params.dtypes import parse_dtype
from msfx.params.hub import resolve_model_dir
from msfx.params.tree import Params, flatten, flatten_keys, tree_map, unflatten, unflatten_keys

__all__ = ["Params", "flatten", "flatten_keys", "load_params", "parse_dtype", "resolve_model_dir",
           "save_params", "tree_map", "unflatten", "unflatten_keys"]
