"""Compact per-particle columns: memory that grows with the number of particles only where it must.

A column whose values are all equal (a pixel size, voltage or box size shared by every particle) is
stored as one number seen through a read-only broadcast view (numpy stride 0, ``torch.expand``);
other columns are plain arrays of the stored dtype. :class:`ColumnBuilder` fills a column chunk by
chunk and allocates the full array only once a value differs. Broadcast numpy views would be
pickled as full arrays, so :func:`pack` / :func:`unpack` turn them into a number and a length.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ColumnBuilder", "compact_array", "compact_tensor", "constant_value", "take", "pack", "unpack",
           "CHUNK_ROWS", "row_chunks"]

from ..defaults import CHUNK_ROWS  # noqa: E402  (defined there so the CLI's --help needs no torch)


def row_chunks(n: int, size: int = CHUNK_ROWS):
    """``(start, stop)`` of consecutive chunks of ``size`` rows covering ``range(n)``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def constant_value(values: np.ndarray | torch.Tensor):
    """The value of a 1-D column whose entries are all equal (as a 0-d array / tensor), else None."""
    if len(values) == 0:
        return None
    stride = values.stride()[0] if isinstance(values, torch.Tensor) else values.strides[0]
    if stride == 0:
        return values[0]
    first = values[0]
    return first if bool((values == first).all()) else None


def compact_array(values, dtype) -> np.ndarray:
    """A 1-D numpy column of ``dtype``: a broadcast view when every value is equal, else an array."""
    arr = np.asarray(values)
    arr = arr.reshape(-1) if arr.ndim != 1 else arr
    value = constant_value(arr)
    if value is not None:
        return np.broadcast_to(np.asarray(value, dtype=dtype), arr.shape)
    return arr.astype(dtype, copy=False)


def compact_tensor(values, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor column of ``dtype``: an expanded scalar when every value is equal, else a tensor."""
    t = torch.as_tensor(values)
    t = t.reshape(-1) if t.ndim != 1 else t
    value = constant_value(t)
    if value is not None:
        return value.to(dtype).expand(len(t))
    return t.to(dtype)


def take(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values[rows]``, staying a broadcast view for a constant column."""
    if values.strides[0] == 0:
        return np.broadcast_to(values[:1].reshape(()), (len(rows),)) if len(values) else values[rows]
    return values[rows]


class ColumnBuilder:
    """A column of ``n`` values filled chunk by chunk (:meth:`put`), kept as one number while all are
    equal; :meth:`array` / :meth:`tensor` give the result."""

    def __init__(self, n: int, dtype):
        self.n, self.dtype = int(n), np.dtype(dtype)
        self._value = None
        self._array: np.ndarray | None = None

    def put(self, start: int, values) -> None:
        """Set rows ``start, start + 1, ...`` to ``values`` (1-D, or a scalar for one row)."""
        values = np.asarray(values, dtype=self.dtype).reshape(-1)
        if len(values) == 0:
            return
        if self._array is None:
            first = values[0] if self._value is None else self._value
            if bool((values == first).all()):
                self._value = first
                return
            self._array = np.empty(self.n, dtype=self.dtype)
            self._array[:start] = first
        self._array[start:start + len(values)] = values

    def array(self) -> np.ndarray:
        if self._array is not None:
            return self._array
        value = np.zeros((), self.dtype) if self._value is None else self._value
        return np.broadcast_to(np.asarray(value, dtype=self.dtype), (self.n,))

    def tensor(self) -> torch.Tensor:
        if self._array is not None:
            return torch.from_numpy(self._array)
        return torch.as_tensor(self.array()[:1].copy()).reshape(()).expand(self.n)


class _Packed:
    """A broadcast column as (value, length), for pickling."""

    def __init__(self, value: np.ndarray, n: int):
        self.value, self.n = value, n


def pack(value):
    """For pickling: a broadcast numpy column becomes a small :class:`_Packed`; anything else as is."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and len(value) > 1 and value.strides[0] == 0:
        return _Packed(value[:1].copy(), len(value))
    return value


def unpack(value):
    """Undo :func:`pack`."""
    if isinstance(value, _Packed):
        return np.broadcast_to(value.value.reshape(()), (value.n,))
    return value
