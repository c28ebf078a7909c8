"""Exceptions raised by msfx for bad checkpoints and bad inputs.

All derive from built-in exception types that HF Transformers raises in the same situations
(`OSError` for unreadable files and unknown model references, `ValueError` for bad arguments),
so code written against HF keeps catching them.
"""


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors, or the
    wrong architecture. The message names every offending tensor."""


class CorruptCheckpointError(OSError):
    """A weights file (safetensors or GGUF) is truncated or not in the format its name claims."""


class ModelNotFoundError(OSError):
    """A model reference is neither a local directory nor a hub id that can be resolved
    (for example offline, with `HF_HUB_OFFLINE=1` or `local_files_only=True`)."""
