"""Arrow arrays built from numpy and Python lists, and read back, without pyarrow's pandas bridge.

Why: pyarrow imports pandas the first time ``pa.array`` or ``Array.to_numpy``
is called (to recognise pandas objects and to convert nulls), which costs
0.2-0.3 s per process. The crop builds its index in every worker process,
and reads the partition in the serial work before any worker starts: on the
crop benchmark's partition that import was 5 % of a 2-worker crop, paid once
per process. These helpers build the same arrays straight from buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


def _validity(valid: np.ndarray) -> pa.Buffer | None:
    return None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))


def strings(values: Sequence[str | None]) -> pa.StringArray:
    """A string array (None as null) from Python strings."""
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    encoded = [v.encode() if v is not None else b"" for v in values]
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]:,} bytes of text do not fit one string array")
    return pa.Array.from_buffers(
        pa.string(), len(values), [_validity(valid), pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))],
        null_count=int((~valid).sum()),
    )  # fmt: skip


def numbers(values: np.ndarray, arrow_type: pa.DataType, nan_is_null: bool = False) -> pa.Array:
    """A numeric array of ``arrow_type`` from numpy values (NaN as null with ``nan_is_null``)."""
    values = np.ascontiguousarray(values, dtype=arrow_type.to_pandas_dtype())
    valid = ~np.isnan(values) if nan_is_null else np.ones(len(values), bool)
    return pa.Array.from_buffers(
        arrow_type, len(values), [_validity(valid), pa.py_buffer(values)], null_count=int((~valid).sum())
    )


def to_numpy(arr: pa.Array, dtype: str) -> np.ndarray:
    """A numeric Arrow array as numpy ``dtype`` (nulls as NaN; none are allowed in integers)."""
    arr = arr.cast(pa.from_numpy_dtype(np.dtype(dtype)))
    if not len(arr):
        return np.zeros(0, dtype)
    validity, data = arr.buffers()[:2]
    values = np.frombuffer(data, dtype, len(arr), arr.offset * np.dtype(dtype).itemsize)
    if arr.null_count:
        if values.dtype.kind != "f":
            raise ValueError(f"{arr.null_count} null values where {dtype} values are required")
        bits = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")
        values = np.where(bits[arr.offset : arr.offset + len(arr)].astype(bool), values, np.nan)
    return values
