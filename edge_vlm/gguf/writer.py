"""A small GGUF v3 writer for numpy arrays.

Usage::

    w = GGUFWriter("model.gguf")
    w.add_string("general.architecture", "llama")
    w.add_tensor("token_embd.weight", emb, "F16")   # numpy [n_vocab, n_embd]
    w.write()                                        # atomic: temp file + fsync + rename

Arrays are given in row-major PyTorch layout (``[out, in]``); GGUF stores ggml ``ne`` order,
which is the numpy shape reversed, so the bytes are written unchanged and only the shape
recorded in the header is reversed.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np

from edge_vlm.gguf.constants import (
    BLOCK_SIZES,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    MAX_DIMS,
    MAX_TENSOR_NAME_BYTES,
    SCALAR_FORMATS,
    GGMLType,
    GGUFValueType,
)

TensorDType: TypeAlias = Literal["F32", "F16"]

_NUMPY_DTYPES: dict[GGMLType, str] = {GGMLType.F32: "<f4", GGMLType.F16: "<f2"}


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _pack_string(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _pack_scalar(value: Any, vtype: GGUFValueType) -> bytes:
    if vtype == GGUFValueType.STRING:
        if not isinstance(value, str):
            raise TypeError(f"expected a str, got {type(value).__name__}")
        return _pack_string(value)
    if vtype == GGUFValueType.BOOL:
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"expected a bool, got {type(value).__name__}")
        return struct.pack("<?", bool(value))
    fmt = SCALAR_FORMATS.get(vtype)
    if fmt is None:
        raise ValueError(f"{vtype.name} is not a scalar type")
    try:
        return struct.pack("<" + fmt, value)
    except struct.error as exc:
        raise ValueError(f"{value!r} does not fit in {vtype.name}: {exc}") from exc


def _pack_array(values: Sequence[Any], elem_type: GGUFValueType) -> bytes:
    if elem_type == GGUFValueType.ARRAY:
        raise ValueError("nested arrays are not supported")
    head = struct.pack("<IQ", elem_type, len(values))
    if elem_type == GGUFValueType.STRING:
        return head + b"".join(_pack_scalar(v, elem_type) for v in values)
    if elem_type == GGUFValueType.BOOL:
        return head + b"".join(_pack_scalar(v, elem_type) for v in values)
    # One struct call for the whole array: token score lists have tens of thousands of items.
    fmt = "<" + str(len(values)) + SCALAR_FORMATS[elem_type]
    try:
        return head + struct.pack(fmt, *values)
    except struct.error as exc:
        raise ValueError(f"array element does not fit in {elem_type.name}: {exc}") from exc


@dataclass(frozen=True)
class _PendingTensor:
    name: str
    array: np.ndarray
    ggml_type: GGMLType

    @property
    def nbytes(self) -> int:
        block, size = BLOCK_SIZES[self.ggml_type]
        return int(self.array.size) // block * size


class GGUFWriter:
    """Collects metadata and tensors, then writes one GGUF v3 file atomically.

    Tensors are held by reference and converted one at a time during :meth:`write`, so
    peak extra memory is about one tensor.

    Args:
        path: Destination file. Its directory must exist.
        alignment: Data alignment in bytes (written as ``general.alignment``).
    """

    def __init__(self, path: str | os.PathLike[str], *, alignment: int = DEFAULT_ALIGNMENT):
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.path = Path(path)
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}
        self._tensors: dict[str, _PendingTensor] = {}
        self.add_uint32("general.alignment", alignment)

    # -- metadata -------------------------------------------------------------------------

    def add(
        self,
        key: str,
        value: Any,
        vtype: GGUFValueType,
        elem_type: GGUFValueType | None = None,
    ) -> None:
        """Add one metadata key.

        Args:
            key: The key, e.g. ``llama.block_count``. Must not be present yet.
            value: A scalar matching ``vtype``, or a sequence when ``vtype`` is ARRAY.
            vtype: The value's type.
            elem_type: The element type; required for arrays.

        Raises:
            ValueError: The key is duplicated, or the value does not fit the type.
            TypeError: The value has the wrong Python type.
        """
        if not key or not isinstance(key, str):
            raise ValueError(f"metadata key must be a non-empty str, got {key!r}")
        if key in self._kv:
            raise ValueError(f"metadata key {key!r} added twice")
        if vtype == GGUFValueType.ARRAY:
            if elem_type is None:
                raise ValueError(f"array {key!r} needs an elem_type")
            if isinstance(value, str | bytes):
                raise TypeError(f"array {key!r} must be a sequence, not {type(value).__name__}")
            payload = _pack_array(list(value), elem_type)
        else:
            payload = _pack_scalar(value, vtype)
        self._kv[key] = _pack_string(key) + struct.pack("<I", vtype) + payload

    def add_uint32(self, key: str, value: int) -> None:
        """Add an unsigned 32-bit integer."""
        self.add(key, value, GGUFValueType.UINT32)

    def add_int32(self, key: str, value: int) -> None:
        """Add a signed 32-bit integer."""
        self.add(key, value, GGUFValueType.INT32)

    def add_uint64(self, key: str, value: int) -> None:
        """Add an unsigned 64-bit integer."""
        self.add(key, value, GGUFValueType.UINT64)

    def add_float32(self, key: str, value: float) -> None:
        """Add a 32-bit float."""
        self.add(key, float(value), GGUFValueType.FLOAT32)

    def add_bool(self, key: str, value: bool) -> None:
        """Add a boolean."""
        self.add(key, value, GGUFValueType.BOOL)

    def add_string(self, key: str, value: str) -> None:
        """Add a UTF-8 string."""
        self.add(key, value, GGUFValueType.STRING)

    def add_array(self, key: str, values: Sequence[Any], elem_type: GGUFValueType) -> None:
        """Add an array whose elements all have ``elem_type``."""
        self.add(key, values, GGUFValueType.ARRAY, elem_type)

    # -- tensors --------------------------------------------------------------------------

    def add_tensor(self, name: str, array: np.ndarray, dtype: TensorDType | GGMLType) -> None:
        """Queue a tensor; it is converted to ``dtype`` when the file is written.

        Args:
            name: GGUF tensor name (at most 63 UTF-8 bytes, unique).
            array: 1 to 4 dimensions in row-major PyTorch layout (``[out, in]`` for a
                linear weight). The header records the reversed shape (ggml ``ne``).
            dtype: ``"F32"`` or ``"F16"``.

        Raises:
            ValueError: Bad name, duplicate, unsupported dtype or rank, or empty array.
        """
        ggml_type = GGMLType[dtype] if isinstance(dtype, str) else GGMLType(dtype)
        if ggml_type not in _NUMPY_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {ggml_type.name} unsupported (F32, F16)")
        if not name or len(name.encode("utf-8")) > MAX_TENSOR_NAME_BYTES:
            raise ValueError(f"tensor name {name!r} must be 1..{MAX_TENSOR_NAME_BYTES} bytes")
        if name in self._tensors:
            raise ValueError(f"tensor {name!r} added twice")
        arr = np.asarray(array)
        if not 1 <= arr.ndim <= MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {arr.ndim} dims; GGUF allows 1..{MAX_DIMS}")
        if arr.size == 0:
            raise ValueError(f"tensor {name!r} is empty (shape {arr.shape})")
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tensor {name!r} has non-numeric dtype {arr.dtype}")
        self._tensors[name] = _PendingTensor(name, arr, ggml_type)

    @property
    def tensor_names(self) -> list[str]:
        """Names of the queued tensors, in file order."""
        return list(self._tensors)

    # -- output ---------------------------------------------------------------------------

    def _header(self) -> bytes:
        parts = [
            GGUF_MAGIC,
            struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv)),
            *self._kv.values(),
        ]
        offset = 0
        for t in self._tensors.values():
            ne = tuple(reversed(t.array.shape))
            parts.append(_pack_string(t.name))
            parts.append(struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t.ggml_type, offset))
            offset += _pad(t.nbytes, self.alignment)
        header = b"".join(parts)
        return header + b"\0" * (_pad(len(header), self.alignment) - len(header))

    def _write_data(self, f: Any) -> None:
        for t in self._tensors.values():
            with np.errstate(over="ignore"):  # overflow is reported just below
                data = np.ascontiguousarray(t.array, dtype=_NUMPY_DTYPES[t.ggml_type])
            # Checked after conversion: this also catches F32 values beyond the F16 range
            # (|x| > 65504), which would silently become inf in the file.
            if not np.isfinite(data).all():
                raise ValueError(f"tensor {t.name!r} has NaN or inf values as {t.ggml_type.name}")
            f.write(data.reshape(-1).view(np.uint8).data)
            pad = _pad(t.nbytes, self.alignment) - t.nbytes
            if pad:
                f.write(b"\0" * pad)

    def write(self) -> Path:
        """Write the file atomically: a temporary file in the same directory is written,
        fsynced and renamed over :attr:`path`.

        Returns:
            The path written.

        Raises:
            ValueError: A tensor holds NaN/inf (nothing is left on disk).
            OSError: The directory is missing or not writable.
        """
        directory = self.path.parent
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                # mkstemp creates 0600; a model file is meant to be readable like any other.
                if hasattr(os, "fchmod"):  # absent on Windows before Python 3.13
                    os.fchmod(f.fileno(), 0o644)
                f.write(self._header())
                self._write_data(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        # Make the rename itself durable; not possible on every platform, hence best effort.
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return self.path
