"""Tensors on disk in the safetensors layout: a JSON header and raw little-endian arrays, no pickle.

File layout (the `safetensors <https://github.com/huggingface/safetensors>`_ format, so the
files also open with that library):

- 8 bytes: ``N``, the header length, unsigned little-endian;
- ``N`` bytes: UTF-8 JSON ``{"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...],
  "data_offsets": [begin, end]}, ...}``, padded with spaces to a multiple of 8;
- the tensors' bytes, back to back, offsets relative to the end of the header.

Reading validates the header (size, dtypes, shapes, offsets inside the file, no overlap) before
touching the data, and never executes anything from the file. Writes are atomic.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

from seapig_core._io import atomic_path

__all__ = ["load_tensors", "save_tensors"]

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (CPU, any of the supported dtypes) and string ``metadata`` to ``path`` atomically."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in header["__metadata__"].items()):  # type: ignore[union-attr]
        raise TypeError("The 'metadata' parameter must map str to str.")
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.dtype not in _CODES:
            raise ValueError(f"Tensor {name!r} has unsupported dtype {tensor.dtype}; supported: {sorted(_DTYPES)}.")
        data = tensor.numpy().astype(tensor.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)))
            handle.write(raw)
            for blob in blobs:
                handle.write(blob)
    return path


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by :func:`save_tensors`; returns ``(tensors, metadata)``.

    Raises
    ------
    ValueError
        If the file is missing or not a valid tensor file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The 'path' parameter must name an existing tensor file. Got {str(path)!r} instead.")
    blob = path.read_bytes()

    def bad(reason: str) -> ValueError:
        return ValueError(f"{str(path)!r} is not a valid safetensors file: {reason}.")

    if len(blob) < 8:
        raise bad("shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(_MAX_HEADER, len(blob) - 8):
        raise bad(f"header length {size} exceeds the file")
    try:
        header = json.loads(blob[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("'__metadata__' must map str to str")
    data = memoryview(blob)[8 + size :]
    tensors: dict[str, torch.Tensor] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"malformed entry {name!r}") from exc
        itemsize = torch.empty((), dtype=dtype).element_size()
        if any(d < 0 for d in shape) or not (0 <= begin <= end <= len(data)) or end - begin != math.prod(shape) * itemsize:
            raise bad(f"entry {name!r} has inconsistent shape {shape} and offsets {[begin, end]}")
        spans.append((begin, end))
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype.newbyteorder("<")
        array = np.frombuffer(data[begin:end], dtype=np_dtype).reshape(shape)
        tensors[name] = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    spans.sort()
    if any(prev_end > begin for (_, prev_end), (begin, _) in zip(spans, spans[1:], strict=False)):
        raise bad("tensor data overlap")
    return tensors, {str(k): v for k, v in metadata.items()}
