"""A bounded GGUF header parser for untrusted files.

Reads the metadata and the tensor table, never the tensor data, and checks every length,
count, shape and offset against the file size before trusting it, so a truncated, corrupt
or hostile file ends in a :class:`~edge_vlm.errors.ModelLoadError` that says what is wrong
instead of an abort or SIGSEGV inside llama.cpp. No llama_cpp import.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from edge_vlm.errors import ModelLoadError, ModelNotFoundError
from edge_vlm.gguf.constants import (
    BLOCK_SIZES,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MAX_DIMS,
    MAX_TENSOR_NAME_BYTES,
    SCALAR_FORMATS,
    GGMLType,
    GGUFValueType,
)

MAX_KV = 65_536
"""Most metadata entries accepted (real models have tens; token lists are one entry)."""
MAX_TENSORS = 65_536
"""Most tensors accepted (a 70B model has under 1,000)."""
MAX_KEY_BYTES = 65_536
MAX_STRING_BYTES = 16 * 1024 * 1024
"""Longest metadata string kept in memory (chat templates are tens of KB)."""
_INT64_MAX = 2**63 - 1
_KNOWN_TYPES = {t.value for t in GGMLType}
_VALUE_TYPES = {t.value for t in GGUFValueType}

# Arrays hold one element type; list[Any] since list is invariant and items are unpacked.
MetaValue: TypeAlias = "int | float | bool | str | list[Any] | ArraySummary"


@dataclass(frozen=True)
class ArraySummary:
    """A metadata array too long to keep (e.g. ``tokenizer.ggml.tokens``): type and length."""

    elem_type: GGUFValueType
    length: int


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table.

    Attributes:
        name: Tensor name.
        shape: ggml ``ne`` order (innermost first): the numpy/PyTorch shape reversed.
        ggml_type: Element type.
        offset: Absolute byte offset of the data in the file.
        nbytes: Size of the data in bytes.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFInfo:
    """What :func:`read_gguf` found in a file's header.

    Attributes:
        path: The file.
        version: GGUF version (2 or 3).
        file_size: Size in bytes.
        alignment: Data alignment.
        data_offset: Absolute offset of the tensor data section.
        metadata: Key to value; arrays longer than the reader's limit are summarised.
        value_types: Key to (type, element type for arrays else None), as stored: Python
            values do not tell u32 from i32, and llama.cpp aborts on the wrong one.
        tensors: Name to :class:`TensorInfo`, in file order.
    """

    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int
    metadata: dict[str, MetaValue]
    value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]]
    tensors: dict[str, TensorInfo]

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` if it is a string."""
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def get_int(self, key: str) -> int | None:
        """An integer (not bool) metadata value, or None if absent or of another type."""
        value = self.metadata.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def get_str(self, key: str) -> str | None:
        """A string metadata value, or None if absent or of another type."""
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None


def describe_path(path: str | os.PathLike[str]) -> str:
    """How error messages name a file: as the user gave it, quoted."""
    return repr(os.fspath(path))


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, buf: bytes | mmap.mmap, name: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.name = name
        self.where = "the header"

    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.size - self.pos:
            raise ModelLoadError(
                f"{self.name} is truncated: {self.where} needs {n} bytes at byte {self.pos} "
                f"but the file has {self.size} bytes"
            )
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(data)

    def skip(self, n: int) -> None:
        if n < 0 or n > self.size - self.pos:
            self.take(n)  # raises the truncation error
        self.pos += n

    def unpack(self, fmt: str) -> tuple[int | float | bool, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def u32(self) -> int:
        return int(self.unpack("I")[0])

    def u64(self) -> int:
        return int(self.unpack("Q")[0])

    def string(self, limit: int) -> str:
        n = self.u64()
        if n > limit:
            raise ModelLoadError(f"{self.name} is corrupt: {self.where} has a {n}-byte string")
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"{self.name} is corrupt: {self.where} is not UTF-8") from exc


def _hint(head: bytes) -> str:
    if head.startswith(b"version https://git-lfs"):
        return " (it is a Git LFS pointer: fetch the real file with `git lfs pull`)"
    if head.lstrip()[:1] in (b"<", b"{"):
        return " (it looks like an HTML or JSON page: was the download an error page?)"
    if head.startswith(b"PK\x03\x04"):
        return " (it is a ZIP archive: a PyTorch or safetensors checkpoint must be converted)"
    return ""


