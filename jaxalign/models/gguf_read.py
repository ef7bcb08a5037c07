"""A GGUF file's metadata and tensors, parsed in one pass over the header.

The ``gguf`` package's ``GGUFReader`` builds a NumPy view for every part of every metadata value, so the tokenizer
of a 49,152-token vocabulary (a string per token and per merge) costs about 200,000 small arrays and ~10 s on one
CPU core. This reader decodes the same header directly (strings as Python strings, numeric arrays with one
``np.frombuffer`` each) in a fraction of a second, and maps the tensors' data from the file without copying it,
in the layout ``GGUFReader`` gives (so ``gguf.quants.dequantize`` reads them as it reads the package's).

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic ``GGUF``, version (2 or 3), tensor
and key/value counts, the key/values, the tensors' infos (name, dimensions fastest first, type, offset), then
the data, aligned to ``general.alignment`` (32 by default). Little-endian files only (what llama.cpp writes on
every common platform); a big-endian one is refused by name.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value types: 0-7, 10-12 scalars (struct format), 8 string, 9 array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
# Tensor types stored as plain NumPy items (GGUFReader's dtypes); every other type is blocks of bytes.
_PLAIN_TENSORS = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor: ``shape`` in GGUF's order (fastest dimension first, as ``GGUFReader`` gives it), ``data`` the
    mapped bytes as ``GGUFReader`` lays them out (NumPy's order; quantised types as ``uint8`` blocks)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """``metadata``: every key/value as Python values (strings decoded, arrays as lists); ``tensors`` in file
    order."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


def _unreadable(path: Path, reason: str) -> ValueError:
    return ValueError(f"{path}: not a readable GGUF file ({reason})")


class _Cursor:
    def __init__(self, buffer, path: Path):
        self.buffer, self.offset, self.path = buffer, 0, path

    def unpack(self, fmt: str):
        try:
            value = struct.unpack_from(fmt, self.buffer, self.offset)[0]
        except struct.error:
            raise _unreadable(self.path, f"the header ends early, at byte {self.offset}") from None
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise _unreadable(self.path, f"a string at byte {self.offset} runs past the end of the file")
        text = bytes(self.buffer[self.offset:end]).decode("utf-8", errors="replace")
        self.offset = end
        return text

    def value(self, kind: int, key: str):
        if kind in _SCALARS:
            value = self.unpack(_SCALARS[kind])
            return float(np.float32(value)) if kind == 6 else value
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind in _NUMPY:
                dtype = np.dtype(_NUMPY[item_kind])
                end = self.offset + count * dtype.itemsize
                if end > len(self.buffer):
                    raise _unreadable(self.path, f"the array of {key} runs past the end of the file")
                items = np.frombuffer(self.buffer, dtype, count, self.offset)
                self.offset = end
                return [bool(v) for v in items] if item_kind == 7 else items.tolist()
            return [self.value(item_kind, key) for _ in range(count)]
        raise _unreadable(self.path, f"metadata {key} has unknown GGUF value type {kind}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse ``path``'s header and map its tensors (nothing is dequantised or copied).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``<path>: not a readable GGUF file (<why>)``: not a GGUF file, an unsupported version or byte
            order, or a header or tensor that runs past the end of the file.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    mapped = np.memmap(path, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    cursor = _Cursor(memoryview(mapped), path)
    if bytes(mapped[:4]) != MAGIC:
        raise _unreadable(path, "it does not start with 'GGUF'")
    cursor.offset = 4
    version = cursor.unpack("<I")
    if version not in VERSIONS:
        order = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise _unreadable(path, f"GGUF version {version}{order}; versions {', '.join(map(str, VERSIONS))} are read")
    tensor_count, kv_count = cursor.unpack("<Q"), cursor.unpack("<Q")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"), key)
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = tuple(cursor.unpack("<Q") for _ in range(cursor.unpack("<I")))
        infos.append((name, dims, cursor.unpack("<I"), cursor.unpack("<Q")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _unreadable(path, f"general.alignment {alignment!r} is not a power of two")
    start = -(-cursor.offset // alignment) * alignment
    tensors, names = [], set()
    for name, dims, raw_type, offset in infos:
        if name in names:
            raise _unreadable(path, f"tensor {name!r} appears twice")
        names.add(name)
        try:
            kind = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise _unreadable(path, f"tensor {name!r} has unknown type {raw_type}") from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        elements = int(np.prod(dims, dtype=np.int64))
        nbytes = elements // block * block_bytes
        begin = start + offset
        if begin + nbytes > len(mapped):
            raise _unreadable(path, f"tensor {name!r} runs past the end of the file: truncated?")
        shape = tuple(reversed(dims))
        if kind.name in _PLAIN_TENSORS:
            data = mapped[begin:begin + nbytes].view(_PLAIN_TENSORS[kind.name]).reshape(shape)
        else:
            data = mapped[begin:begin + nbytes].reshape(gguf.quant_shape_to_byte_shape(shape, kind))
        tensors.append(GGUFTensor(name, dims, kind, data))
    return GGUFFile(path, version, metadata, tensors)
