"""Partition keys: the 101 départements, nothing else."""

import pytest

from assets.partitions import departements_partitions
from ops.geo.departements import DEPARTEMENTS, UnknownDepartementError, check_departement, native_epsg


def test_the_101_insee_codes_are_the_partitions():
    keys = departements_partitions.get_partition_keys()
    assert len(keys) == 101 == len(set(keys))
    assert keys[:2] == ["01", "02"] and "2A" in keys and "2B" in keys and "20" not in keys
    assert keys[-5:] == ["971", "972", "973", "974", "976"] and "975" not in keys
    assert tuple(keys) == DEPARTEMENTS


@pytest.mark.parametrize(
    "dep,epsg", [("12", 2154), ("2A", 2154), ("971", 5490), ("973", 2972), ("974", 2975), ("976", 4471)]
)
def test_native_crs(dep, epsg):
    assert native_epsg(dep) == epsg


@pytest.mark.reliability
@pytest.mark.parametrize("bad", ["20", "975", "1", "2a", "", "99"])
def test_unknown_keys_are_errors_naming_the_key(bad):
    with pytest.raises(UnknownDepartementError, match=repr(bad)):
        check_departement(bad)
