"""Reading and writing HF safetensors checkpoints (single file or sharded with an index).

The format (https://github.com/huggingface/safetensors) is an 8-byte little-endian header
length, a JSON header `{name: {dtype, shape, data_offsets}}`, then raw little-endian data. It is
read one tensor at a time into its own buffer, which the loader hands on to MindSpore without a
copy, so peak host memory while loading stays near one copy of the model. bfloat16, which numpy
lacks (and so `safetensors.numpy` refuses), is carried as its raw 16 bits.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from msfx.errors import CorruptCheckpointError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact widening of raw bfloat16 bits (uint16, any shape) to float32 of the same shape."""
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: one 4-byte temporary per element, not two
    return wide.view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even narrowing of float32 to raw bfloat16 bits (as torch does)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        length = int.from_bytes(raw, "little")
        if length > size - 8:
            raise CorruptCheckpointError(f"{path}: truncated or not a safetensors file "
                                         f"(header claims {length} bytes, file has {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from e
    start = 8 + length
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        try:
            (begin, end), dtype, count = info["data_offsets"], str(info["dtype"]), math.prod(info["shape"])
        except (TypeError, KeyError, ValueError) as e:
            raise CorruptCheckpointError(f"{path}: malformed safetensors header entry for tensor {name!r}: "
                                         f"{info!r}") from e
        if dtype not in _NUMPY_DTYPES:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = count * np.dtype(_NUMPY_DTYPES[dtype]).itemsize
        if end - begin != expected or start + end > size:
            raise CorruptCheckpointError(f"{path}: truncated safetensors file: tensor {name!r} needs bytes "
                                         f"{start + begin}..{start + end}, file has {size}")
    return header, start


def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory: `model.safetensors`, else the index's shards
    (HF's `from_pretrained` order).

    Raises:
        FileNotFoundError: neither is present.
    """
    model_dir = Path(model_dir)
    single = model_dir / SAFE_WEIGHTS_NAME
    if single.is_file():  # HF looks for the single file first: an index next to it is not read
        return [single]
    index = model_dir / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {model_dir}")


def read_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for every tensor in `files`, from the headers alone."""
    shapes = {}
    for path in files:
        header, _ = _read_header(path)
        shapes.update({name: tuple(info["shape"]) for name, info in header.items()})
    return shapes


def read_tensor(files: list[Path], name: str) -> np.ndarray:
    """The tensor `name` from `files` (BF16 as raw uint16 bits).

    Raises:
        KeyError: no file holds `name`.
        CorruptCheckpointError: a truncated file or a malformed header.
    """
    for path in files:
        header, start = _read_header(path)
        if name in header:
            info = header[name]
            begin, end = info["data_offsets"]
            with open(path, "rb") as f:
                f.seek(start + begin)
                data = f.read(end - begin)
            if len(data) != end - begin:
                raise CorruptCheckpointError(f"{path}: truncated while reading tensor {name!r}")
            return np.frombuffer(data, _NUMPY_DTYPES[info["dtype"]]).reshape(info["shape"])
    raise KeyError(name)


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield `(name, array, stored_dtype)` lazily; BF16 arrays come as raw uint16 bits. Each array is a
    fresh, C-contiguous, writeable buffer that nothing else references (the loader keeps it as the
    weight's storage).

    Raises:
        CorruptCheckpointError: a truncated file or a malformed header.
    """
    for path in files:
        header, start = _read_header(path)
        with open(path, "rb") as f:
            for name, info in header.items():
                begin, end = info["data_offsets"]
                # a read into a fresh buffer, not a memmap: mapped file pages count in the process's
                # RSS until unmapped (a whole shard, +1x the model at peak for the usual 2-5 GB shards),
                # while the page cache a read goes through does not
                array = np.empty(info["shape"], _NUMPY_DTYPES[info["dtype"]])
                f.seek(start + begin)
                if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != end - begin:
                    raise CorruptCheckpointError(f"{path}: truncated while reading tensor {name!r}")
                yield name, array, info["dtype"]


def parse_size(size: int | str) -> int:
    """Bytes in `5GB`, `10MB`, `200KiB` or an int (HF's `max_shard_size` convention)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise ValueError(f"max_shard_size must be an int or like '5GB', got {size!r}")
    value, unit = float(match.group(1)), match.group(2)
    base = 1024 if "i" in unit else 1000
    return int(value * base ** {"K": 1, "M": 2, "G": 3}[unit[0]])


def _write_file(path: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    header, offset = {}, 0
    for name, (array, dtype) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header["__metadata__"] = {"format": "pt"}  # HF PyTorch refuses files without it
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for array, _ in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def save_safetensors(tensors: dict[str, tuple[np.ndarray, str]], save_directory: str | os.PathLike,
                     max_shard_size: int | str = "5GB") -> list[Path]:
    """Write `{name: (array, safetensors_dtype)}` as `model.safetensors`, or as shards
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` when the total exceeds
    `max_shard_size` (a tensor larger than the limit gets a shard of its own, as in HF).
    Returns the written files."""
    limit = parse_size(max_shard_size)
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    used = 0
    for name, (array, dtype) in tensors.items():
        if shards[-1] and used + array.nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = (array, dtype)
        used += array.nbytes
    for stale in [*save_directory.glob("model-*-of-*.safetensors"), save_directory / SAFE_WEIGHTS_NAME,
                  save_directory / SAFE_WEIGHTS_INDEX_NAME]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _write_file(save_directory / SAFE_WEIGHTS_NAME, shards[0])
        return [save_directory / SAFE_WEIGHTS_NAME]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = save_directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_file(path, shard)
        files.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(a.nbytes for a, _ in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (save_directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2))
    return files
