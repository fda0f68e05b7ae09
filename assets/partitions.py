"""The département partitioning shared by every partitioned asset.

It lives with the assets (which need it at definition time) rather than in
``orchestration``, to keep imports one-way: orchestration → assets.
"""

from dagster import StaticPartitionsDefinition

from ops.geo.departements import DEPARTEMENTS

departements_partitions = StaticPartitionsDefinition(list(DEPARTEMENTS))