def read_gguf(path: str | os.PathLike[str], *, max_array_items: int = 64) -> GGUFInfo:
    """Parse and check a GGUF file's header and tensor table without reading tensor data.

    Args:
        path: The file.
        max_array_items: Arrays up to this length are returned as lists, longer ones as
            :class:`ArraySummary`.

    Returns:
        The parsed header.

    Raises:
        ModelNotFoundError: The file does not exist.
        ModelLoadError: The file is not a readable, well-formed GGUF file; the message
            says what is wrong and where.
    """
    name = describe_path(path)
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4:
                what = "empty (0 bytes)" if size == 0 else f"only {size} bytes long"
                raise ModelLoadError(f"{name} is not a GGUF file: it is {what}")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(p, _Cursor(buf, name), max_array_items)
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"{name} does not exist") from exc
    except IsADirectoryError as exc:
        raise ModelLoadError(f"{name} is a directory, not a GGUF file") from exc
    except PermissionError as exc:
        raise ModelLoadError(f"{name} cannot be read: permission denied") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{name} cannot be read: {exc}") from exc


def _parse(path: Path, cur: _Cursor, max_array_items: int) -> GGUFInfo:
    name = cur.name
    head = cur.take(4)
    if head != GGUF_MAGIC:
        hint = _hint(bytes(cur.buf[:64]))
        raise ModelLoadError(f"{name} is not a GGUF file (starts with {head!r}){hint}")
    version = cur.u32()
    if version not in (2, 3):
        if version & 0xFFFF == 0:
            why = "it looks big-endian; only little-endian files are supported"
        elif version == 1:
            why = "GGUF v1 is obsolete; convert the model again"
        else:
            why = "expected 2 or 3"
        raise ModelLoadError(f"{name} has unsupported GGUF version {version}: {why}")
    n_tensors, n_kv = cur.u64(), cur.u64()
    # Each KV takes at least 13 bytes and each tensor entry at least 24: a count the rest of
    # the file cannot hold is corrupt, whatever the cap.
    if n_kv > MAX_KV or n_kv * 13 > cur.remaining():
        raise ModelLoadError(f"{name} is corrupt: it claims {n_kv} metadata entries")
    if n_tensors > MAX_TENSORS or n_tensors * 24 > cur.remaining():
        raise ModelLoadError(f"{name} is corrupt: it claims {n_tensors} tensors")

    metadata: dict[str, MetaValue] = {}
    types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
    for i in range(n_kv):
        cur.where = f"metadata entry #{i}"
        key = cur.string(MAX_KEY_BYTES)
        cur.where = f"metadata key {key!r}"
        if key in metadata:
            raise ModelLoadError(f"{name} is corrupt: metadata key {key!r} appears twice")
        metadata[key], types[key] = _read_value(cur, cur.u32(), max_array_items)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in types and types["general.alignment"][0] != GGUFValueType.UINT32:
        raise ModelLoadError(f"{name} is corrupt: general.alignment is not a uint32")
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(
            f"{name} is corrupt: general.alignment {alignment!r} is not a power of two"
        )

    infos: list[tuple[str, tuple[int, ...], GGMLType, int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        cur.where = f"tensor entry #{i}"
        tname = cur.string(MAX_TENSOR_NAME_BYTES + 1)
        if len(tname.encode("utf-8")) > MAX_TENSOR_NAME_BYTES:
            raise ModelLoadError(f"{name} is corrupt: tensor name {tname!r} is too long")
        if tname in seen:
            raise ModelLoadError(f"{name} is corrupt: tensor {tname!r} appears twice")
        seen.add(tname)
        cur.where = f"tensor {tname!r}"
        infos.append(_read_tensor_info(cur, tname))

    data_offset = _pad(cur.pos, alignment)
    tensors: dict[str, TensorInfo] = {}
    expected = 0
    for tname, shape, gtype, rel, nbytes in infos:
        # llama.cpp requires the tensors packed in table order, each padded to the alignment.
        if rel != expected:
            raise ModelLoadError(
                f"{name} is corrupt: tensor {tname!r} has data offset {rel}, expected {expected}"
            )
        end = data_offset + rel + nbytes
        if end > cur.size:
            raise ModelLoadError(
                f"{name} is truncated: tensor {tname!r} ends at byte {end} "
                f"but the file has {cur.size} bytes"
            )
        tensors[tname] = TensorInfo(tname, shape, gtype, data_offset + rel, nbytes)
        expected = rel + _pad(nbytes, alignment)
    if n_tensors and data_offset > cur.size:
        raise ModelLoadError(f"{name} is truncated: the data section starts past the end")
    return GGUFInfo(path, version, cur.size, alignment, data_offset, metadata, types, tensors)


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


_Typed: TypeAlias = tuple[MetaValue, tuple[GGUFValueType, GGUFValueType | None]]


def _read_value(cur: _Cursor, vtype: int, max_items: int) -> _Typed:
    if vtype not in _VALUE_TYPES:
        raise ModelLoadError(f"{cur.name} is corrupt: {cur.where} has unknown type {vtype}")
    t = GGUFValueType(vtype)
    if t == GGUFValueType.STRING:
        return cur.string(MAX_STRING_BYTES), (t, None)
    if t != GGUFValueType.ARRAY:
        value = cur.unpack(SCALAR_FORMATS[t])[0]
        return (bool(value) if t == GGUFValueType.BOOL else value), (t, None)
    etype_raw, count = cur.u32(), cur.u64()
    if etype_raw not in _VALUE_TYPES or etype_raw == GGUFValueType.ARRAY:
        raise ModelLoadError(f"{cur.name} is corrupt: {cur.where} has array type {etype_raw}")
    etype = GGUFValueType(etype_raw)
    types = (t, etype)
    if etype == GGUFValueType.STRING:
        if count * 8 > cur.remaining():
            raise ModelLoadError(f"{cur.name} is corrupt: {cur.where} claims {count} strings")
        if count <= max_items:
            items = [cur.take(cur.u64()).decode("utf-8", errors="replace") for _ in range(count)]
            return items, types
        _skip_strings(cur, count)
        return ArraySummary(etype, count), types
    fmt = SCALAR_FORMATS[etype]
    width = struct.calcsize("<" + fmt)
    if count * width > cur.remaining():
        raise ModelLoadError(f"{cur.name} is truncated: {cur.where} claims {count} items")
    if count > max_items:
        cur.skip(count * width)
        return ArraySummary(etype, count), types
    values = list(cur.unpack(f"{count}{fmt}"))
    return ([bool(v) for v in values] if etype == GGUFValueType.BOOL else values), types


_U64 = struct.Struct("<Q")


def _skip_strings(cur: _Cursor, count: int) -> None:
    # A tight loop: token lists of 250k strings are common and this runs on every load.
    buf, pos, size, unpack = cur.buf, cur.pos, cur.size, _U64.unpack_from
    for _ in range(count):
        if pos + 8 > size:
            break
        pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            break
    else:
        cur.pos = pos
        return
    raise ModelLoadError(
        f"{cur.name} is truncated: {cur.where} runs past the end of the file ({size} bytes)"
    )


def _read_tensor_info(cur: _Cursor, tname: str) -> tuple[str, tuple[int, ...], GGMLType, int, int]:
    n_dims = cur.u32()
    if n_dims > MAX_DIMS:
        raise ModelLoadError(f"{cur.name} is corrupt: tensor {tname!r} has {n_dims} dimensions")
    shape = tuple(cur.u64() for _ in range(n_dims))
    n_elements = 1
    for d in shape:
        if d > _INT64_MAX:
            raise ModelLoadError(f"{cur.name} is corrupt: tensor {tname!r} has shape {list(shape)}")
        n_elements *= d
    if n_elements > _INT64_MAX:
        raise ModelLoadError(
            f"{cur.name} is corrupt: tensor {tname!r} shape {list(shape)} overflows"
        )
    type_raw = cur.u32()
    if type_raw not in _KNOWN_TYPES:
        raise ModelLoadError(
            f"{cur.name} has tensor {tname!r} of unknown ggml type {type_raw} "
            "(corrupt, or made by a newer llama.cpp)"
        )
    gtype = GGMLType(type_raw)
    block, block_bytes = BLOCK_SIZES[gtype]
    row = shape[0] if shape else 1
    if row % block:
        raise ModelLoadError(
            f"{cur.name} is corrupt: tensor {tname!r} rows of {row} are not a multiple of "
            f"the {gtype.name} block size {block}"
        )
    offset = cur.u64()
    if offset > _INT64_MAX:
        raise ModelLoadError(f"{cur.name} is corrupt: tensor {tname!r} has offset {offset}")
    return tname, shape, gtype, offset, n_elements // block * block_bytes
