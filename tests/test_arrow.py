"""Arrow arrays built from buffers (ops.crop.arrow) are the arrays pyarrow's own converters build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ops.crop import arrow


def test_strings_with_nulls_and_non_ascii_text():
    values = ["b1", None, "bâtiment_é", "", "x" * 1000, None]
    got = arrow.strings(values)
    assert got.equals(pa.array(values, pa.string()))
    assert got.null_count == 2
    assert arrow.strings([]).equals(pa.array([], pa.string()))


@pytest.mark.parametrize("arrow_type", [pa.float64(), pa.float32()])
def test_numbers_with_nan_as_null(arrow_type):
    values = np.array([1.5, np.nan, -3.0, np.nan, 0.0])
    got = arrow.numbers(values, arrow_type, nan_is_null=True)
    assert got.equals(pa.array(values, arrow_type, from_pandas=True))
    assert arrow.numbers(values, arrow_type).null_count == 0  # NaN kept as a value unless asked


def test_to_numpy_reads_slices_and_nulls():
    a = pa.array([1.0, None, 3.0, None, 5.0, 6.0, None, 8.0, 9.0, 10.0])
    for start in range(len(a)):
        part = a.slice(start, 5)
        want = np.array([np.nan if v is None else v for v in part.to_pylist()])
        np.testing.assert_array_equal(arrow.to_numpy(part, "float64"), want)
    np.testing.assert_array_equal(arrow.to_numpy(pa.array([3, 1, 2], pa.uint64()), "int64"), [3, 1, 2])
    with pytest.raises(ValueError, match="1 null"):
        arrow.to_numpy(pa.array([1, None]), "int64")


def test_building_arrays_imports_no_pandas():
    """The point of the module: pyarrow's converters import pandas (0.2-0.3 s in every crop process)."""
    code = (
        "import sys, numpy as np, pyarrow as pa\n"
        "from ops.crop import arrow\n"
        "arrow.strings(['a', None])\n"
        "arrow.to_numpy(arrow.numbers(np.array([1.0, np.nan]), pa.float64(), nan_is_null=True), 'float64')\n"
        "print('pandas' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
