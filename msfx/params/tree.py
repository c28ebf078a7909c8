"""Parameter pytrees: nested dicts (and lists for numbered layers) of tensors keyed like HF.

`params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]` holds the checkpoint tensor
`model.layers.0.self_attn.q_proj.weight`. `mindspore.jit` and `mindspore.grad` work best on flat
positional tensors, so `flatten` / `unflatten` convert between the tree and a list of leaves plus
a static structure.
"""
from __future__ import annotations

from typing import Any, Callable

Tree = Any


def unflatten_keys(flat: dict[str, Any]) -> dict:
    """Nest a flat `{"a.0.b": x}` mapping into `{"a": [{"b": x}]}`.

    Numeric path parts become list indices (layers are numbered densely from 0 in HF checkpoints).

    Raises:
        ValueError: a numbered group has gaps (`layers.0`, `layers.2` without `layers.1`).
    """
    root: dict = {}
    for key, value in flat.items():
        node = root
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _lists_from_numbered(root, "")


def _lists_from_numbered(node: Any, path: str) -> Any:
    if not isinstance(node, dict):
        return node
    children = {k: _lists_from_numbered(v, f"{path}{k}.") for k, v in node.items()}
    if children and all(k.isdigit() for k in children):
        indices = sorted(int(k) for k in children)
        if indices != list(range(len(indices))):
            raise ValueError(f"numbered keys under '{path.rstrip('.')}' are not 0..n-1: {indices}")
        return [children[str(i)] for i in indices]
    return children


def flatten_keys(tree: Tree, prefix: str = "") -> dict[str, Any]:
    """Inverse of `unflatten_keys`: `{"model.layers.0.mlp.up_proj.weight": tensor, ...}`."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten_keys(value, f"{prefix}.{key}" if prefix else key))
    return flat


def flatten(tree: Tree) -> tuple[list, list[str]]:
    """Leaves in a fixed order plus the structure (their dotted keys) to rebuild the tree."""
    flat = flatten_keys(tree)
    return list(flat.values()), list(flat.keys())


def unflatten(leaves: list | tuple, keys: list[str]) -> dict:
    """Rebuild the tree from `flatten`'s leaves and keys."""
    return unflatten_keys(dict(zip(keys, leaves)))


def tree_map(fn: Callable[[Any], Any], tree: Tree) -> Tree:
    """Apply `fn` to every leaf, keeping the structure."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return fn(tree)


class Params(dict):
    """A parameter tree with its HF config attached as `.config`.

    The config is static metadata, not a leaf: `flatten` and `tree_map` never see it. This is how
    `msfx.llama.forward(params, ids)` finds the model's shape without a second argument.
    """

    def __init__(self, tree: dict, config=None):
        super().__init__(tree)
        self.config = config


def config_of(params) -> Any:
    """The config a parameter tree carries (`Params.config`).

    Raises:
        ValueError: the tree carries none (a plain dict): pass `config=` to the forward function,
            or use params from the family's `load` / `init_params`.
    """
    config = getattr(params, "config", None)
    if config is None:
        raise ValueError("params carry no config: pass config=..., or use params from the family's load / "
                         "init_params (e.g. msfx.llama.load)")
    return config
